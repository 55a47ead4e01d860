"""The metric families of async jobs, read from ``Dispatcher.stats()`` at scrape time
(``StatsCollector``): this replica's workers (``stats["jobs"]``, ``JobWorkers.stats``) and
the jobs submitted to it (``stats["job_submissions"]``). Apart from ``metrics``, which holds
the call path's families and the collectors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["job_families"]


def _counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=labels)


def job_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    yield from _jobs(stats.get("jobs", {}))
    yield from _job_submissions(stats.get("job_submissions", {}))


def _jobs(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """This replica's job workers (``JobWorkers.stats``): none without ``jobs.workers``."""
    if not stats:
        return
    yield GaugeMetricFamily(
        "dispatcher_job_workers", "Job workers this replica runs.", stats["workers"]
    )
    yield GaugeMetricFamily(
        "dispatcher_jobs_running", "Job attempts running on this replica now.", stats["running"]
    )
    ended = _counter(
        "dispatcher_jobs_ended",
        "Jobs this replica's workers ended, by route (the version the last attempt ran at)"
        " and state: succeeded, failed (a final error), dead (out of attempts).",
        ["route", "state"],
    )
    retried = _counter(
        "dispatcher_job_retries",
        "Job attempts that failed retryably and were queued again, by route.",
        ["route"],
    )
    for route, counts in stats.get("routes", {}).items():
        for state in ("succeeded", "failed", "dead"):
            ended.add_metric([route, state], counts[state])
        retried.add_metric([route], counts["retried"])
    entries = _counter(
        "dispatcher_job_entries_not_run",
        "Queue entries a worker could not run: malformed (dead-lettered: no job record, an"
        " unreadable one) or deferred (the store could not record the start; taken again"
        " after the visibility timeout).",
        ["reason"],
    )
    for reason in ("malformed", "deferred"):
        entries.add_metric([reason], stats[reason])
    yield from (ended, retried, entries)
    callbacks = stats.get("callbacks")
    if callbacks:
        sent = _counter(
            "dispatcher_job_callbacks",
            "Callbacks of ended jobs: delivered, failed (given up), retried (attempts again).",
            ["outcome"],
        )
        for outcome in ("delivered", "failed", "retried"):
            sent.add_metric([outcome], callbacks[outcome])
        yield sent
        yield GaugeMetricFamily(
            "dispatcher_job_callbacks_sending", "Callbacks being sent now.", callbacks["sending"]
        )


def _job_submissions(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    submitted = _counter(
        "dispatcher_job_submissions",
        "Jobs submitted to this replica, by route and outcome: queued (a new job), replayed"
        " (a keyed submission answered its earlier job), or the type of the error that"
        " refused it.",
        ["route", "outcome"],
    )
    for route, outcomes in stats.items():
        for outcome, count in outcomes.items():
            submitted.add_metric([route, outcome], count)
    yield submitted
