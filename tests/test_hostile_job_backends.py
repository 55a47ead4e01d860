"""Hostile job backends: records and entries someone put into Redis by hand (fields of
the wrong kind, a job id that was never submitted), results too large to keep. A real
Redis (``tests.services``); the job plugin in-process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, JobNotFound, ResultTooLarge
from dispatcher._jobs import ended_error
from dispatcher.config import load_manifest
from dispatcher.state import StateUnavailable
from linchkit_plugin.errors import DispatchError, ProviderError
from tests.services import Redis
from tests.sqs_support import Moto, Queues
from tests.test_job_callbacks import ok, receiving
from tests.test_jobs import dispatcher_for, manifest_file
from tests.test_jobs_sqs import eventually, make, queues, until  # noqa: F401 (fixtures)
from tests.test_jobs_sqs import manifest_file as sqs_manifest_file


def echoing_dispatcher(folder: Path, url: str, prefix: str, **jobs: Any) -> Dispatcher:
    """The job plugin with its ``echo`` method too: a result as large as its params."""
    path = manifest_file(folder, url, prefix, **jobs)
    document = json.loads(path.read_text())
    document["plugins"][0]["methods"]["echo"] = {}
    path.write_text(json.dumps(document))
    return Dispatcher(load_manifest(path))


def record_of(job_id: str, **fields: str) -> dict[str, str]:
    return {
        "id": job_id,
        "plugin": "jobs",
        "version": "1.0.0",
        "method": "work",
        "params": '{"n": 1}',
        "state": "queued",
        "attempts": "0",
        **fields,
    }


@pytest.mark.parametrize(
    ("fields", "state", "error"),
    [
        ({"attempts": "many"}, "dead", "provider_error"),
        ({"attempts": "9" * 30}, "dead", "provider_error"),
        ({"params": "{not json"}, "dead", "provider_error"),
        ({"version": "9.9.9"}, "failed", "plugin_not_found"),
    ],
    ids=["attempts-word", "attempts-huge", "params", "version"],
)
async def test_a_hand_written_record_ends_without_taking_redis_down(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    fields: dict[str, str],
    state: str,
    error: str,
) -> None:
    """A record the worker cannot run ends with a reason; it is never retried for ever,
    nor taken for Redis failing (which would refuse every caller for a moment)."""
    job_id = "by-hand-1"
    async with dispatcher_for(
        tmp_path, redis_server.url, redis_prefix, workers=1, visibility_timeout_ms=200
    ) as d:
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.hset(f"{redis_prefix}:job:{job_id}", mapping=record_of(job_id, **fields))
            await client.xadd(f"{redis_prefix}:jobs", {"job": job_id})
        with pytest.raises(DispatchError) as raised:
            await d.result(job_id, wait=30)
        assert raised.value.type == error, raised.value
        assert (await d.job(job_id))["state"] == state
        # The store was never taken for down: a submission right after is taken.
        assert (await d.result(await d.submit("jobs", "work", {"n": 2}), wait=30))["n"] == 2
        backend = d.state_backend
        assert backend is not None and backend.stats()["failures"] == 0, backend.stats()


async def test_a_key_of_the_wrong_type_is_a_corrupt_entry_not_redis_down(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Another program's key where a job's record would be (WRONGTYPE). A direct read of
    it (``job``, ``job_for`` as the gateway reads, ``result``) raised StateUnavailable:
    retryable, the store "refused", so a client retried a key that reads the same each
    time, while the listing showed it as a corrupt row and the worker dead-lettered it.
    Now the same corrupt entry: ``ProviderError``, final, naming what the key holds
    (never its value), whoever asks; every other caller of the store goes on."""
    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.set(f"{redis_prefix}:job:a-string", "SECRET not a hash")
            await client.rpush(f"{redis_prefix}:job:a-list", "SECRET")
        reads = [
            ("a-string", "string", lambda job_id: d.job(job_id)),
            ("a-string", "string", lambda job_id: d.job_for(job_id, None)),
            ("a-string", "string", lambda job_id: d.job_for(job_id, "someone")),
            ("a-list", "list", lambda job_id: d.result(job_id, wait=5)),
        ]
        for job_id, kind, read in reads:
            with pytest.raises(ProviderError) as raised:
                await read(job_id)
            error = raised.value
            assert not isinstance(error, StateUnavailable) and not error.retryable, error
            assert f"holds a {kind} where its record belongs" in error.message
            assert error.details == {"stage": "jobs", "record_type": kind}
            assert "SECRET" not in error.message
        job_id = await d.submit("jobs", "work", {"n": 1})  # not refused "for a moment"
        assert (await d.job(job_id))["state"] == "queued"
        assert d.state_backend.stats()["failures"] == 0  # type: ignore[union-attr]


async def test_a_queued_job_whose_record_is_another_type_is_dead_lettered_not_looped(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """A string where a queued job's record belongs failed the worker's start with
    WRONGTYPE: the entry was left for later, taken again after each visibility timeout,
    and failed again, for ever. No dispatcher writes one: it is dropped unread and the
    job dead-lettered as one without a record; a redrive finds nothing it could run,
    where it failed ``dlq redrive --all`` at that job; and a callback due for such a key
    no longer fails every claim, which held every other job's callback back."""
    job_id = "a-string"
    async with dispatcher_for(
        tmp_path, redis_server.url, redis_prefix, workers=1, visibility_timeout_ms=200
    ) as d:
        store = d.state_backend.jobs  # type: ignore[union-attr]
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.set(f"{redis_prefix}:job:{job_id}", "not a hash")
            await client.xadd(f"{redis_prefix}:jobs", {"job": job_id})

            async def dead() -> bool:
                return await client.type(f"{redis_prefix}:job:{job_id}") == b"hash"

            await eventually(dead, "the dead letter", timeout=5.0)
            assert (await d.job(job_id))["state"] == "dead"
            assert d.stats()["jobs"]["malformed"] == 1
            await client.set(f"{redis_prefix}:job:{job_id}", "not a hash again")
            assert not await store.redrive(job_id)
            await client.zadd(f"{redis_prefix}:jobs:callbacks", {job_id: 0})
            assert store.callbacks is not None
            assert await store.callbacks.claim(10, 1.0) == []
            assert await client.zscore(f"{redis_prefix}:jobs:callbacks", job_id) is None
        assert d.state_backend.stats()["failures"] == 0  # type: ignore[union-attr]


async def test_a_result_over_max_result_bytes_fails_the_job_instead_of_filling_redis(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with echoing_dispatcher(
        tmp_path, redis_server.url, redis_prefix, workers=1, max_result_bytes=4096
    ) as d:
        job_id = await d.submit("jobs", "echo", {"text": "x" * 10_000})
        # Read back from the store as the dispatcher raised it: its own class, with its
        # details (before, a PluginError whose remote type was "result_too_large").
        with pytest.raises(ResultTooLarge, match="max_result_bytes = 4096") as caught:
            await d.result(job_id, wait=30)
        assert caught.value.details == {
            "stage": "jobs",
            "state": "failed",
            "limit": 4096,
            "bytes": 10_002,
        }
        assert caught.value.retryable is False
        status = await d.job(job_id)
        assert (status["state"], "result" in status) == ("failed", False)
        assert isinstance(ended_error("failed", status["error"]), ResultTooLarge)
        small = await d.submit("jobs", "echo", {"text": "x" * 100})
        assert await d.result(small, wait=30) == "x" * 100


@pytest.mark.parametrize("job_id", ["", "x" * 65, "a\nb", "\udcff", "../../etc"])
async def test_a_guessed_or_malformed_job_id_is_not_found_or_invalid(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, job_id: str
) -> None:
    from dispatcher import InvalidParams

    async with dispatcher_for(tmp_path, redis_server.url, redis_prefix) as d:
        with pytest.raises((JobNotFound, InvalidParams)):
            await d.job(job_id)
        with pytest.raises((JobNotFound, InvalidParams)):
            await d.result(job_id, wait=0.1)


# -- SQS (moto's server) with its job view on Redis ------------------------------------------


async def test_an_sqs_job_whose_view_record_was_spoilt_is_dead_lettered_not_looped(
    make: Any,  # noqa: F811 (the fixture)
    queues: Queues,  # noqa: F811 (the fixture)
    redis_server: Redis,
    redis_prefix: str,
) -> None:
    """The message is fine; the record of its job on the view's Redis holds an attempts
    count that is no integer. Counting an attempt must not fail on every receive."""
    async with make(workers=0) as submitter:
        job_id = await submitter.submit("jobs", "work", {"n": 6})
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.hset(f"{redis_prefix}:job:{job_id}", "attempts", "many")
    async with make(workers=1, visibility_timeout_ms=1000) as worker:
        with pytest.raises(ProviderError, match="attempts"):
            await worker.result(job_id, wait=30)
        assert (await worker.job(job_id))["state"] == "dead"
        assert worker.stats()["state"]["failures"] == 0


async def test_an_sqs_message_calling_back_where_the_worker_may_not_is_not_sent(
    tmp_path: Path,
    sqs_server: Moto,
    queues: Queues,  # noqa: F811 (the fixture)
    redis_server: Redis,
    redis_prefix: str,
) -> None:
    """Whoever can write to the queue writes the whole record, its callback_url too: the
    worker checks it against its own egress policy (only 10.0.0.0/8 here) before it POSTs
    to the receiver's address literal, which no resolver would check."""
    path = sqs_manifest_file(
        tmp_path, sqs_server, queues, redis_server.url, redis_prefix, workers=1
    )
    document = json.loads(path.read_text())
    document["egress"] = {"allow": ["10.0.0.0/8"]}
    path.write_text(json.dumps(document))
    async with receiving(ok) as receiver:
        body = json.dumps(
            {
                "id": "from-the-queue",
                "plugin": "jobs",
                "version": "1.0.0",
                "method": "work",
                "params": '{"n": 8}',
                "state": "queued",
                "attempts": "0",
                "submitted_at": "1",
                "callback_url": receiver.url,
            }
        )
        queues.moto.client().send_message(QueueUrl=queues.url, MessageBody=body)
        async with Dispatcher(load_manifest(path)) as worker:
            await until(lambda: worker.stats()["jobs"]["callbacks"]["failed"] == 1, "the refusal")
            assert (await worker.job("from-the-queue"))["state"] == "succeeded"
        assert receiver.received == []
