"""Durable job callbacks on a real Redis: recorded with the job's end, delivered at least
once by any replica's worker, dead-lettered after their budget.

Receivers are real aiohttp servers on 127.0.0.2 (loopback); workers run in this process,
or in ``tests/job_worker.py`` processes for the crash test, which SIGKILLs the worker
whose POST is in flight. What the receiver got, and the job's record, are the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from dispatcher import Dispatcher
from dispatcher._job_callbacks import DELIVERY_HEADER, SIGNATURE_HEADER
from dispatcher.config import load_manifest
from tests.services import Redis
from tests.test_fleet import free_port
from tests.test_jobs import WorkerProcess, manifest_file
from tests.test_jobs_cli import cli

HOST = "127.0.0.2"
SECRET = "durable-callback-secret-0123456789"
#: In the receiver's URL: a token a caller put there, which must not reach a log either.
TOKEN = "hook-token-5f3a9c"

Answer = Callable[[int], Awaitable[web.StreamResponse]]


class Receiver:
    """Records every POST (headers, body); ``answer(n)`` replies to the n-th (from 1)."""

    def __init__(self, answer: Answer, port: int) -> None:
        self.answer = answer
        self.port = port
        self.url = f"http://{HOST}:{port}/hook?token={TOKEN}"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((dict(request.headers), await request.read()))
        self.arrived.set()
        return await self.answer(len(self.received))

    def delivery_ids(self) -> list[str]:
        return [headers[DELIVERY_HEADER] for headers, _ in self.received]


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)  # the dispatcher's logs only
    await runner.setup()
    await web.TCPSite(runner, HOST, receiver.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def ok(attempt: int) -> web.Response:
    return web.json_response({"thanks": True})


def jobs_manifest(folder: Path, redis: Redis, prefix: str, **jobs: Any) -> Path:
    settings = {"callback_secret": SECRET, "callback_backoff_ms": 100, **jobs}
    return manifest_file(folder, redis.url, prefix, **settings)


async def record_of(redis: Redis, prefix: str, job_id: str) -> dict[str, str]:
    async with aioredis.Redis.from_url(redis.url, decode_responses=True) as client:
        record = await client.hgetall(f"{prefix}:job:{job_id}")
        return {str(name): str(value) for name, value in record.items()}


async def wait_for_record(
    redis: Redis,
    prefix: str,
    job_id: str,
    wanted: Callable[[dict[str, str]], bool],
    timeout: float = 60,
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    record = await record_of(redis, prefix, job_id)
    while not wanted(record):
        assert time.monotonic() < deadline, f"job {job_id}'s record stays {record}"
        await asyncio.sleep(0.05)
        record = await record_of(redis, prefix, job_id)
    return record


async def wait_for_callback(
    redis: Redis, prefix: str, job_id: str, state: str, timeout: float = 60
) -> dict[str, str]:
    return await wait_for_record(
        redis, prefix, job_id, lambda record: record.get("callback") == state, timeout
    )


def no_secret_in(text: str) -> None:
    assert SECRET not in text
    assert TOKEN not in text


# -- a worker dies after the job's end, before its callback is delivered -----------------------


async def test_a_callback_left_by_a_worker_that_died_is_delivered_by_another(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """Worker A runs the job, stores its end (and so its pending callback), starts the POST
    and is SIGKILLed before any answer; worker B, another process, delivers it once A's
    claim lapses, with the same delivery id."""

    async def hang_first(attempt: int) -> web.Response:
        if attempt == 1:
            await asyncio.sleep(60)  # A is killed meanwhile
        return web.json_response({})

    manifest = jobs_manifest(
        tmp_path, redis_server, redis_prefix, workers=1, callback_timeout_ms=1500
    )
    receiver = Receiver(hang_first, free_port(HOST))
    async with (
        serving(receiver),
        Dispatcher(
            load_manifest(manifest_file(tmp_path, redis_server.url, redis_prefix))
        ) as submitter,
    ):
        a = WorkerProcess(manifest)
        b: WorkerProcess | None = None
        try:
            job_id = await submitter.submit("jobs", "work", {"n": 4}, callback_url=receiver.url)
            await asyncio.wait_for(receiver.arrived.wait(), 120)
            a.kill()  # the POST is in flight, no answer yet: not delivered
            record = await record_of(redis_server, redis_prefix, job_id)
            assert (record["state"], record["callback"]) == ("succeeded", "pending")
            b = WorkerProcess(manifest)
            record = await wait_for_callback(redis_server, redis_prefix, job_id, "delivered")
        finally:
            a.end()
            if b is not None:
                b.end()
    assert len(receiver.received) == 2
    first, second = receiver.delivery_ids()
    assert first == second == record["callback_id"]  # what the receiver deduplicates on
    assert record["callback_attempts"] == "2"
    body = orjson.loads(receiver.received[1][1])
    assert (body["id"], body["state"], body["delivery_id"]) == (job_id, "succeeded", first)
    assert "callback_claim" not in body and "callback" not in body
    for process in (a, b):
        assert process is not None
        no_secret_in(process.stderr.read_text())


async def test_a_pending_callback_no_worker_ever_claimed_is_delivered(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """The end was stored with its callback and the worker died right then (nothing
    claimed it): a worker started later delivers it."""
    receiver = Receiver(ok, free_port(HOST))
    async with serving(receiver):
        manifest = load_manifest(jobs_manifest(tmp_path, redis_server, redis_prefix))
        async with Dispatcher(manifest) as submitter:  # no workers: nothing runs it here
            job_id = await submitter.submit("jobs", "work", {"n": 5}, callback_url=receiver.url)
            assert submitter.state_backend is not None
            store = submitter.state_backend.jobs
            assert store is not None
            await store.ensure_group()
            (delivery,) = await store.take("doomed", 1, block=1.0, min_idle=60)
            await store.begin(delivery)
            fields = {
                "state": "succeeded",
                "result": "{}",
                "callback": "pending",
                "callback_id": "d-1",
                "callback_attempts": "0",
            }
            await store.finish(delivery.entry_id, job_id, fields, 600)
        await asyncio.sleep(0.5)
        assert receiver.received == []
        worker = load_manifest(jobs_manifest(tmp_path, redis_server, redis_prefix, workers=1))
        async with Dispatcher(worker):
            record = await wait_for_callback(redis_server, redis_prefix, job_id, "delivered")
    assert receiver.delivery_ids() == ["d-1"]
    assert record["callback_attempts"] == "1"


# -- receivers that are down, or always fail ---------------------------------------------------


async def test_a_receiver_down_for_a_while_gets_it_once_it_is_back(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = Receiver(ok, free_port(HOST))  # nothing listens there yet
    manifest = load_manifest(
        jobs_manifest(
            tmp_path,
            redis_server,
            redis_prefix,
            workers=1,
            callback_attempts=30,
            callback_backoff_max_ms=400,
        )
    )
    async with Dispatcher(manifest) as dispatcher:
        job_id = await dispatcher.submit("jobs", "work", {"n": 6}, callback_url=receiver.url)
        assert (await dispatcher.result(job_id, wait=30))["n"] == 6  # the job does not wait

        await wait_for_record(
            redis_server,
            redis_prefix,
            job_id,
            lambda record: int(record.get("callback_attempts", 0)) >= 3,  # refused 3 times
        )
        record = await record_of(redis_server, redis_prefix, job_id)
        assert record["callback"] == "pending" and "no answer" in record["callback_error"]
        async with serving(receiver):
            record = await wait_for_callback(redis_server, redis_prefix, job_id, "delivered")
        assert dispatcher.stats()["jobs"]["callbacks"]["delivered"] == 1
    ((headers, _),) = receiver.received
    assert headers[DELIVERY_HEADER] == record["callback_id"]
    assert SIGNATURE_HEADER in headers
    no_secret_in(caplog.text)


async def test_a_receiver_that_always_fails_ends_failed_and_listed(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def broken(attempt: int) -> web.Response:
        return web.Response(status=503)

    receiver = Receiver(broken, free_port(HOST))
    path = jobs_manifest(tmp_path, redis_server, redis_prefix, workers=1, callback_attempts=4)
    async with serving(receiver), Dispatcher(load_manifest(path)) as dispatcher:
        job_id = await dispatcher.submit("jobs", "work", {"n": 7}, callback_url=receiver.url)
        record = await wait_for_callback(redis_server, redis_prefix, job_id, "failed")
        await asyncio.sleep(0.3)  # nothing more is sent
        assert len(receiver.received) == 4
        assert record["callback_error"] == "HTTP 503" and record["callback_attempts"] == "4"
        assert record["state"] == "succeeded"  # the job's own outcome is untouched
        status = await dispatcher.job(job_id)
        assert (status["callback"], status["callback_error"]) == ("failed", "HTTP 503")
        assert len(set(receiver.delivery_ids())) == 1
    listed = await cli(path, "jobs", "--callback", "failed", "-o", "json")
    assert listed.code == 0, listed.err
    assert [each["id"] for each in orjson.loads(listed.out)] == [job_id]
    table = await cli(path, "jobs", "--callback", "failed")
    assert "CALLBACK" in table.out and "failed" in table.out
    no_secret_in(caplog.text + listed.err + table.err)  # the logs; the view shows the URL


async def test_a_4xx_ends_it_at_once_and_a_slow_receiver_is_bounded(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async def gone(attempt: int) -> web.Response:
        return web.Response(status=410)

    async def silent(attempt: int) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    path = jobs_manifest(
        tmp_path,
        redis_server,
        redis_prefix,
        workers=1,
        callback_attempts=2,
        callback_timeout_ms=300,
    )
    first, second = Receiver(gone, free_port(HOST)), Receiver(silent, free_port(HOST))
    async with serving(first), serving(second), Dispatcher(load_manifest(path)) as dispatcher:
        refused = await dispatcher.submit("jobs", "work", {"n": 8}, callback_url=first.url)
        ignored = await dispatcher.submit("jobs", "work", {"n": 9}, callback_url=second.url)
        started = time.monotonic()
        record = await wait_for_callback(redis_server, redis_prefix, refused, "failed")
        assert record["callback_error"] == "HTTP 410" and len(first.received) == 1
        record = await wait_for_callback(redis_server, redis_prefix, ignored, "failed")
        assert "no answer" in record["callback_error"] and len(second.received) == 2
        assert time.monotonic() - started < 30  # each POST bounded: never a hang


# -- hostile records ---------------------------------------------------------------------------


async def test_a_tampered_or_missing_record_is_refused_not_followed(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone with Redis access rewrote a pending callback's URL to the metadata service,
    and left a callback entry with no record: neither is sent, the worker carries on."""
    receiver = Receiver(ok, free_port(HOST))
    path = jobs_manifest(tmp_path, redis_server, redis_prefix, workers=1)
    async with serving(receiver):
        async with Dispatcher(
            load_manifest(manifest_file(tmp_path, redis_server.url, redis_prefix))
        ) as d:
            job_id = await d.submit("jobs", "work", {"n": 10}, callback_url=receiver.url)
            async with aioredis.Redis.from_url(redis_server.url) as client:
                await client.hset(
                    f"{redis_prefix}:job:{job_id}",
                    "callback_url",
                    "http://169.254.169.254/latest/meta-data/",
                )
                await client.zadd(f"{redis_prefix}:jobs:callbacks", {"no-such-job": 0})
        async with Dispatcher(load_manifest(path)) as dispatcher:
            record = await wait_for_callback(redis_server, redis_prefix, job_id, "failed")
            assert "egress" in record["callback_error"]
            async with aioredis.Redis.from_url(redis_server.url) as client:
                await until_empty(client, f"{redis_prefix}:jobs:callbacks")
            # The worker still works: a good callback after the bad ones is delivered.
            good = await dispatcher.submit("jobs", "work", {"n": 11}, callback_url=receiver.url)
            await wait_for_callback(redis_server, redis_prefix, good, "delivered")
    assert len(receiver.received) == 1
    assert "Traceback" not in caplog.text


async def until_empty(client: aioredis.Redis, key: str) -> None:
    deadline = time.monotonic() + 30
    while await client.zcard(key):
        assert time.monotonic() < deadline, f"{key} still holds {await client.zrange(key, 0, -1)}"
        await asyncio.sleep(0.05)


async def test_a_frozen_redis_delays_a_callback_but_loses_nothing(
    tmp_path: Path, own_redis: Redis, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops answering (SIGSTOP) while a callback waits for its next POST: the worker
    logs, keeps going, and delivers it once Redis answers again."""
    caplog.set_level(logging.INFO)
    failed_once = asyncio.Event()

    async def fail_first(attempt: int) -> web.Response:
        if attempt == 1:
            failed_once.set()
            return web.Response(status=503)
        return web.json_response({})

    receiver = Receiver(fail_first, free_port(HOST))
    path = manifest_file(
        tmp_path,
        own_redis.url,
        redis_prefix,
        workers=1,
        callback_secret=SECRET,
        callback_backoff_ms=1000,
    )
    document = json.loads(path.read_text())
    document["state"].update(op_timeout_ms=200, retry_after_ms=200)
    path.write_text(json.dumps(document))
    async with serving(receiver), Dispatcher(load_manifest(path)) as dispatcher:
        job_id = await dispatcher.submit("jobs", "work", {"n": 13}, callback_url=receiver.url)
        await asyncio.wait_for(failed_once.wait(), 60)
        own_redis.pause()
        try:
            await asyncio.sleep(1.5)  # past the retry's due time: claims time out meanwhile
        finally:
            own_redis.resume()
        record = await wait_for_callback(own_redis, redis_prefix, job_id, "delivered")
        assert record["callback_attempts"] == "2"
        assert dispatcher.stats()["jobs"]["callbacks"]["delivered"] == 1
    assert len(receiver.received) == 2
    assert "job callbacks: state store" in caplog.text  # it said why it waited
    no_secret_in(caplog.text)
