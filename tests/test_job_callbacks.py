"""Job callbacks (``callback_url``): a real aiohttp receiver on 127.0.0.1, a real Redis,
workers in this process. Delivered once and signed; a slow receiver; one that answers
500; a redirect not followed; URLs the egress policy refuses, at submit and after
resolution."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from dispatcher import Dispatcher, InvalidParams
from dispatcher._job_callbacks import SIGNATURE_HEADER
from dispatcher.config import load_manifest
from tests.services import Redis, until
from tests.test_jobs import manifest_file

SECRET = "callback-secret-for-tests-0123456789"

Handler = Callable[[web.Request], Any]


class Receiver:
    """An HTTP server on 127.0.0.1 port 0 recording what it was sent; ``answer`` decides
    each reply (``attempt`` counts from 1)."""

    def __init__(self, answer: Callable[[int], Any]) -> None:
        self.answer = answer
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((dict(request.headers), await request.read()))
        return await self.answer(len(self.received))


@contextlib.asynccontextmanager
async def receiving(answer: Callable[[int], Any]) -> AsyncIterator[Receiver]:
    receiver = Receiver(answer)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    app.router.add_post("/elsewhere", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def ok(attempt: int) -> web.Response:
    return web.json_response({"thanks": True})


def callbacks_dispatcher(
    folder: Path, redis: Redis, prefix: str, egress: dict[str, Any] | None = None, **jobs: Any
) -> Dispatcher:
    path = manifest_file(folder, redis.url, prefix, workers=1, **jobs)
    if egress is not None:
        document = json.loads(path.read_text())
        document["egress"] = egress
        path.write_text(json.dumps(document))
    return Dispatcher(load_manifest(path))


def callbacks(dispatcher: Dispatcher) -> dict[str, int]:
    stats: dict[str, int] = dispatcher.stats()["jobs"]["callbacks"]
    return stats


async def test_a_finished_job_is_posted_once_and_signed(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with (
        receiving(ok) as receiver,
        callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_secret=SECRET
        ) as dispatcher,
    ):
        job_id = await dispatcher.submit("jobs", "work", {"n": 9}, callback_url=receiver.url)
        assert (await dispatcher.result(job_id, wait=30))["n"] == 9
        await until(lambda: callbacks(dispatcher)["delivered"] == 1, "the callback")
        await asyncio.sleep(0.2)  # nothing more arrives
    ((headers, body),) = receiver.received
    record = orjson.loads(body)
    assert (record["id"], record["state"], record["result"]) == (
        job_id,
        "succeeded",
        {"n": 9, "runs": 1},
    )
    assert type(record["submitted_at"]) is type(record["finished_at"]) is int  # as GET shows it
    assert headers["Content-Type"] == "application/json"
    fields = dict(part.split("=", 1) for part in headers[SIGNATURE_HEADER].split(","))
    expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(fields["v1"], expected.hexdigest())
    assert abs(int(fields["t"]) - time.time()) < 600
    assert SECRET not in body.decode() and SECRET not in repr(dispatcher.manifest.jobs)


async def test_a_failed_job_is_posted_too_and_unsigned_without_a_secret(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async with (
        receiving(ok) as receiver,
        callbacks_dispatcher(tmp_path, redis_server, redis_prefix) as dispatcher,
    ):
        await dispatcher.submit("jobs", "refuse", callback_url=receiver.url)
        await until(lambda: callbacks(dispatcher)["delivered"] == 1, "the callback")
    ((headers, body),) = receiver.received
    assert orjson.loads(body)["error"]["type"] == "NoAccount"
    assert SIGNATURE_HEADER not in headers


async def test_a_slow_receiver_is_given_up_on_per_attempt_then_tried_again(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async def slow_first(attempt: int) -> web.Response:
        if attempt == 1:
            await asyncio.sleep(5)
        return web.json_response({})

    async with (
        receiving(slow_first) as receiver,
        callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_timeout_ms=300
        ) as dispatcher,
    ):
        job_id = await dispatcher.submit("jobs", "work", {"n": 1}, callback_url=receiver.url)
        await dispatcher.result(job_id, wait=30)  # the job's own end does not wait for it
        await until(lambda: callbacks(dispatcher)["delivered"] == 1, "the second attempt")
    assert len(receiver.received) == 2


async def test_a_receiver_that_fails_gets_bounded_attempts(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async def broken(attempt: int) -> web.Response:
        return web.Response(status=500)

    async with (
        receiving(broken) as receiver,
        callbacks_dispatcher(
            tmp_path, redis_server, redis_prefix, callback_attempts=3
        ) as dispatcher,
    ):
        await dispatcher.submit("jobs", "work", {"n": 2}, callback_url=receiver.url)
        await until(lambda: callbacks(dispatcher)["failed"] == 1, "giving up")
    assert len(receiver.received) == 3


async def test_a_redirect_is_not_followed(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    async def redirect(attempt: int) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async with (
        receiving(redirect) as receiver,
        callbacks_dispatcher(tmp_path, redis_server, redis_prefix) as dispatcher,
    ):
        await dispatcher.submit("jobs", "work", {"n": 3}, callback_url=receiver.url)
        await until(lambda: callbacks(dispatcher)["failed"] == 1, "giving up")
    assert len(receiver.received) == 1  # /hook once; /elsewhere never


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "ftp://127.0.0.1/x",
        "unix:///var/run/docker.sock",
        "http://127.0.0.1:1/\n",
        "http://" + "a" * 2100,
        "",
    ],
)
async def test_a_callback_url_the_policy_refuses_is_refused_at_submit(
    tmp_path: Path, redis_server: Redis, redis_prefix: str, url: str
) -> None:
    async with callbacks_dispatcher(tmp_path, redis_server, redis_prefix) as dispatcher:
        with pytest.raises(InvalidParams, match="callback_url"):
            await dispatcher.submit("jobs", "work", {"n": 1}, callback_url=url)
        assert await dispatcher.state_backend.jobs.recent(10) == []  # type: ignore[union-attr]


async def test_an_allowlist_refuses_at_submit_and_after_resolution(
    tmp_path: Path, redis_server: Redis, redis_prefix: str
) -> None:
    egress = {"allow": ["10.0.0.0/8"]}
    async with (
        receiving(ok) as receiver,
        callbacks_dispatcher(tmp_path, redis_server, redis_prefix, egress=egress) as dispatcher,
    ):
        with pytest.raises(InvalidParams, match="egress"):
            await dispatcher.submit("jobs", "work", {"n": 1}, callback_url=receiver.url)
        # A name passes at submit (it may resolve into 10/8) but resolves to 127.0.0.1.
        named = receiver.url.replace("127.0.0.1", "localhost")
        await dispatcher.submit("jobs", "work", {"n": 1}, callback_url=named)
        await until(lambda: callbacks(dispatcher)["failed"] == 1, "the refusal")
    assert receiver.received == []
