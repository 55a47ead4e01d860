"""Async jobs: ``Dispatcher.submit`` records a call on the shared job stream and returns
its id at once; workers in any replica (``jobs: {workers: N}``) run it later through the
method's own chain, exactly as ``Dispatcher.call`` would.

A job's states: ``queued`` → ``running`` → ``succeeded`` | ``failed`` (a non-retryable
error) | ``retrying`` (a retryable one: back on the stream after a backoff that doubles per
attempt, at least the error's ``retry_after``) → … → ``dead`` after ``max_attempts``
(dead-lettered: kept until redriven or purged). An attempt is counted before the job runs,
so a job whose worker dies each time (a poison job) is dead-lettered too. The durable
part, and why a killed worker loses nothing, is the store's (``dispatcher.state.redis_jobs``).

Errors, as a tree::

    DispatchError (linchkit_plugin.errors)
    ├── JobNotFound      no record of that id: never submitted, or kept past result_ttl_ms
    ├── JobExpired       a keyed submission whose key's job is no longer kept (final)
    ├── JobNotFinished   ``result(wait=…)`` ran out of time first (retryable: ask again)
    ├── ResultTooLarge   the job's result was over ``jobs.max_result_bytes``: not kept
    │                    (defined in ``providers.base``: a provider reads it back too)
    └── JobsUnavailable  this dispatcher's state backend keeps no jobs (memory)

(``JobsUnavailable`` lives with the stores, ``dispatcher.state.errors``, which raise it
too), and a submission to an unreachable Redis (or SQS) raises ``StateUnavailable`` (retryable) whatever
``on_unavailable`` says: a job kept in this process's memory would not be durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from dispatcher._job_callbacks import JobCallbacks, new_delivery_id
from dispatcher._outage_log import OutageLog
from dispatcher._public_errors import ErrorDetail
from dispatcher.config import JobsConfig
from dispatcher.state.errors import JobsUnavailable, StateUnavailable
from dispatcher.state.job_store import TERMINAL_STATES, Delivery, JobStore
from linchkit_plugin.errors import DispatchError, ProviderError, error_from_wire
from linchkit_plugin.wire import encode_json, error_response
from providers.base import ResultTooLarge
from providers.egress import EgressPolicy

__all__ = [
    "OWN_ERROR_TYPES",
    "JobExpired",
    "JobNotFinished",
    "JobNotFound",
    "JobWorkers",
    "JobsUnavailable",
    "ResultTooLarge",
    "ended_error",
    "job_outcome",
    "job_status",
    "new_job_record",
]

log = logging.getLogger("dispatcher.jobs")

#: (record, params) → the call's result; the dispatcher runs it through the method's chain.
RunJob = Callable[[dict[str, str], Any], Awaitable[Any]]

#: How long ``aclose`` lets the jobs in flight finish before cancelling them (their
#: entries stay pending and another worker takes them after the visibility timeout).
STOP_GRACE_SECONDS = 5.0
#: What ``JobWorkers.stats()["routes"]`` counts for each route: jobs ended each way, and
#: attempts that failed and were retried.
ROUTE_OUTCOMES = ("succeeded", "failed", "dead", "retried")
#: Routes counted apart at most; the others share ``OTHER_ROUTES``.
MAX_COUNTED_ROUTES = 1000
OTHER_ROUTES = "(other)"


class JobNotFound(DispatchError):
    type = "job_not_found"


class JobExpired(DispatchError):
    """A submission repeated with the idempotency key of a job whose record is no longer
    kept: evicted by a Redis at its memory limit, dead-lettered and purged, or expired
    under a dispatcher before 2026-12-05 (a keyed job's record is kept as long as its key
    now). Final: the key's record stays for its retention, and so does this answer.
    ``details["job_id"]``: that job."""

    type = "job_expired"


class JobNotFinished(DispatchError):
    type = "job_not_finished"
    default_retryable = True


#: The dispatcher's own types a job's stored error may have, beyond the protocol's: read
#: back as their class (``error_from_wire(…, types=…)``), not as a plugin's error of that
#: name. Only for what a worker stored: a plugin's answer is read with the protocol's.
OWN_ERROR_TYPES: Mapping[str, type[DispatchError]] = {ResultTooLarge.type: ResultTooLarge}


def _now_ms() -> str:
    return str(int(time.time() * 1000))


def new_job_record(
    job_id: str,
    plugin: str,
    version: str,
    method: str,
    params: Any,
    caller: str | None,
    idempotency_key: str | None,
    callback_url: str | None = None,
    callback_detail: ErrorDetail = "full",
    *,
    split_key: str | None = None,
) -> dict[str, str]:
    """The stored record of a new job (every field a string: a Redis hash).
    ``callback_detail``: ``safe`` (kept with a ``callback_url`` only), its callback tells
    an infrastructure error as a gateway answering ``safe`` does (``_job_callbacks``).
    ``split_key``: a rollout chose ``version`` by it, and places the job again by it
    when it runs (``RouteTable.placed_again``)."""
    record = {
        "id": job_id,
        "plugin": plugin,
        "version": version,
        "method": method,
        "params": encode_json(params).decode(),
        "state": "queued",
        "attempts": "0",
        "submitted_at": _now_ms(),
    }
    if caller is not None:
        record["caller"] = caller
    if idempotency_key is not None:
        record["idempotency_key"] = idempotency_key
    if callback_url is not None:
        record["callback_url"] = callback_url
        if callback_detail == "safe":  # absent: full, as every record before it
            record["callback_detail"] = callback_detail
    if split_key is not None:
        record["split_key"] = split_key
    return record


#: Counts in a record; every field whose name ends ``_at`` is a time (ms since the epoch).
#: The store keeps them as text (a Redis hash); callers read numbers.
_COUNTS = frozenset(("attempts", "callback_attempts"))
#: What callers read decoded from the JSON the store keeps.
_JSON_FIELDS = ("params", "result", "error", "previous_error")


def job_status(record: dict[str, str]) -> dict[str, Any]:
    """A stored record as callers read it: counts and times (``*_at``, ms since the epoch)
    integers, params, result and errors decoded (a field that is not what it should be, a
    record written by hand into the store, as the text it is: not a crash).

    ``error`` is what the job ended with, or while it has not ended, what its last attempt
    failed with: a job that succeeded after failed attempts has none (the store keeps the
    last failure, written when it was retried); that one is its ``previous_error``. A
    redriven job's store moved what it was dead-lettered with to ``previous_error``.

    A job that ended ``failed`` or ``dead`` has the error its result is (``ended_error``):
    final (not retryable, no ``retry_after``) and naming the state, whatever its last
    attempt said. Read here, every backend's records (and those stored before) say it:
    before, a dead job's record called its error retryable while its result did not.
    So does a redriven job's ``previous_error`` (the store keeps the dead letter's error
    as its last attempt raised it): it reads as the dead job's ``error`` read before the
    redrive, not as a retryable error of a job that runs again by itself."""
    status: dict[str, Any] = dict(record)
    for name, value in record.items():
        # ``…_bytes``: a listing row's size of a field it did not read (``_job_summaries``).
        if name in _COUNTS or name.endswith(("_at", "_bytes")):
            status[name] = _number(value)
    status.setdefault("attempts", 0)
    state = record.get("state")
    # Only a redrive writes ``previous_error`` to the store, and only a dead job is
    # redriven (every backend's dead letters are the ``dead`` ones); a success moves its
    # last attempt's error there here, which stays as that attempt said.
    dead_letter = "previous_error" in record
    if state == "succeeded" and "error" in status:
        status["previous_error"] = status.pop("error")
        dead_letter = False
    for field in _JSON_FIELDS:
        if field in status:
            with contextlib.suppress(orjson.JSONDecodeError):  # else kept as the text it is
                status[field] = orjson.loads(status[field])
    if state in ("failed", "dead") and "error" in status:
        status["error"] = _told_final(state, status["error"])
    if dead_letter:
        status["previous_error"] = _told_final("dead", status["previous_error"])
    return status


def _told_final(state: str, error: Any) -> Any:
    """A stored error object as ``ended_error`` tells it; anything else as it is."""
    if not (
        isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("message"), str)
    ):
        return error
    details = error.get("details")
    wire = {**error, "details": dict(details) if isinstance(details, dict) else None}
    return ended_error(state, wire).to_wire()


def _number(text: str) -> int | str:
    # At most 18 digits: within JSON encoders' 64-bit integers (the store's scripts take
    # no more for attempts either).
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else text


def job_outcome(record: dict[str, str]) -> Any:
    """A finished job's result, or raise its error (``ended_error``)."""
    state = record.get("state", "")
    field = "result" if state == "succeeded" else "error"
    try:
        stored = orjson.loads(record.get(field, "null"))
    except orjson.JSONDecodeError:  # not written by a worker: say so, typed
        raise ProviderError(
            f"job {record.get('id')}: its stored {field} is not JSON",
            details={"stage": "jobs", "state": state},
        ) from None
    if state == "succeeded":
        return stored
    raise ended_error(state, stored)


def ended_error(state: str, wire: object) -> DispatchError:
    """The error the result of a job that ended ``failed`` or ``dead`` is: its last
    attempt's (``wire``, as stored), a fresh exception of its own type, but final: not
    retryable and no ``retry_after``, whatever the attempt said, with ``details["state"]``
    saying how the job ended. Asking again answers the same (a dead job runs again only
    when redriven), so a client that retries a retryable error must not poll it for ever."""
    error = error_from_wire(wire, types=OWN_ERROR_TYPES)
    error.retryable = False
    error.retry_after = None
    error.details["state"] = state
    return error


def _attempts_of(record: dict[str, str]) -> int | None:
    try:
        return int(record.get("attempts", "1"))
    except ValueError:
        return None


def _moved(record: dict[str, str], placed: str | None) -> dict[str, str]:
    """The record's new ``version`` when the attempt ran elsewhere than it was placed (a
    rollout placed it again: ``Dispatcher._run_job``); none when it ran there."""
    version = record.get("version")
    return {} if version is None or version == placed else {"version": version}


def backoff(config: JobsConfig, attempt: int, retry_after: float | None) -> float:
    """Seconds before attempt ``attempt + 1``: doubling, capped, jittered (replicas that
    failed together do not retry together), never sooner than the target asked."""
    base = config.backoff_ms / 1000 * (2 ** min(attempt - 1, 30))
    delay = min(base, config.backoff_max_ms / 1000) * random.uniform(0.5, 1.0)
    return float(max(delay, retry_after or 0.0))


class JobWorkers:
    """``config.workers`` consumers of the job stream, owned by one dispatcher."""

    def __init__(
        self,
        store: JobStore,
        config: JobsConfig,
        run: RunJob,
        pause: float,
        *,
        egress: EgressPolicy | None = None,
        key_retention: float = 0.0,
    ) -> None:
        self.store = store
        self.pause = max(pause, 0.05)  # after Redis failed: the backend skips it this long
        #: Who POSTs a job's record to its ``callback_url`` when it ends: from the store's
        #: outbox (any replica's job, durable) when it keeps one, else once, best effort.
        self.callbacks = JobCallbacks(
            config, egress or EgressPolicy(), job_status, store.callbacks, pause=self.pause
        )
        self.config = config
        self.run = run
        self.visibility = config.visibility_timeout_ms / 1000
        self.result_ttl = config.result_ttl_ms / 1000
        #: How long a keyed submission's key answers its job (the state's idempotency
        #: retention): a keyed job's record is kept at least that long (``_kept_for``).
        self.key_retention = key_retention
        self._name = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._tasks: list[asyncio.Task[None]] = []
        self._taking = True
        #: ``deferred``: entries left for later because the store could not record a start.
        self.counts = {
            "succeeded": 0,
            "failed": 0,
            "dead": 0,
            "retried": 0,
            "malformed": 0,
            "deferred": 0,
        }
        self.running = 0
        #: Jobs ended and attempts retried by route (``plugin@version.method``, the version
        #: an attempt ran at), for telemetry: ``ROUTE_OUTCOMES`` each.
        self.by_route: dict[str, dict[str, int]] = {}
        #: The store's outages, logged as they begin and end rather than per failed poll:
        #: taking entries and recording runs apart, since one can fail while the other
        #: works (SQS jobs whose Redis job view is down) and a shared log would flap.
        self._queue_outage = OutageLog(log, "job workers (queue)")
        self._records_outage = OutageLog(log, "job workers (records)")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for number in range(self.config.workers):
            consumer = f"{self._name}-{number}"
            self._tasks.append(loop.create_task(self._consume(consumer), name=f"jobs {consumer}"))
        self.callbacks.start()

    def stop_taking(self) -> None:
        """Take no new entries (a drain): the jobs in flight go on."""
        self._taking = False

    async def aclose(self, grace: float = STOP_GRACE_SECONDS) -> None:
        self._taking = False
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                # Bounded too: a worker stuck where cancellation cannot reach must not
                # keep the dispatcher from closing (its entries return to the queue).
                _, stuck = await asyncio.wait(late, timeout=grace)
                if stuck:
                    log.error(
                        "%d job workers ignored their cancellation; closing anyway", len(stuck)
                    )
        self._tasks.clear()
        await self.callbacks.aclose()  # after the workers: no job ends after this

    async def _consume(self, consumer: str) -> None:
        grouped = False
        while self._taking:
            try:
                if not grouped:
                    await self.store.ensure_group()
                    grouped = True
                deliveries = await self.store.take(
                    consumer, self.config.batch, block=0.5, min_idle=self.visibility
                )
            except StateUnavailable as error:
                self._queue_outage.failed(f"worker {consumer}: {error.message}")
                grouped = False  # the stream may be gone with the Redis that restarted
                await asyncio.sleep(self.pause)
                continue
            self._queue_outage.recovered()
            if deliveries:
                await self._run_batch(consumer, deliveries)

    async def _run_batch(self, consumer: str, deliveries: list[Delivery]) -> None:
        """Run a batch's jobs at once while renewing this consumer's hold on the entries
        still running, every third of the visibility timeout: a job that outlives the
        timeout on a live worker is not taken over by another worker and run twice at once.
        An entry whose job ended (or was left for later) is no longer renewed."""
        running = {delivery.entry_id for delivery in deliveries}

        async def run(delivery: Delivery) -> None:
            try:
                await self._process(delivery)
            finally:
                running.discard(delivery.entry_id)

        keeper = asyncio.get_running_loop().create_task(
            self._keep(consumer, running), name=f"jobs {consumer} hold"
        )
        try:
            await asyncio.gather(*(run(delivery) for delivery in deliveries))
        finally:
            keeper.cancel()
            # Not suppress(CancelledError): that would swallow this task's own
            # cancellation (the dispatcher closing) arriving while it waits here.
            await asyncio.wait((keeper,))

    async def _keep(self, consumer: str, running: set[str]) -> None:
        while True:
            await asyncio.sleep(self.visibility / 3)
            if not running:
                continue
            try:
                await self.store.keep(consumer, sorted(running))
            except StateUnavailable as error:  # the next beat tries again
                self._queue_outage.failed(
                    f"worker {consumer} could not renew its hold: {error.message}"
                )

    async def _process(self, delivery: Delivery) -> None:
        try:
            await self._attempt(delivery)
        except StateUnavailable as error:
            # Nothing acked: the entry stays pending and is taken again after the
            # visibility timeout, by this worker or another.
            self.counts["deferred"] += 1
            self._records_outage.failed(
                f"job entry {delivery.entry_id} left for later: {error.message}"
            )
        except Exception:  # a bug must not end the consumer: the entry stays pending
            log.exception("job entry %s failed unexpectedly", delivery.entry_id)
        else:
            self._records_outage.recovered()

    async def _attempt(self, delivery: Delivery) -> None:
        store, entry = self.store, delivery.entry_id
        if delivery.job_id is None:
            self.counts["malformed"] += 1
            await store.finish(
                entry,
                f"entry-{entry}",
                self._dead(f"malformed stream entry {entry}: {delivery.raw}", 0),
                self.result_ttl,
            )
            return
        job_id = delivery.job_id
        record = await store.begin(delivery)
        if record is None or "plugin" not in record:
            self.counts["malformed"] += 1
            await store.finish(
                entry, job_id, self._dead(f"job {job_id} has no record", 0), self.result_ttl
            )
            return
        record["id"] = job_id  # what _ended and _failed name it by
        if record.get("state") in TERMINAL_STATES:  # already ended: only the ack was missing
            await store.finish(entry, job_id, {"state": record["state"]}, self._kept_for(record))
            return
        attempts = _attempts_of(record)
        if attempts is None:  # not a record a dispatcher wrote: nothing to count on
            self.counts["malformed"] += 1
            fields = self._dead(f"job {job_id} has an unreadable attempts count", 0)
            await self._ended(entry, record, fields)
            return
        if attempts > self.config.max_attempts:  # its workers died on it each time
            last = record.get("error")
            reason = "its worker was lost on every attempt" if last is None else "see last error"
            fields = self._dead(f"job {job_id} ran out of attempts: {reason}", attempts)
            if last is not None:
                fields["error"] = last
            self._count(record, "dead")
            await self._ended(entry, record, fields)
            return
        try:
            params = orjson.loads(record["params"])
        except (KeyError, orjson.JSONDecodeError):
            self.counts["malformed"] += 1
            fields = self._dead(f"job {job_id} has unreadable params", attempts)
            await self._ended(entry, record, fields)
            return
        placed = record.get("version")
        self.running += 1
        try:
            result = await self.run(record, params)
        except DispatchError as error:
            await self._failed(entry, record, attempts, error, _moved(record, placed))
            return
        except Exception as error:  # a host bug, not the plugin's answer: not retried
            log.exception("job %s failed unexpectedly", job_id)
            failure = ProviderError(f"job {job_id} failed in the dispatcher: {error!r:.200}")
            await self._failed(entry, record, attempts, failure, _moved(record, placed))
            return
        finally:
            self.running -= 1
        moved = _moved(record, placed)
        try:
            encoded = encode_json(result).decode()
        except DispatchError:  # a result that is not JSON: nothing to keep, no use retrying
            failure = ProviderError(f"job {job_id}: the result is not JSON", retryable=False)
            await self._failed(entry, record, attempts, failure, moved)
            return
        limit = self.config.max_result_bytes
        if len(encoded) > limit:  # kept in the store for result_ttl_ms: bounded like params
            too_large = ResultTooLarge(
                f"job {job_id}: the plugin's result is {len(encoded)} bytes as JSON, over"
                f" jobs.max_result_bytes = {limit}; it was not kept",
                details={"stage": "jobs", "limit": limit, "bytes": len(encoded)},
            )
            await self._failed(entry, record, attempts, too_large, moved)
            return
        fields = {"state": "succeeded", "result": encoded, "finished_at": _now_ms(), **moved}
        await self._ended(entry, record, fields)
        self._count(record, "succeeded")

    async def _ended(self, entry: str, record: dict[str, str], fields: dict[str, str]) -> None:
        """Store the job's end, with its pending callback if it asked for one (one atomic
        write: a worker that dies after it loses no callback); then have it delivered."""
        job_id = record["id"]
        url = record.get("callback_url")
        durable = url is not None and self.callbacks.durable
        if durable:
            fields = {
                **fields,
                "callback": "pending",
                "callback_id": new_delivery_id(),  # one per end: a redriven job's is new
                "callback_attempts": "0",
            }
        await self.store.finish(entry, job_id, fields, self._kept_for(record))
        if durable:
            self.callbacks.wake()
        elif url is not None:
            self.callbacks.send(url, job_status({**record, **fields}))

    async def _failed(
        self,
        entry: str,
        record: dict[str, str],
        attempts: int,
        error: DispatchError,
        moved: dict[str, str],
    ) -> None:
        """Store a failed attempt: to be retried, or the job's end. ``moved``: the version
        the attempt ran at, when a rollout placed it elsewhere than the record said."""
        job_id = record["id"]
        # error_response's wire: details JSON cannot carry (a plugin's NaN) left out, not
        # the failure (storing it raised, and the job was lost to its lease).
        wire = encode_json(error_response(error)["error"]).decode()
        if error.retryable and attempts < self.config.max_attempts:
            delay = backoff(self.config, attempts, error.retry_after)
            fields = {"state": "retrying", "error": wire, **moved}
            await self.store.retry_later(entry, job_id, fields, delay)
            self._count({**record, **moved}, "retried")
            return
        state = "dead" if error.retryable else "failed"
        fields = {"state": state, "error": wire, "finished_at": _now_ms(), **moved}
        await self._ended(entry, record, fields)
        self._count({**record, **moved}, state)

    def _kept_for(self, record: dict[str, str]) -> float:
        """Seconds an ended job's record is kept: ``result_ttl_ms``, and for a job submitted
        with an idempotency key at least as long as the key answers with its id. A shorter
        ``result_ttl_ms`` (to spare Redis) left a resubmission within the retention answered
        an id that no longer existed, then ``JobExpired``; kept, it is answered the job."""
        if record.get("idempotency_key") is None:
            return self.result_ttl
        return max(self.result_ttl, self.key_retention)

    def _count(self, record: dict[str, str], outcome: str) -> None:
        """Count ``outcome`` in all and for the record's route. Routes past
        ``MAX_COUNTED_ROUTES`` share one row: records are read from a store others may
        write, and each name would be a series of the host's metrics."""
        self.counts[outcome] += 1
        route = f"{record.get('plugin')}@{record.get('version')}.{record.get('method')}"
        counts = self.by_route.get(route)
        if counts is None:
            if len(self.by_route) >= MAX_COUNTED_ROUTES:
                route = OTHER_ROUTES
                counts = self.by_route.get(route)
            if counts is None:
                counts = self.by_route[route] = dict.fromkeys(ROUTE_OUTCOMES, 0)
        counts[outcome] += 1

    @staticmethod
    def _dead(message: str, attempts: int) -> dict[str, str]:
        error = ProviderError(message, details={"stage": "jobs"})
        return {
            "state": "dead",
            "error": encode_json(error.to_wire()).decode(),
            "attempts": str(attempts),
            "finished_at": _now_ms(),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "workers": len(self._tasks),
            "running": self.running,
            **self.counts,
            "routes": {route: dict(counts) for route, counts in self.by_route.items()},
            "callbacks": self.callbacks.stats(),
        }

    def __repr__(self) -> str:
        return f"<JobWorkers {self._name} workers={len(self._tasks)} running={self.running}>"
