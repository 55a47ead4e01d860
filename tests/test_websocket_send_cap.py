"""The Python SDK's WebSocket send cap (``linchkit_plugin._ws_send_cap``): no frame over
``min(the plugin's own read cap, the host's announced one)`` goes out, so that the host does
not close the connection (1009) with every other call on it.

The host announces its cap in the upgrade request's ``LinchKit-Max-Message-Bytes`` header
(served) or in its ``welcome`` (reverse mode). A ``response`` over the cap is answered
``provider_error`` (``too_large``) instead; a ``chunk`` over it ends its stream so, the
producer stopped; an ``event`` over it is not sent, the first logged. The SDK's real server
on loopback, a raw aiohttp client as the host; in reverse mode a raw aiohttp server as the
gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from linchkit_plugin import Plugin
from linchkit_plugin._ws_send_cap import bare_name, cap_of_header
from linchkit_plugin.errors import PluginError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.plugin import raw_params
from linchkit_plugin.ws_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES_HEADER,
    announced_cap,
)
from linchkit_plugin.ws_server import WebSocketPluginServer, dial

CAP = 4096


class CapPlugin(Plugin):
    id = "caps"
    version = "1.0.0"

    def __init__(self) -> None:
        self.stream_closed = asyncio.Event()
        self.chunks_made = 0

    @raw_params
    async def echo(self, params: Any) -> Any:
        return params

    async def blob(self, size: int) -> str:
        return "b" * size

    async def fail(self, size: int) -> None:
        raise PluginError("x" * size, remote_type="Big")

    async def blobs(self, sizes: list[int]) -> AsyncIterator[str]:
        try:
            for size in sizes:
                self.chunks_made += 1
                yield "y" * size
            await asyncio.Event().wait()  # never ends by itself: only a stop ends it
        finally:
            self.stream_closed.set()

    async def shout(self, name: str, size: int) -> bool:
        Plugin.emit(self, name, "z" * size)
        return True


def _frame(kind: str, call_id: int, method: str = "", params: Any = None) -> bytes:
    frame: dict[str, Any] = {"type": kind, "id": call_id}
    if method:
        frame["request"] = {"v": 1, "plugin": "caps", "method": method, "params": params}
    return orjson.dumps(frame)


async def _next(socket: Any, wanted: str, call_id: int | None = None) -> dict[str, Any]:
    """The next frame of type ``wanted`` (for ``call_id``), skipping others."""
    async with asyncio.timeout(10):
        while True:
            message = await socket.receive()
            assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
            frame: dict[str, Any] = orjson.loads(message.data)
            if frame["type"] == wanted and (call_id is None or frame.get("id") == call_id):
                return frame


def _too_large(what: str, size: int, limit: int) -> dict[str, Any]:
    return {
        "ok": False,
        "error": {
            "type": "provider_error",
            "message": f"{what} is {size} bytes, over the WebSocket message cap of {limit} bytes",
            "retryable": False,
            "details": {"reason": "too_large", "bytes": size, "limit": limit},
        },
    }


def _response_bytes(call_id: int, response: dict[str, Any]) -> int:
    return len(orjson.dumps({"type": "response", "id": call_id, "response": response}))


# The announcement, parsed.


@pytest.mark.parametrize(
    ("values", "cap"),
    [
        (["1024"], 1024),
        (["8388608"], 8388608),
        (["0004096"], 4096),
        (["9007199254740992"], 2**53),
    ],
)
def test_a_valid_header_announces_its_cap(values: list[str], cap: int) -> None:
    assert cap_of_header(values) == cap


@pytest.mark.parametrize(
    "values",
    [
        [],  # absent
        ["abc"],
        ["-5"],
        ["+4096"],
        ["1e6"],
        ["12.5"],
        ["100"],  # under 1,024
        ["1023"],
        [""],
        ["4096 "],
        ["0x1000"],
        ["\uff14\uff10\uff19\uff16"],  # digits, but not ASCII ones
        ["9007199254740993"],  # 2**53 + 1
        ["12345678901234567"],  # 17 digits
        ["4096", "4096"],  # sent twice
    ],
)
def test_anything_else_in_the_header_is_ignored(values: list[str]) -> None:
    assert cap_of_header(values) is None


@pytest.mark.parametrize("value", [1024, 4096, 2**53])
def test_a_valid_welcome_field_announces_its_cap(value: int) -> None:
    assert announced_cap(value) == value


@pytest.mark.parametrize(
    "value", [None, "4096", 12.5, 4096.0, True, 100, 1023, -5, 2**53 + 1, [4096], {"n": 1}]
)
def test_anything_else_in_the_welcome_is_ignored(value: Any) -> None:
    assert announced_cap(value) is None


def test_a_name_is_shown_escaped_cut_and_bare() -> None:
    assert bare_name("config") == "config"
    assert bare_name("a\nb\x1b") == "a\\nb\\x1b"
    assert bare_name("\u202e") == "\\u202e"
    assert bare_name("x" * 65) == "x" * 64 + "…"


# Served: the dispatcher dials in and announces its cap in the upgrade request.


@contextlib.asynccontextmanager
async def served(
    plugin: CapPlugin, headers: dict[str, str] | None = None, **options: Any
) -> AsyncIterator[tuple[WebSocketPluginServer, Any]]:
    """The plugin served, and a host connected with ``headers`` in its upgrade request."""
    server = WebSocketPluginServer(PluginHost(plugin), plugin_id="caps", version="1.0.0", **options)
    url = await server.start()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(url, headers=headers or {}, max_msg_size=0) as socket,
        ):
            assert (await _next(socket, "hello"))["id"] == "caps"
            yield server, socket
    finally:
        await server.aclose(grace=0.5)


async def test_the_hello_says_the_largest_message_the_plugin_reads() -> None:
    async with served(CapPlugin()) as (server, _):
        hello = orjson.loads(server.hello)
        assert hello["max_message_bytes"] == DEFAULT_MAX_MESSAGE_BYTES
        assert list(hello)[-1] == "max_message_bytes"  # after the fields it had
    async with served(CapPlugin(), max_message_bytes=2 * CAP) as (server, _):
        assert orjson.loads(server.hello)["max_message_bytes"] == 2 * CAP


async def _still_served(socket: Any, call_id: int = 99) -> None:
    """The connection is open and answers a call."""
    await socket.send_bytes(_frame("call", call_id, "echo", "still here"))
    answer = await _next(socket, "response", call_id)
    assert answer["response"] == {"ok": True, "result": "still here"}


async def test_a_result_over_the_announced_cap_is_answered_too_large_and_the_connection_stays() -> (
    None
):
    async with served(CapPlugin(), {MAX_MESSAGE_BYTES_HEADER: str(CAP)}) as (server, socket):
        (session,) = server.sessions
        assert session.send_cap == CAP
        # Just under and just over: the whole frame counts, as sent.
        under = "a" * (CAP - _response_bytes(1, {"ok": True, "result": ""}))
        await socket.send_bytes(_frame("call", 1, "echo", under))
        assert (await _next(socket, "response", 1))["response"] == {"ok": True, "result": under}
        over = under + "a"
        await socket.send_bytes(_frame("call", 2, "echo", over))
        answer = await _next(socket, "response", 2)
        size = _response_bytes(2, {"ok": True, "result": over})
        assert size == CAP + 1
        assert answer["response"] == _too_large("the result of echo", size, CAP)
        await _still_served(socket)
        assert not socket.closed


async def test_an_error_over_the_cap_is_answered_too_large() -> None:
    async with served(CapPlugin(), {MAX_MESSAGE_BYTES_HEADER: str(CAP)}) as (_, socket):
        await socket.send_bytes(_frame("call", 1, "fail", {"size": 2 * CAP}))
        answer = (await _next(socket, "response", 1))["response"]
        error = answer["error"]
        assert error["type"] == "provider_error"
        assert error["message"].startswith("the error of fail is ")
        assert error["details"]["reason"] == "too_large"
        assert error["details"]["bytes"] > 2 * CAP
        assert error["details"]["limit"] == CAP
        await _still_served(socket)


async def test_a_chunk_over_the_cap_ends_its_stream_too_large_and_stops_the_producer() -> None:
    plugin = CapPlugin()
    async with served(plugin, {MAX_MESSAGE_BYTES_HEADER: str(CAP)}) as (_, socket):
        # Another stream runs beside it on the connection, and goes on.
        await socket.send_bytes(_frame("stream", 7, "blobs", {"sizes": [10]}))
        assert (await _next(socket, "chunk", 7))["data"] == "y" * 10
        await socket.send_bytes(_frame("stream", 1, "blobs", {"sizes": [10, 20, 2 * CAP, 30]}))
        chunks = []
        async with asyncio.timeout(10):
            while True:
                frame = orjson.loads((await socket.receive()).data)
                if frame.get("id") != 1:
                    continue
                if frame["type"] == "response":
                    break
                chunks.append(frame["data"])
        assert chunks == ["y" * 10, "y" * 20]
        size = len(orjson.dumps({"type": "chunk", "id": 1, "data": "y" * 2 * CAP}))
        assert frame["response"] == _too_large("a chunk of blobs", size, CAP)
        async with asyncio.timeout(5):
            await plugin.stream_closed.wait()  # its finally ran: stopped, as a cancel does
        assert plugin.chunks_made == 4  # stream 7's one, and this one's three
        await _still_served(socket)
        # Stream 7 was not touched: a cancel still ends it, unanswered as any cancel.
        await socket.send_bytes(_frame("cancel", 7))
        await _still_served(socket, 100)


async def test_an_event_over_the_cap_is_not_sent_and_only_the_first_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with served(CapPlugin(), {MAX_MESSAGE_BYTES_HEADER: str(CAP)}) as (server, socket):
        (session,) = server.sessions
        with caplog.at_level(logging.WARNING, "linchkit_plugin.websocket"):
            for call_id, name in enumerate(["big\n", "bigger"], start=1):
                await socket.send_bytes(
                    _frame("call", call_id, "shout", {"name": name, "size": 2 * CAP})
                )
                # The method that emitted it is not failed.
                answer = await _next(socket, "response", call_id)
                assert answer["response"] == {"ok": True, "result": True}
            await socket.send_bytes(_frame("call", 3, "shout", {"name": "small", "size": 5}))
            assert (await _next(socket, "response", 3))["response"]["ok"] is True
            event = await _next(socket, "event")
        # The first event on the wire is the small one: the large ones never went out.
        assert event == {"type": "event", "event": "small", "data": "zzzzz"}
        assert session.events_too_large == 2
        size = len(orjson.dumps({"type": "event", "event": "big\n", "data": "z" * 2 * CAP}))
        warnings = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
        assert warnings == [
            f"event big\\n is {size} bytes, over the WebSocket message cap of {CAP} bytes: not sent"
        ]
        await _still_served(socket)


async def test_without_an_announcement_the_cap_is_the_plugins_own_8_mib() -> None:
    async with served(CapPlugin()) as (server, socket):
        (session,) = server.sessions
        assert session.send_cap == DEFAULT_MAX_MESSAGE_BYTES == 8 * 1024 * 1024
        # Over the announced cap of the other tests, under 8 MiB: sent.
        await socket.send_bytes(_frame("call", 1, "echo", "a" * 2 * CAP))
        assert (await _next(socket, "response", 1))["response"]["ok"] is True
        # Over 8 MiB: before, sent whole (and the host closed the connection, 1009).
        await socket.send_bytes(_frame("call", 2, "blob", {"size": DEFAULT_MAX_MESSAGE_BYTES}))
        answer = (await _next(socket, "response", 2))["response"]
        size = _response_bytes(2, {"ok": True, "result": "b" * DEFAULT_MAX_MESSAGE_BYTES})
        assert answer == _too_large("the result of blob", size, DEFAULT_MAX_MESSAGE_BYTES)
        await _still_served(socket)


@pytest.mark.parametrize("value", ["abc", "-5", "1e6", "12.5", "100", "99999999999999999"])
async def test_an_invalid_header_leaves_the_plugins_own_cap(value: str) -> None:
    async with served(CapPlugin(), {MAX_MESSAGE_BYTES_HEADER: value}) as (server, socket):
        (session,) = server.sessions
        assert session.send_cap == DEFAULT_MAX_MESSAGE_BYTES
        await socket.send_bytes(_frame("call", 1, "echo", "a" * 2 * CAP))
        assert (await _next(socket, "response", 1))["response"]["ok"] is True


async def test_the_plugins_own_cap_bounds_a_larger_announcement() -> None:
    async with served(
        CapPlugin(), {MAX_MESSAGE_BYTES_HEADER: str(4 * CAP)}, max_message_bytes=CAP
    ) as (server, socket):
        (session,) = server.sessions
        assert session.send_cap == CAP
        await socket.send_bytes(_frame("call", 1, "blob", {"size": 2 * CAP}))
        answer = (await _next(socket, "response", 1))["response"]
        assert answer["error"]["details"]["limit"] == CAP
        await _still_served(socket)


# Reverse mode: the gateway announces its cap in its welcome (and in its answer to the
# upgrade, below).


async def _gateway_answers(welcome: dict[str, Any], call: bytes) -> dict[str, Any]:
    """Run a gateway that says ``welcome``, sends ``call`` (id 1), and then a call of echo
    (id 2); have the SDK dial it; return call 1's response, once call 2 is answered too
    on the same connection."""
    answers: dict[int, dict[str, Any]] = {}

    async def gateway(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=0)
        await socket.prepare(request)
        hello = await _next(socket, "hello")
        assert hello["id"] == "caps"
        assert hello["max_message_bytes"] == DEFAULT_MAX_MESSAGE_BYTES
        await socket.send_bytes(orjson.dumps({"type": "welcome", "instance": "i-1", **welcome}))
        await socket.send_bytes(call)
        await socket.send_bytes(_frame("call", 2, "echo", "after"))
        for call_id in (1, 2):
            answers[call_id] = (await _next(socket, "response", call_id))["response"]
        done.set()
        await socket.close()
        return socket

    done = asyncio.Event()
    async with _dialled_by(CapPlugin(), gateway) as stopping:
        async with asyncio.timeout(10):
            await done.wait()
        stopping.set()
    assert answers[2] == {"ok": True, "result": "after"}
    return answers[1]


@contextlib.asynccontextmanager
async def _dialled_by(
    plugin: Plugin, gateway: Callable[[web.Request], Awaitable[web.WebSocketResponse]]
) -> AsyncIterator[asyncio.Event]:
    """``gateway`` served on loopback and ``plugin`` dialling it (``ws_server.dial``) until
    the event yielded is set; then the dial has ended and the gateway is gone."""
    app = web.Application()
    app.router.add_get("/", gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stopping = asyncio.Event()
    url = f"ws://127.0.0.1:{port}/"
    dialling = asyncio.create_task(
        dial(PluginHost(plugin), url, plugin_id="caps", version="1.0.0", stopping=stopping)
    )
    try:
        yield stopping
    finally:
        stopping.set()
        await asyncio.wait_for(dialling, 10)
        await runner.cleanup()


async def test_a_result_over_the_cap_the_welcome_announces_is_answered_too_large() -> None:
    over = "a" * 2 * CAP
    answer = await _gateway_answers({"max_message_bytes": CAP}, _frame("call", 1, "echo", over))
    size = _response_bytes(1, {"ok": True, "result": over})
    assert answer == _too_large("the result of echo", size, CAP)


@pytest.mark.parametrize("value", ["4096", 12.5, 100, -5, None, True])
async def test_an_invalid_welcome_field_leaves_the_plugins_own_cap(value: Any) -> None:
    over = "a" * 2 * CAP
    answer = await _gateway_answers({"max_message_bytes": value}, _frame("call", 1, "echo", over))
    assert answer == {"ok": True, "result": over}


async def test_a_welcome_without_the_field_leaves_the_plugins_own_cap() -> None:
    over = "a" * 2 * CAP
    answer = await _gateway_answers({}, _frame("call", 1, "echo", over))
    assert answer == {"ok": True, "result": over}


# Reverse mode, before the welcome: the gateway's answer to the upgrade says its cap.


class KeepingPlugin(CapPlugin):
    """Emits while no gateway is connected yet: the events wait for the first connection."""

    async def start(self) -> None:
        Plugin.emit(self, "kept-big", "z" * 2 * CAP)
        Plugin.emit(self, "kept-small", "z")


async def test_events_kept_while_disconnected_are_held_to_the_upgrade_s_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """They go out right after the hello, before any welcome: only the cap in the answer to
    the upgrade can bound them. Sent, one over it would close the connection (1009)."""
    events: list[str] = []

    async def gateway(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(max_msg_size=0)
        socket.headers[MAX_MESSAGE_BYTES_HEADER] = str(CAP)
        await socket.prepare(request)
        await _next(socket, "hello")
        while "kept-small" not in events:
            events.append((await _next(socket, "event"))["event"])
        done.set()
        await socket.close()
        return socket

    done = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="linchkit_plugin.websocket")
    async with _dialled_by(KeepingPlugin(), gateway) as stopping:
        async with asyncio.timeout(10):
            await done.wait()
        stopping.set()
    assert events == ["kept-small"]
    assert f"over the WebSocket message cap of {CAP} bytes: not sent" in caplog.text
    assert "event kept-big is" in caplog.text
