"""Async jobs on Amazon SQS (``jobs: {backend: sqs}``, ``dispatcher.state.sqs_jobs``),
against moto's server as a real process (``tests/sqs_support.py``) through aiobotocore.

The job view is on a real Redis (``state: {backend: redis}``), as a user who wants
``d.result`` configures it; one test runs without it. The plugin
(``tests/plugins/job_plugin.py``) counts its runs on Redis, so a count says how often a job
really ran, whichever process ran it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, JobNotFound, JobsUnavailable, ResultTooLarge
from dispatcher._jobs import ended_error, job_status
from dispatcher.config import ManifestError, load_manifest
from dispatcher.state import JobTooLarge, StateUnavailable
from linchkit_plugin.errors import InvalidParams, PluginError, TargetUnavailable
from tests.services import CLEAN_ENVIRONMENT, Redis
from tests.sqs_support import CREDENTIALS, REGION, SECRET, Moto, Queues

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"


def manifest_file(
    folder: Path,
    moto: Moto,
    queues: Queues,
    url: str,
    prefix: str,
    *,
    view: bool = True,
    state_url: str | None = None,
    sqs: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    **jobs: Any,
) -> Path:
    path = folder / f"plugins-{len(list(folder.iterdir()))}.yaml"
    document: dict[str, Any] = {
        "version": 1,
        "jobs": {
            "backend": "sqs",
            "sqs": {
                "queue_name": queues.name,
                "dead_letter_queue_name": queues.dead_name,
                "region": REGION,
                "endpoint_url": moto.url,
                "receive_wait_seconds": 1,
                "op_timeout_ms": 2000,
                **(sqs or {}),
            },
            "backoff_ms": 10,
            "backoff_max_ms": 50,
            **jobs,
        },
        "plugins": [
            {
                "id": "jobs",
                "version": "1.0.0",
                "config": {"url": url, "prefix": prefix},
                "target": {
                    "provider": "local",
                    "entrypoint": "job_plugin:JobPlugin",
                    "path": str(PLUGINS),
                },
                "methods": {
                    "work": {"timeout_ms": 1000},
                    "slow": {"timeout_ms": 60_000},
                    "busy": {},
                    "refuse": {},
                    "echo": {},
                },
            }
        ],
    }
    if view:
        document["state"] = {
            "backend": "redis",
            "url": state_url or url,
            "key_prefix": prefix,
            "op_timeout_ms": 1000,
            "retry_after_ms": 200,
            **(state or {}),
        }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


async def until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        await asyncio.sleep(0.05)


async def eventually(read: Any, what: str, timeout: float = 30.0) -> Any:
    """``await read()`` until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := await read()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        await asyncio.sleep(0.1)
    return value


async def counter(url: str, key: str) -> int:
    async with aioredis.Redis.from_url(url) as client:
        return int(await client.get(key) or 0)


@pytest.fixture
def queues(sqs_server: Moto, aws_credentials: dict[str, str]) -> Queues:
    return Queues(sqs_server)


@pytest.fixture
def make(
    tmp_path: Path, sqs_server: Moto, queues: Queues, redis_server: Redis, redis_prefix: str
) -> Any:
    def dispatcher(**settings: Any) -> Dispatcher:
        path = manifest_file(
            tmp_path, sqs_server, queues, redis_server.url, redis_prefix, **settings
        )
        return Dispatcher(load_manifest(path))

    return dispatcher


# -- what a job does ------------------------------------------------------------------------


async def test_a_job_runs_end_to_end_and_its_message_is_deleted(make: Any, queues: Queues) -> None:
    async with make(workers=2) as d:
        job_id = await d.submit("jobs", "work", {"n": 7}, caller="billing")
        assert (await d.job(job_id))["state"] in ("queued", "running", "succeeded")
        assert await d.result(job_id, wait=30) == {"n": 7, "runs": 1}
        record = await d.job(job_id)
        assert (record["state"], record["attempts"], record["caller"]) == (
            "succeeded",
            1,
            "billing",
        )
        assert record["params"] == {"n": 7}
        assert int(record["finished_at"]) >= int(record["submitted_at"])
        # Its caller reads it through the job view on Redis; another caller finds none.
        assert await d.job_for(job_id, "billing") == record
        with pytest.raises(JobNotFound):
            await d.job_for(job_id, None)
        # The record is written before the message is deleted: the count follows.
        await until(lambda: d.stats()["jobs"]["succeeded"] == 1, "the count of successes")
        assert d.stats()["state"]["jobs"]["backend"] == "sqs"
    assert queues.count(queues.url) == 0
    assert queues.count(queues.dead_url) == 0


async def test_a_job_failing_retryably_is_dead_lettered_then_redriven_then_purged(
    make: Any, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    async with make(workers=1, max_attempts=3) as d:
        job_id = await d.submit("jobs", "busy")
        with pytest.raises(TargetUnavailable, match="always busy"):
            await d.result(job_id, wait=60)
        record = await d.job(job_id)
        assert (record["state"], record["attempts"]) == ("dead", 3)
        assert await counter(redis_server.url, f"{redis_prefix}:effects:busy") == 3
        # The dead letter is on the dead-letter queue, with the error it died of.
        [letter] = [json.loads(body) for body in queues.bodies(queues.dead_url)]
        assert (letter["id"], letter["state"]) == (job_id, "dead")
        assert json.loads(letter["error"])["message"] == "always busy"
        assert queues.count(queues.url) == 0
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert [each["id"] for each in await store.dead(10)] == [job_id]
        assert await store.redrive(job_id)
        assert not await store.redrive(job_id)  # no longer on the dead-letter queue
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=60)  # three attempts again: SQS counts from one
        assert (await d.job(job_id))["attempts"] == 3
        assert await counter(redis_server.url, f"{redis_prefix}:effects:busy") == 6
        assert await store.purge() == 1
        assert await store.dead(10) == []
        assert queues.count(queues.dead_url) == 0
        with pytest.raises(JobNotFound):
            await d.job(job_id)


async def test_a_redriven_job_waits_with_its_dead_letter_error_as_previous_error(
    make: Any, queues: Queues
) -> None:
    """As on the Redis stream: queued again, its ``error`` is gone from the record and the
    message (what it was dead-lettered with is its ``previous_error``), and so is its end."""
    async with make(workers=1, max_attempts=1) as d:
        job_id = await d.submit("jobs", "busy")
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=60)
        dead = await d.job(job_id)
    async with make() as d:  # no worker: redriven, it waits on the queue
        assert await d.state_backend.jobs.redrive(job_id)  # type: ignore[union-attr]
        record = await d.job(job_id)
    assert (record["state"], record["attempts"]) == ("queued", 0)
    assert "error" not in record and "finished_at" not in record
    # The dead record told its error final (not retryable, state dead), and so does its
    # previous_error (before, the last attempt's as it was stored: "retryable": true).
    assert dead["error"]["retryable"] is False and dead["error"]["details"]["state"] == "dead"
    assert record["previous_error"] == dead["error"]
    [message] = [json.loads(body) for body in queues.bodies(queues.url)]
    assert "error" not in message  # the message carries it as stored, read final
    assert ended_error("dead", json.loads(message["previous_error"])).to_wire() == dead["error"]


async def test_a_redrive_after_the_view_lost_the_record_lets_the_worker_make_it_again(
    make: Any, redis_server: Redis, redis_prefix: str
) -> None:
    """The job view's record gone (expired, a Redis restarted empty) while the message
    waits on the dead-letter queue: the redrive writes no partial record (state and
    attempts only, which the worker took for a record and never filled), so the worker
    makes it again from the message, as for any record it does not find."""
    async with make(workers=1, max_attempts=1) as d:
        job_id = await d.submit("jobs", "busy")
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=60)
    async with aioredis.Redis.from_url(redis_server.url) as client:
        [key] = [k async for k in client.scan_iter(f"{redis_prefix}*:job:{job_id}")]
        await client.delete(key)
        async with make() as d:
            assert await d.state_backend.jobs.redrive(job_id)  # type: ignore[union-attr]
        assert await client.exists(key) == 0  # no partial record
    async with make(workers=1, max_attempts=1) as d:

        async def ended_again() -> dict[str, Any] | None:
            try:
                record = await d.job(job_id)
            except JobNotFound:  # until the worker takes the message
                return None
            return record if record["state"] == "dead" else None

        record = await eventually(ended_again, "the job dead-lettered again")
    assert (record["plugin"], record["method"], record["params"]) == ("jobs", "busy", {})


async def test_without_a_job_view_a_redriven_message_carries_previous_error(
    tmp_path: Path, sqs_server: Moto, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    """The message is the whole record there: redriven, it carries the error it was
    dead-lettered with as ``previous_error``, and its next dead letter both."""

    def bare(**jobs: Any) -> Dispatcher:
        path = manifest_file(
            tmp_path, sqs_server, queues, redis_server.url, redis_prefix, view=False, **jobs
        )
        return Dispatcher(load_manifest(path))

    async with bare(workers=1, max_attempts=1) as d:
        job_id = await d.submit("jobs", "busy")
        store = d.state_backend.jobs  # type: ignore[union-attr]
        [dead] = await eventually(lambda: store.dead(10), "a dead letter")
    assert dead["id"] == job_id and json.loads(dead["error"])["message"] == "always busy"
    async with bare() as d:  # no worker: redriven, it waits on the queue
        assert await d.state_backend.jobs.redrive(job_id)  # type: ignore[union-attr]
    [message] = [json.loads(body) for body in queues.bodies(queues.url)]
    assert (message["state"], message["attempts"]) == ("queued", "0")
    assert "error" not in message and message["previous_error"] == dead["error"]
    # Read once above: SQS counts that receive, so the worker has room for one more.
    async with bare(workers=1, max_attempts=3) as d:
        store = d.state_backend.jobs  # type: ignore[union-attr]
        [again] = await eventually(lambda: store.dead(10), "a dead letter")
    assert json.loads(again["error"])["message"] == "always busy"
    assert again["previous_error"] == dead["error"]
    # As ``dispatcher dlq list`` reads them: the error it was dead-lettered with first is
    # told as that dead letter told it (final), not as its last attempt raised it.
    told = job_status(again)["previous_error"]
    assert told == job_status(dead)["error"]
    assert (told["retryable"], told["details"]["state"]) == (False, "dead")


async def test_a_non_retryable_error_ends_the_job_failed_at_once(make: Any, queues: Queues) -> None:
    async with make(workers=1) as d:
        job_id = await d.submit("jobs", "refuse")
        with pytest.raises(PluginError, match="no such account"):
            await d.result(job_id, wait=30)
        assert ((await d.job(job_id))["state"], (await d.job(job_id))["attempts"]) == ("failed", 1)
    assert queues.count(queues.dead_url) == 0


async def test_a_result_over_max_result_bytes_is_read_back_as_the_error_raised(
    make: Any, queues: Queues
) -> None:
    """As on the Redis stream: the job fails ``result_too_large`` and its record, result and
    the final error rebuilt from it are the dispatcher's own class with its details
    (before, a ``PluginError`` whose remote type was "result_too_large")."""
    async with make(workers=1, max_result_bytes=1000) as d:
        job_id = await d.submit("jobs", "echo", {"text": "x" * 2000})
        with pytest.raises(ResultTooLarge, match="max_result_bytes = 1000") as caught:
            await d.result(job_id, wait=60)
        status = await d.job(job_id)
    expected = {"stage": "jobs", "state": "failed", "limit": 1000, "bytes": 2002}
    assert (caught.value.details, caught.value.retryable) == (expected, False)
    assert (status["state"], status["error"]["details"]) == ("failed", expected)
    assert isinstance(ended_error("failed", status["error"]), ResultTooLarge)
    assert queues.count(queues.dead_url) == 0  # failed, not dead-lettered


async def test_a_redelivered_message_of_an_ended_job_is_only_deleted(
    make: Any, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    """A worker dead-lettered the job and wrote its end, then died before the delete: the
    message comes back, and must not run, nor reach the dead-letter queue a second time."""
    async with make() as submitter:
        job_id = await submitter.submit("jobs", "work", {"n": 41})
        taken = queues.moto.client().receive_message(QueueUrl=queues.url, VisibilityTimeout=1)
        assert len(taken["Messages"]) == 1  # on the worker that is about to die
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.hset(f"{redis_prefix}:job:{job_id}", mapping={"state": "dead"})
    async with make(workers=1) as worker:
        await until(lambda: worker.stats()["state"]["jobs"]["requests"] > 0, "a receive")
        await eventually(
            lambda: asyncio.to_thread(lambda: queues.count(queues.url) == 0), "a delete"
        )
        assert (await worker.job(job_id))["state"] == "dead"
    assert await counter(redis_server.url, f"{redis_prefix}:effects:41") == 0
    assert queues.count(queues.dead_url) == 0


async def test_fifo_queues_run_retry_dead_letter_and_redrive_jobs(
    tmp_path: Path,
    sqs_server: Moto,
    aws_credentials: dict[str, str],
    redis_server: Redis,
    redis_prefix: str,
) -> None:
    queues = Queues(sqs_server, fifo=True)
    path = manifest_file(
        tmp_path, sqs_server, queues, redis_server.url, redis_prefix, workers=1, max_attempts=2
    )
    async with Dispatcher(load_manifest(path)) as d:
        done = await d.submit("jobs", "work", {"n": 51})
        dead = await d.submit("jobs", "busy")
        assert await d.result(done, wait=30) == {"n": 51, "runs": 1}
        with pytest.raises(TargetUnavailable):
            await d.result(dead, wait=60)
        assert (await d.job(dead))["attempts"] == 2
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert await store.redrive(dead)  # within SQS's 5-minute deduplication window
        with pytest.raises(TargetUnavailable):
            await d.result(dead, wait=60)
        assert await counter(redis_server.url, f"{redis_prefix}:effects:busy") == 4


# -- hostile input ----------------------------------------------------------------------------


async def test_malformed_messages_are_dead_lettered_as_they_came_and_the_worker_goes_on(
    make: Any, queues: Queues
) -> None:
    client = queues.moto.client()
    hostile = [
        "not json at all",
        json.dumps({"id": "x", "plugin": "jobs"}),  # not a whole job
        json.dumps(
            {"id": "y" * 500, "plugin": "jobs", "version": "1", "method": "work", "params": "{}"}
        ),  # an id no job has
        json.dumps([1, 2, 3]),
        json.dumps(
            {"id": "z", "plugin": "jobs", "version": "1", "method": "work", "params": {"n": 1}}
        ),  # params not as submit writes them
    ]
    for body in hostile:
        client.send_message(QueueUrl=queues.url, MessageBody=body)
    async with make(workers=1) as d:
        job_id = await d.submit("jobs", "work", {"n": 11})
        assert await d.result(job_id, wait=30) == {"n": 11, "runs": 1}

        await until(lambda: d.stats()["jobs"]["malformed"] == len(hostile), "dead letters")
        await until(lambda: d.stats()["state"]["jobs"]["held"] == 0, "deletes")
    assert sorted(queues.bodies(queues.dead_url)) == sorted(hostile)
    assert queues.count(queues.url) == 0


async def test_oversized_params_are_refused_at_submit_typed_and_nothing_is_sent(
    make: Any, queues: Queues
) -> None:
    async with make(sqs={"max_message_bytes": 4096}) as d:
        with pytest.raises(JobTooLarge, match="4096-byte limit") as caught:
            await d.submit("jobs", "work", {"n": 1, "blob": "x" * 5000})
        assert isinstance(caught.value, InvalidParams)
        assert not caught.value.retryable
        assert caught.value.to_wire()["type"] == "invalid_params"
    async with make() as d:  # SQS's own 256 KiB, counted on the escaped body
        with pytest.raises(JobTooLarge):
            await d.submit("jobs", "work", {"n": 1, "blob": "\u00e9" * 50_000})
    assert queues.count(queues.url) == 0


async def test_text_sqs_would_refuse_raw_travels_escaped(make: Any) -> None:
    # U+FFFF and U+0000 are outside the characters SQS takes in a message body.
    tricky = '\uffff\x00\ud7ff\U0001f600 é " \\'
    async with make(workers=1) as d:
        job_id = await d.submit("jobs", "echo", {"text": tricky})
        assert await d.result(job_id, wait=30) == tricky
        assert (await d.job(job_id))["params"] == {"text": tricky}


async def test_a_redelivered_keyed_job_whose_outcome_is_recorded_does_not_run_again(
    make: Any, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    """A worker received the message, ran the keyed call (its outcome recorded under the
    key) and died before the delete: the worker that receives it next must not run it."""
    async with make() as submitter:
        job_id = await submitter.submit("jobs", "work", {"n": 3}, idempotency_key="order-3")
        taken = queues.moto.client().receive_message(QueueUrl=queues.url, VisibilityTimeout=2)
        assert len(taken["Messages"]) == 1  # in flight on a worker that will never delete it
        # What the dead worker did before dying: the keyed call through the chain.
        first = await submitter.call("jobs", "work", {"n": 3}, idempotency_key="order-3")
        assert first == {"n": 3, "runs": 1}
    async with make(workers=2, visibility_timeout_ms=2000) as worker:
        assert await worker.result(job_id, wait=30) == {"n": 3, "runs": 1}
        # One attempt on the view: the dead worker's receive is all this test did of it.
        assert (await worker.job(job_id))["attempts"] == 1
        assert await counter(redis_server.url, f"{redis_prefix}:effects:3") == 1
        # A duplicate submission with the same key: a second job, the same single run.
        again = await worker.submit("jobs", "work", {"n": 3}, idempotency_key="order-3")
        assert await worker.result(again, wait=30) == {"n": 3, "runs": 1}
        assert await counter(redis_server.url, f"{redis_prefix}:effects:3") == 1


# -- the job view -------------------------------------------------------------------------------


async def test_without_a_job_view_jobs_still_run_and_the_view_is_refused_clearly(
    tmp_path: Path, sqs_server: Moto, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    path = manifest_file(
        tmp_path,
        sqs_server,
        queues,
        redis_server.url,
        redis_prefix,
        view=False,
        workers=1,
        max_attempts=1,
    )
    async with Dispatcher(load_manifest(path)) as d:
        job_id = await d.submit("jobs", "work", {"n": 21})
        with pytest.raises(JobsUnavailable, match="backend: redis"):
            await d.job(job_id)
        with pytest.raises(JobsUnavailable, match="SQS cannot be read by job id"):
            await d.result(job_id, wait=1)
        await eventually(lambda: counter(redis_server.url, f"{redis_prefix}:effects:21"), "a run")
        assert await counter(redis_server.url, f"{redis_prefix}:effects:21") == 1
        dead_id = await d.submit("jobs", "busy")
        store = d.state_backend.jobs  # type: ignore[union-attr]
        await eventually(lambda: store.dead(10), "a dead letter")
        # Without records, the dead-letter queue itself is read.
        assert [each["id"] for each in await store.dead(10)] == [dead_id]
        assert await store.redrive(dead_id)


async def test_purge_empties_a_dead_letter_queue_of_many_batches(make: Any, queues: Queues) -> None:
    client = queues.moto.client()
    for number in range(25):  # more than one receive's worth (10)
        client.send_message(QueueUrl=queues.dead_url, MessageBody=f"letter {number}")
    async with make() as d:
        store = d.state_backend.jobs  # type: ignore[union-attr]
        assert await store.redrive("no-such-job") is False  # scanned, all put back
        assert queues.count(queues.dead_url) == 25
        assert await store.purge() == 25
    assert queues.count(queues.dead_url) == 0


# -- the manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqs", "message"),
    [
        ({"queue_name": "q"}, "dead_letter_queue"),
        (
            {"queue_name": "q", "queue_url": "http://x/q", "dead_letter_queue_name": "d"},
            "exactly one of 'queue_url' and 'queue_name'",
        ),
        (
            {"queue_name": "q", "dead_letter_queue_name": "d", "endpoint_url": "ftp://x"},
            "http:// or https://",
        ),
        ({"queue_name": "bad name!", "dead_letter_queue_name": "d"}, "queue_name"),
        ({"queue_name": "q", "dead_letter_queue_name": "d", "region": "us-east-1\nX"}, "region"),
        ({"queue_name": "q", "dead_letter_queue_name": "d", "access_key": "AKIA"}, "access_key"),
        ({"queue_name": "q", "dead_letter_queue_name": "d", "receive_wait_seconds": 21}, "20"),
    ],
)
def test_the_sqs_section_is_checked_when_the_manifest_loads(
    tmp_path: Path, sqs: dict[str, Any], message: str
) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "jobs": {"backend": "sqs", "sqs": sqs}}))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


SQS_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012"


@pytest.mark.parametrize(
    ("field", "url", "message"),
    [
        ("endpoint_url", "http://svc:pw-Zq81secret@127.0.0.1:5000", "no user or password"),
        ("queue_url", f"https://pw-Zq81secret@{SQS_URL[8:]}/jobs", "no user or password"),
        ("dead_letter_queue_url", f"{SQS_URL}/dead\nX-Zq81secret", "line breaks"),
        ("queue_url", f"{SQS_URL}/jobs Zq81secret", "spaces"),
        ("endpoint_url", "http://127.0.0.1:99999", "between 1 and 65535"),
        ("queue_url", "https://u:Zq81secret@sqs.eu-west-1.amazonaws.com:0/1/q", "1 and 65535"),
        ("queue_url", f"{SQS_URL}/jobs?Zq81secret=1", "no query or fragment"),
        ("dead_letter_queue_url", f"{SQS_URL}/dead#Zq81secret", "no query or fragment"),
        ("endpoint_url", "ftp://Zq81secret.example/", "http:// or https://"),
        ("queue_url", "https://[Zq81secret/1/q", "http:// or https://"),
    ],
)
def test_an_sqs_url_that_would_not_be_sent_as_written_is_refused_without_quoting_it(
    tmp_path: Path, field: str, url: str, message: str
) -> None:
    """They loaded: a URL's password (never used: AWS credentials come from their chain)
    or a port past 65535 failed every request, and a line break or a query in a queue's
    URL went to SQS as part of it."""
    sqs = {"queue_name": "q", "dead_letter_queue_name": "d"}
    sqs.pop(field.replace("_url", "_name"), None)  # a queue by URL is not also by name
    path = tmp_path / "plugins.yaml"
    path.write_text(
        json.dumps({"version": 1, "jobs": {"backend": "sqs", "sqs": {**sqs, field: url}}})
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    (problem,) = caught.value.problems
    assert problem.path == f"jobs.sqs.{field}"
    assert message in problem.message
    assert "Zq81secret" not in str(caught.value)


def test_sqs_urls_as_aws_writes_them_load(tmp_path: Path) -> None:
    sqs = {
        "queue_url": f"{SQS_URL}/jobs.fifo",
        "dead_letter_queue_url": f"{SQS_URL}/dead",
        "endpoint_url": "https://vpce-1a2b.sqs.eu-west-1.vpce.amazonaws.com:443",
    }
    path = tmp_path / "plugins.yaml"
    path.write_text(json.dumps({"version": 1, "jobs": {"backend": "sqs", "sqs": sqs}}))
    assert load_manifest(path).jobs.sqs is not None


def test_an_sqs_section_without_the_sqs_backend_and_the_reverse_are_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plugins.yaml"
    sqs = {"queue_name": "q", "dead_letter_queue_name": "d"}
    path.write_text(json.dumps({"version": 1, "jobs": {"sqs": sqs}}))
    with pytest.raises(ManifestError, match="backend: sqs"):
        load_manifest(path)
    path.write_text(json.dumps({"version": 1, "jobs": {"backend": "sqs"}}))
    with pytest.raises(ManifestError, match="needs a 'sqs' section"):
        load_manifest(path)
    too_long = {"backend": "sqs", "sqs": sqs, "visibility_timeout_ms": 43_200_001}
    path.write_text(json.dumps({"version": 1, "jobs": too_long}))
    with pytest.raises(ManifestError, match="12 hours"):
        load_manifest(path)
    # Workers without a state Redis are fine on SQS: the queue is durable by itself.
    path.write_text(
        json.dumps({"version": 1, "jobs": {"backend": "sqs", "sqs": sqs, "workers": 2}})
    )
    assert load_manifest(path).jobs.workers == 2


def test_the_aws_sdk_is_loaded_only_when_a_queue_opens() -> None:
    code = (
        "import sys, dispatcher, dispatcher.state.sqs_jobs\n"
        "from dispatcher.state import new_backend\n"
        "from dispatcher.config import JobsConfig, StateConfig\n"
        "jobs = JobsConfig(backend='sqs', sqs={'queue_name': 'q', 'dead_letter_queue_name': 'd'})\n"
        "new_backend(StateConfig(), lambda: 0.0, jobs)\n"
        "print(sorted({'aiobotocore', 'botocore', 'boto3'} & set(sys.modules)))"
    )
    ran = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert ran.stdout.strip() == "[]"


# -- SQS going away ----------------------------------------------------------------------------


async def test_an_sqs_that_dies_fails_submit_typed_in_time_and_workers_recover(
    tmp_path: Path,
    own_sqs_server: Moto,
    aws_credentials: dict[str, str],
    redis_server: Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    moto = own_sqs_server
    queues = Queues(moto)
    path = manifest_file(tmp_path, moto, queues, redis_server.url, redis_prefix, workers=2)
    async with Dispatcher(load_manifest(path)) as d:
        first = await d.submit("jobs", "work", {"n": 1})
        assert await d.result(first, wait=30) == {"n": 1, "runs": 1}
        moto.stop()  # SIGKILL, mid-run: the workers are polling
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await d.submit("jobs", "work", {"n": 2})
        assert time.monotonic() - started < 2 + 5  # op_timeout_ms 2000, and slack
        assert caught.value.retryable
        assert SECRET not in str(caught.value)
        await asyncio.sleep(1.5)  # the workers meet the outage, and back off
        moto.start()  # moto keeps nothing: the queues are made again
        queues.create()
        deadline = time.monotonic() + 30
        while True:
            try:
                again = await d.submit("jobs", "work", {"n": 3})
                break
            except StateUnavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        assert await d.result(again, wait=30) == {"n": 3, "runs": 1}
        assert d.stats()["state"]["jobs"]["failures"] >= 1
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "job worker" in logged  # the workers said what happened
    assert SECRET not in logged


class LyingEndpoint:
    """An "SQS" on loopback that answers garbage with a 200, or takes the request and never
    answers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""
        self.requests = 0

    async def __aenter__(self) -> LyingEndpoint:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.requests += 1
        await reader.readuntil(b"\r\n\r\n")
        if self.mode == "garbage":
            body = b"\x00not json, not xml{{{"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            writer.close()
        else:
            await reader.read()  # until the client gives up and closes


@pytest.mark.parametrize("mode", ["garbage", "hang"])
async def test_an_sqs_that_lies_or_hangs_fails_submit_typed_in_time_and_workers_live_on(
    tmp_path: Path,
    aws_credentials: dict[str, str],
    redis_server: Redis,
    redis_prefix: str,
    mode: str,
) -> None:
    async with LyingEndpoint(mode) as endpoint:
        fake = Moto(tmp_path)
        fake.url = endpoint.url
        names = type("Names", (), {"name": "jobs", "dead_name": "jobs-dead"})()
        path = manifest_file(
            tmp_path, fake, names, redis_server.url, redis_prefix, workers=2,
            sqs={"op_timeout_ms": 500},
        )  # fmt: skip
        async with Dispatcher(load_manifest(path)) as d:
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match="job queue") as caught:
                await d.submit("jobs", "work", {"n": 1})
            assert time.monotonic() - started < 0.5 + 5
            assert caught.value.retryable
            await until(lambda: endpoint.requests >= 3, "the workers' attempts")
            assert d.jobs is not None
            assert all(not task.done() for task in d.jobs._tasks)  # backing off, not dead


async def test_receives_while_the_views_redis_is_down_do_not_use_up_attempts(
    tmp_path: Path,
    sqs_server: Moto,
    queues: Queues,
    own_redis: Redis,
    redis_server: Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQS counts every receive; a worker that could not record a start ran nothing, so the
    job must still have all its attempts when the view's Redis is back (empty, here)."""
    caplog.set_level(logging.WARNING, logger="dispatcher.jobs")

    def manifest(**jobs: Any) -> Path:
        return manifest_file(
            tmp_path, sqs_server, queues, redis_server.url, redis_prefix,
            state_url=own_redis.url, max_attempts=2, visibility_timeout_ms=1000, **jobs,
        )  # fmt: skip

    async with Dispatcher(load_manifest(manifest())) as submitter:
        job_id = await submitter.submit("jobs", "work", {"n": 61})
    own_redis.stop()
    async with Dispatcher(load_manifest(manifest(workers=1))) as worker:
        # Received again and again (each a failed start, left for later) while the view is
        # down: more receives than max_attempts allows.
        # (The worker's own count: a probe of SQS's receive count races the worker for the
        # moments the message is visible, and lost for 20-50 s at a time.)
        await until(lambda: worker.stats()["jobs"]["deferred"] >= 4, "receives", timeout=60)
        own_redis.start()  # empty: the worker makes the record again from the message
        await eventually(lambda: counter(redis_server.url, f"{redis_prefix}:effects:61"), "a run")
        assert await worker.result(job_id, wait=60) == {"n": 61, "runs": 1}
        assert (await worker.job(job_id))["attempts"] == 1
    assert queues.count(queues.dead_url) == 0
    # The outage is logged as it began and ended, not once per receive: taking from SQS
    # kept working meanwhile, and must not have read as the view's Redis coming back.
    lines = [record.getMessage() for record in caplog.records]
    assert sum("left for later" in line for line in lines) == 1
    assert sum(line.startswith("job workers (records): working again") for line in lines) == 1


# -- crashes ------------------------------------------------------------------------------------


class WorkerProcess:
    """A dispatcher process running job workers (``tests/job_worker.py``)."""

    def __init__(self, manifest: Path) -> None:
        self.stderr = manifest.parent / f"worker-{time.monotonic_ns()}.stderr"
        with self.stderr.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "job_worker.py"), str(manifest)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**CLEAN_ENVIRONMENT, **CREDENTIALS, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 120)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.kill()
            raise AssertionError(f"worker did not start:\n{self.stderr.read_text()[-3000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.close_pipes()

    def end(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # EOF: a clean stop
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


async def test_a_job_whose_worker_is_sigkilled_mid_run_becomes_visible_again_and_completes(
    tmp_path: Path, sqs_server: Moto, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    url = redis_server.url
    settings = {"workers": 1, "visibility_timeout_ms": 2000}
    manifest = manifest_file(tmp_path, sqs_server, queues, url, redis_prefix, **settings)
    submitter_file = manifest_file(tmp_path, sqs_server, queues, url, redis_prefix)
    async with Dispatcher(load_manifest(submitter_file)) as submitter:
        job_id = await submitter.submit("jobs", "slow", {"n": 31, "seconds": 3600})
        victim = WorkerProcess(manifest)
        try:
            deadline = time.monotonic() + 60
            while not await counter(url, f"{redis_prefix}:started:31"):
                assert time.monotonic() < deadline, victim.stderr.read_text()[-3000:]
                await asyncio.sleep(0.1)
            assert (await submitter.job(job_id))["state"] == "running"
        finally:
            victim.kill()  # mid-job: its message is neither deleted nor rescheduled
        rescuer = WorkerProcess(manifest)
        try:
            # The message comes back after its visibility timeout (2 s); the second start
            # goes straight on.
            assert await submitter.result(job_id, wait=60) == {"n": 31, "runs": 1}
            record = await submitter.job(job_id)
            assert (record["state"], record["attempts"]) == ("succeeded", 2)
            assert await counter(url, f"{redis_prefix}:started:31") == 2
        finally:
            rescuer.end()


async def test_a_job_outliving_the_visibility_timeout_on_a_live_worker_runs_once(
    make: Any, redis_server: Redis, redis_prefix: str
) -> None:
    """Its worker keeps the message invisible while it runs (a heartbeat), so the other
    replica's worker never receives it during the 3 s it takes (the timeout is 1 s)."""
    settings = {"workers": 1, "visibility_timeout_ms": 1000}
    async with make(**settings) as first, make(**settings) as second:
        job_id = await first.submit("jobs", "slow", {"n": 32, "seconds": 3.0})
        assert await second.result(job_id, wait=60) == {"n": 32, "runs": 1}
        assert await counter(redis_server.url, f"{redis_prefix}:started:32") == 1
        assert (await first.job(job_id))["attempts"] == 1


#: Enough that each kill finds jobs in flight on its victim (three workers take 40 at a time
#: each, the first kill comes after 80 have ended) and that a lost job would show; the
#: queue is a moto server, a Python process answering ~150 requests/s here: 1,000 jobs
#: were 60-130 s of the suite and a minute of its CPU. The Redis jobs' test runs 10,000.
CHURN_JOBS = 400


async def _left_behind(
    client: aioredis.Redis, prefix: str, ids: list[str], states: list[str], queues: Queues
) -> str:
    """What there is to know of the jobs that did not end: their records, and what the
    queue still holds."""
    counts = {state: states.count(state) for state in set(states)}
    lines = [f"not every job ended: {counts}; messages on the queue: {queues.count(queues.url)}"]
    for job_id, state in zip(ids, states, strict=True):
        if state not in ("succeeded", "dead") and len(lines) < 11:
            record = await client.hgetall(f"{prefix}:job:{job_id}")
            fields = {k.decode(): v.decode()[:200] for k, v in record.items()}
            lines.append(f"{job_id}: {fields}")
    return "\n".join(lines)


@pytest.mark.slow
async def test_every_job_ends_and_keyed_ones_run_once_through_three_sigkills(
    tmp_path: Path, sqs_server: Moto, queues: Queues, redis_server: Redis, redis_prefix: str
) -> None:
    url = redis_server.url
    settings = {"workers": 4, "batch": 10, "visibility_timeout_ms": 2000, "max_attempts": 5}
    # Generous: this test is about what survives the kills, and moto (a Python server doing
    # ~150 requests/s here) answering four processes on a busy machine can take seconds;
    # so can Redis, with those four processes and the submitter on two cores (a job record
    # not written within 1 s once, at a load of 12). moto took more than 8 s to take one of
    # 50 messages sent at once with three test workers on the two cores (Redis's bound
    # stops at 10 s).
    patient_sqs, patient = {"op_timeout_ms": 30_000}, {"op_timeout_ms": 10_000}
    manifest = manifest_file(
        tmp_path, sqs_server, queues, url, redis_prefix, sqs=patient_sqs, state=patient, **settings
    )
    workers: list[WorkerProcess] = []
    try:
        workers.extend(WorkerProcess(manifest) for _ in range(3))
        submitter_file = manifest_file(
            tmp_path, sqs_server, queues, url, redis_prefix, sqs=patient_sqs, state=patient
        )
        async with Dispatcher(load_manifest(submitter_file)) as submitter:
            ids: list[str] = []
            for start in range(0, CHURN_JOBS, 50):
                # Even n carry an idempotency key; odd n do not.
                ids += await asyncio.gather(
                    *(
                        submitter.submit(
                            "jobs",
                            "work",
                            {"n": n},
                            idempotency_key=f"k{n}" if n % 2 == 0 else None,
                        )
                        for n in range(start, start + 50)
                    )
                )
            async with aioredis.Redis.from_url(url) as client:

                async def states() -> list[str]:
                    async with client.pipeline(transaction=False) as pipe:
                        for job_id in ids:
                            pipe.hget(f"{redis_prefix}:job:{job_id}", "state")
                        return [(s or b"").decode() for s in await pipe.execute()]

                kills = ended = 0
                deadline = time.monotonic() + 600
                # A job left behind ends within seconds (visibility 2 s, attempts 5): no job
                # ending for a minute is a lost one, said now rather than after ten.
                progress = time.monotonic()
                while time.monotonic() < min(deadline, progress + 60):
                    now_ended = sum(s in ("succeeded", "dead") for s in await states())
                    if now_ended > ended:
                        ended, progress = now_ended, time.monotonic()
                    if ended == CHURN_JOBS and kills == 3:
                        break
                    if kills < 3 and ended >= (kills + 1) * CHURN_JOBS // 5:
                        victim = kills % 3
                        workers[victim].kill()  # mid-run: jobs in flight on it
                        workers[victim] = WorkerProcess(manifest)
                        kills += 1
                        progress = time.monotonic()  # its start blocked this loop a while
                    await asyncio.sleep(0.2)
                final = await states()
                assert kills == 3
                if final.count("succeeded") + final.count("dead") != CHURN_JOBS:
                    pytest.fail(await _left_behind(client, redis_prefix, ids, final, queues))
                async with client.pipeline(transaction=False) as pipe:
                    for n in range(CHURN_JOBS):
                        pipe.get(f"{redis_prefix}:effects:{n}")
                    runs = [int(value or 0) for value in await pipe.execute()]
                async with client.pipeline(transaction=False) as pipe:
                    for n in range(0, CHURN_JOBS, 2):
                        pipe.get(f"{redis_prefix}:applied:{n}")
                    applied = [int(value or 0) for value in await pipe.execute()]
                async with client.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hget(f"{redis_prefix}:job:{job_id}", "attempts")
                    attempts = [int(value or 0) for value in await pipe.execute()]
        keyed_twice = [n for n in range(0, CHURN_JOBS, 2) if runs[n] > 1]
        print(
            f"\n{CHURN_JOBS} jobs on SQS, 3 SIGKILLs: {final.count('succeeded')} succeeded,"
            f" {final.count('dead')} dead; keyed jobs run more than once: {len(keyed_twice)};"
            f" unkeyed jobs run more than once: "
            f"{sum(runs[n] > 1 for n in range(1, CHURN_JOBS, 2))};"
            f" attempted more than once (back from a killed worker, or retried):"
            f" {sum(count > 1 for count in attempts)}"
        )
        assert all(runs[n] >= 1 for n in range(CHURN_JOBS) if final[n] == "succeeded")
        # The key's effect, applied the way README's recipe says: never twice, and once for
        # every keyed job that succeeded.
        wrong = [
            n * 2
            for n, count in enumerate(applied)
            if count > 1 or (count == 0 and final[n * 2] == "succeeded")
        ]
        assert wrong == [], wrong
        # The plugin runs again for a key only on another attempt: the message came back
        # from a killed worker, or the attempt failed retryably (a timeout under load).
        once_attempted = [n for n in keyed_twice if attempts[n] <= 1]
        assert once_attempted == [], once_attempted
    finally:
        for worker in workers:
            worker.end()


# -- the CLI on SQS -------------------------------------------------------------------------


async def test_the_cli_submits_lists_and_redrives_jobs_on_sqs(
    tmp_path: Path,
    make: Any,
    queues: Queues,
    sqs_server: Moto,
    redis_server: Redis,
    redis_prefix: str,
) -> None:
    """`dispatcher submit|jobs|dlq` read the manifest's jobs backend: here the SQS queues
    (they used to read the Redis stream, or refuse a manifest whose state was memory)."""
    from tests.test_jobs_cli import cli

    path = manifest_file(
        tmp_path, sqs_server, queues, redis_server.url, redis_prefix, max_attempts=1
    )
    submitted = await cli(path, "submit", "jobs", "busy", "{}", "--json")
    assert submitted.code == 0, submitted.err
    job_id = json.loads(submitted.out)["id"]
    assert queues.count(queues.url) == 1  # on SQS, not on a Redis stream
    async with make(workers=1, max_attempts=1) as d:
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=60)
    listed = await cli(path, "dlq", "list", "--json")
    assert listed.code == 0, listed.err
    assert [each["id"] for each in json.loads(listed.out)] == [job_id]
    redriven = await cli(path, "dlq", "redrive", job_id)
    assert redriven.code == 0, redriven.err
    assert queues.count(queues.dead_url) == 0 and queues.count(queues.url) == 1
    # Without a job view (state: memory) the dead-letter queue is still read and purged.
    bare = manifest_file(tmp_path, sqs_server, queues, redis_server.url, redis_prefix, view=False)
    async with make(workers=1, max_attempts=1) as d:
        with pytest.raises(TargetUnavailable):
            await d.result(job_id, wait=60)
    listed = await cli(bare, "dlq", "list", "--json")
    assert listed.code == 0, listed.err
    assert [each["id"] for each in json.loads(listed.out)] == [job_id]
    purged = await cli(bare, "dlq", "purge", "--all", "--yes")
    assert purged.code == 0, purged.err
    assert queues.count(queues.dead_url) == 0
    # What needs the view says so, typed, no traceback.
    shown = await cli(bare, "job", job_id)
    assert shown.code != 0 and "job view" in shown.err


# -- callbacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("view", [True, False])
async def test_callbacks_are_durable_with_a_job_view_and_best_effort_without(
    tmp_path: Path,
    sqs_server: Moto,
    queues: Queues,
    redis_server: Redis,
    redis_prefix: str,
    view: bool,
) -> None:
    """With a Redis job view the pending callback is written with the job's end (and any
    worker delivers it); without one there is nowhere to keep it: the worker sends it."""
    from tests.test_fleet import free_port
    from tests.test_job_callbacks_durable import HOST, Receiver, ok, serving

    receiver = Receiver(ok, free_port(HOST))
    path = manifest_file(
        tmp_path, sqs_server, queues, redis_server.url, redis_prefix, view=view, workers=1
    )
    async with serving(receiver), Dispatcher(load_manifest(path)) as d:
        job_id = await d.submit("jobs", "work", {"n": 12}, callback_url=receiver.url)
        await until(lambda: d.stats()["jobs"]["callbacks"]["delivered"] == 1, "the callback")
        assert d.stats()["jobs"]["callbacks"]["durable"] is view
        if view:
            record = await d.job(job_id)
            assert record["callback"] == "delivered"
            assert receiver.delivery_ids() == [record["callback_id"]]
    ((_, body),) = receiver.received
    document = json.loads(body)
    assert (document["id"], document["state"]) == (job_id, "succeeded")
