"""The HTTP provider against real servers that misbehave in every way a target can."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    DispatchError,
    Forbidden,
    InvalidParams,
    PluginError,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
)
from tests.conftest import bound_socket, echo_plugin, manifest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A real TCP server on 127.0.0.1 running ``handler`` per connection."""
    sock = bound_socket()
    connections: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, sock=sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.close()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def answering(status: int, body: bytes, *headers: str) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            extra = "".join(f"{header}\r\n" for header in headers)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
            )
            await writer.drain()

    return handle


async def hanging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(3600)


async def closing_mid_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"ok": tr')
    await writer.drain()


@asynccontextmanager
async def dispatcher_for(url: str, **target: Any) -> AsyncIterator[Dispatcher]:
    plugins = manifest(
        echo_plugin(
            "remote", {"provider": "http", "url": url, **target}, defaults={"timeout_ms": 2000}
        )
    )
    async with Dispatcher(plugins) as dispatcher:
        yield dispatcher


async def failure_of(url: str, timeout: float | None = None, **target: Any) -> DispatchError:
    async with dispatcher_for(url, **target) as dispatcher:
        with pytest.raises(DispatchError) as caught:
            await dispatcher.call("remote", "say", {"text": "hi"}, timeout=timeout)
    return caught.value


ENVELOPE_ERROR = orjson.dumps(
    {"ok": False, "error": {"type": "QuotaExceeded", "message": "try tomorrow", "retryable": True}}
)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "retry_after"),
    [
        (500, b"oops", (), TargetUnavailable, None),
        (502, b"", (), TargetUnavailable, None),
        (503, b"", ("Retry-After: 7",), TargetUnavailable, 7.0),
        (429, b"slow down", ("Retry-After: 2",), RateLimited, 2.0),
        (401, b"", (), Unauthorized, None),
        (403, b"", (), Forbidden, None),
        (413, b"", (), InvalidParams, None),
        (504, b"", (), DeadlineExceeded, None),
        (404, b"not here", (), ProviderError, None),
        (200, b"<html>garbage</html>", (), ProviderError, None),
        (200, b'{"answer": 42}', (), ProviderError, None),
        (200, b'{"ok": false, "error": "no type"}', (), ProviderError, None),
        (503, ENVELOPE_ERROR, (), PluginError, None),
    ],
)
async def test_status_codes_and_bodies_map_to_typed_errors(
    status: int,
    body: bytes,
    headers: tuple[str, ...],
    expected: type[Exception],
    retry_after: float | None,
) -> None:
    async with raw_server(answering(status, body, *headers)) as url:
        error = await failure_of(url)
    assert type(error) is expected, repr(error)
    assert getattr(error, "retry_after", None) == retry_after


async def test_a_plugin_error_keeps_the_remote_type_and_message() -> None:
    async with raw_server(answering(503, ENVELOPE_ERROR)) as url:
        error = await failure_of(url)
    assert isinstance(error, PluginError)
    assert (error.remote_type, error.message, error.retryable) == (
        "QuotaExceeded",
        "try tomorrow",
        True,
    )


async def test_a_target_that_is_down_is_unavailable_and_retryable() -> None:
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there any more
    error = await failure_of(url)
    assert isinstance(error, TargetUnavailable)
    assert error.retryable


async def test_a_connection_cut_mid_answer_is_unavailable() -> None:
    async with raw_server(closing_mid_answer) as url:
        error = await failure_of(url)
    assert isinstance(error, TargetUnavailable)


async def test_a_hanging_target_gives_deadline_exceeded_within_the_deadline() -> None:
    async with raw_server(hanging) as url, dispatcher_for(url) as dispatcher:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await dispatcher.call("remote", "say", {"text": "hi"}, timeout=0.2)
        elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 0.2 + 0.5  # generous upper bound: CI machines are slow


async def test_oversized_answers_are_refused() -> None:
    async with raw_server(answering(200, b'{"ok": true, "result": "' + b"x" * 5000 + b'"}')) as url:
        error = await failure_of(url, max_response_bytes=1000)
    assert isinstance(error, ProviderError)
    assert "max_response_bytes" in str(error)


async def test_headers_and_bearer_token_reach_the_target() -> None:
    seen: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        request = orjson.loads(await reader.readexactly(length))
        body = orjson.dumps({"ok": True, "result": request})
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    async with (
        raw_server(recording) as url,
        dispatcher_for(url, headers={"X-Tenant": "acme"}, bearer_token="t0ken") as dispatcher,
    ):
        request = await dispatcher.call(
            "remote",
            "say",
            {"text": "hi"},
            caller="alice",
            timeout=1.5,
            traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        )
    head = seen[0].lower()
    assert b"x-tenant: acme" in head
    assert b"authorization: bearer t0ken" in head
    assert request["v"] == 1
    assert request["method"] == "say"
    assert request["params"] == {"text": "hi"}
    assert request["context"]["caller"] == "alice"
    assert 1000 < request["context"]["deadline_ms"] <= 1500
    assert request["context"]["traceparent"].startswith("00-aaaa")


async def test_non_json_params_are_invalid_and_never_sent() -> None:
    calls = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1

    async with raw_server(counting) as url, dispatcher_for(url) as dispatcher:
        with pytest.raises(InvalidParams):
            await dispatcher.call("remote", "say", {"when": object()})
    assert calls == 0


async def test_the_dispatcher_keeps_serving_while_one_target_hangs(echo_url: str) -> None:
    async with raw_server(hanging) as hanging_url:
        plugins = manifest(
            echo_plugin("stuck", {"provider": "http", "url": hanging_url}),
            echo_plugin("fine", {"provider": "http", "url": echo_url}),
        )
        async with Dispatcher(plugins) as dispatcher:
            stuck = asyncio.create_task(dispatcher.call("stuck", "say", {"text": "x"}, timeout=1.0))
            answers = await asyncio.gather(
                *(dispatcher.call("fine", "say", {"text": str(i)}) for i in range(50))
            )
            assert not stuck.done()
            with pytest.raises(DeadlineExceeded):
                await stuck
    assert [answer["text"] for answer in answers] == [str(i) for i in range(50)]
