"""Hostile job callbacks: a record whose ``callback_url`` did not pass this dispatcher's
submit check (written by hand, or by a replica with a looser egress policy), a receiver
that answers without end, and a secret that must stay out of every log line.

Real receivers on 127.0.0.1, a real Redis, workers in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from dispatcher._job_callbacks import JobCallbacks
from dispatcher._jobs import job_status
from dispatcher.config import JobsConfig
from providers.egress import EgressPolicy
from tests.services import Redis, until
from tests.test_job_callbacks import SECRET, callbacks, callbacks_dispatcher, ok, receiving
from tests.test_jobs import dispatcher_for


async def test_a_callback_url_put_in_the_record_behind_the_submit_check_is_not_called(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """The worker's policy allows only 10.0.0.0/8; the record names 127.0.0.1, an address
    literal, which aiohttp dials without resolving (so the resolver's check never runs)."""
    strict = {"allow": ["10.0.0.0/8"]}
    async with receiving(ok) as receiver:
        async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=0) as submitter:
            job_id = await submitter.submit("jobs", "work", {"n": 3})
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.hset(f"{redis_prefix}:job:{job_id}", "callback_url", receiver.url)
        async with callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, egress=strict
        ) as worker:
            assert (await worker.result(job_id, wait=30))["n"] == 3
            await until(lambda: callbacks(worker)["failed"] == 1, "the refusal")
        assert receiver.received == []


async def test_a_callback_url_the_http_client_cannot_use_fails_at_once_without_retries(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    """``127.1`` is 127.0.0.1 to a resolver, and aiohttp refuses to dial it: a record
    naming it (behind the submit check) was POSTed as often as callback_attempts allow,
    each failure taken for a receiver that did not answer yet."""
    async with receiving(ok) as receiver:
        async with dispatcher_for(tmp_path, redis_server.url, redis_prefix, workers=0) as submitter:
            job_id = await submitter.submit("jobs", "work", {"n": 3})
        unusable = receiver.url.replace("127.0.0.1", "127.1")
        async with aioredis.Redis.from_url(redis_server.url) as client:
            await client.hset(f"{redis_prefix}:job:{job_id}", "callback_url", unusable)
        async with callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_attempts=4
        ) as worker:
            assert (await worker.result(job_id, wait=30))["n"] == 3
            await until(lambda: callbacks(worker)["failed"] == 1, "the refusal")
            assert callbacks(worker)["retried"] == 0
            record = await worker.job(job_id)
        assert record["callback"] == "failed"
        assert "no host name" in record["callback_error"]
        assert receiver.received == []


@contextlib.asynccontextmanager
async def endless_receiver() -> AsyncIterator[tuple[str, list[int]]]:
    """A receiver answering 200 and then a body of 6.5 GB, if anyone read it all;
    the list counts the bytes it managed to send."""
    sent = [0]

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                await response.write(chunk)
                sent[0] += len(chunk)
        return response

    app = web.Application()
    app.router.add_post("/hook", answer)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", sent
    finally:
        await runner.cleanup()


async def test_a_receiver_that_answers_without_end_is_not_read(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with (
        endless_receiver() as (url, sent),
        callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_timeout_ms=60_000
        ) as dispatcher,
    ):
        await dispatcher.submit("jobs", "work", {"n": 4}, callback_url=url)
        await until(lambda: callbacks(dispatcher)["delivered"] == 1, "the delivery")
        assert callbacks(dispatcher)["sending"] in (0, 1)  # the task may be ending now
    # The connection was dropped after the head: far less than the body was sent.
    assert sent[0] < 512 * 1024 * 1024


@pytest.mark.parametrize("answer", ["refused", "500"])
async def test_the_callback_secret_and_url_credentials_are_never_logged(
    tmp_path: Path,
    redis_server: Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    async def failing(attempt: int) -> web.Response:
        return web.Response(status=500, text=f"no; you sent {SECRET}?")

    caplog.set_level(logging.DEBUG)
    async with (
        receiving(failing) as receiver,
        callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_secret=SECRET, callback_attempts=2
        ) as dispatcher,
    ):
        if answer == "refused":  # nothing listens there
            url = "http://user:pass-word-in-url@127.0.0.1:1/hook"
        else:
            url = receiver.url.replace("127.0.0.1", "user:pass-word-in-url@127.0.0.1")
        job_id = await dispatcher.submit("jobs", "work", {"n": 5}, callback_url=url)
        await until(lambda: callbacks(dispatcher)["failed"] == 1, "the failed delivery")
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert job_id in logged  # the failure was logged…
    assert SECRET not in logged and "pass-word-in-url" not in logged  # …without secrets


@contextlib.asynccontextmanager
async def tarpit() -> AsyncIterator[str]:
    """A receiver that accepts connections and never answers a byte."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_deliveries_waiting_for_a_tarpit_are_bounded() -> None:
    """Jobs end faster than a receiver that never answers lets their callbacks go: each
    waiting delivery holds the job's whole record (its result too), so their number is
    bounded and the ones past it are dropped, counted as failed."""
    config = JobsConfig(callback_timeout_ms=60_000, callback_attempts=1)
    callbacks = JobCallbacks(config, EgressPolicy(), job_status, max_pending=8)
    try:
        async with tarpit() as url:
            for number in range(50):
                callbacks.send(url, {"id": f"job-{number}", "result": "x" * 1000})
            assert callbacks.stats()["sending"] == 8
            assert callbacks.stats()["failed"] == 42
    finally:
        await callbacks.aclose()
    by_size = JobCallbacks(config, EgressPolicy(), job_status, max_pending_bytes=5_000)
    try:
        async with tarpit() as url:
            for number in range(10):  # about 1,030 bytes each
                by_size.send(url, {"id": f"job-{number}", "result": "x" * 1000})
            assert (by_size.stats()["sending"], by_size.stats()["failed"]) == (4, 6)
    finally:
        await by_size.aclose()
