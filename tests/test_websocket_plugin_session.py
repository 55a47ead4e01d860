"""The Python SDK's WebSocket session (``linchkit_plugin._ws_session``) under a host that
reads slowly and cancels: its real server on loopback, a raw aiohttp client as the host.

aiohttp (3.14) has every writer waiting for the socket to drain await one shared future,
and keeps it once a waiter is cancelled: every later wait on it raises ``CancelledError``
at once. When each call task wrote its own answer, the host cancelling one call whose
answer waited for the socket ended another call's stream there, without its answer. One
writer task per session now writes every frame; a cancelled call only gives up its own.

The plugin's events for a host that reads nothing wait in a bounded queue, the oldest
dropped past it, as in every SDK; the ``dropped`` frame behind those that waited for a host
waits there too, and is never dropped.

A host's ``error`` frames (it could not use a frame of ours) are logged, escaped, and only
the first few of a connection: a host chooses how many it sends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
import pytest

from linchkit_plugin import Plugin
from linchkit_plugin._ws_session import _SESSION_EVENT_QUEUE, LOGGED_HOST_ERRORS
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_server import WebSocketPluginServer

#: An answer large enough to fill the loopback socket's buffers while the host reads nothing.
BIG = 6 * 1024 * 1024
#: Chunks of this size go over aiohttp's write limit (256 KiB for a server's WebSocket) by
#: the third: that one waits for the socket to drain.
CHUNK = 100_000
CHUNKS = 8


class BlobPlugin(Plugin):
    id = "blobs"
    version = "1.0.0"

    async def blob(self, size: int) -> str:
        return "x" * size

    async def blobs(self, n: int, size: int) -> AsyncIterator[str]:
        for _ in range(n):
            yield "y" * size


def _frame(kind: str, call_id: int, method: str = "", params: Any = None) -> bytes:
    frame: dict[str, Any] = {"type": kind, "id": call_id}
    if method:
        frame["request"] = {"v": 1, "plugin": "blobs", "method": method, "params": params}
    return orjson.dumps(frame)


async def _until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the server's state, polled
            await asyncio.sleep(0.005)


async def _stall_the_socket(socket: Any, writing: Any, call_ids: Iterable[int]) -> list[int]:
    """Send a large call under each of ``call_ids`` while the host reads nothing, until the
    session's socket takes no more writes: the ids sent. aiohttp's reader stops taking from
    the socket once a whole answer waits in its queue, so large answers fill the socket's
    buffers until the last one waits for them to drain."""
    sent = []
    for call_id in call_ids:
        await socket.send_bytes(_frame("call", call_id, "blob", {"size": BIG}))
        sent.append(call_id)
        await asyncio.sleep(0.3)  # written, and taken by the socket if it can
        if writing.protocol.writing_paused:
            break
    assert writing.protocol.writing_paused
    return sent


@contextlib.asynccontextmanager
async def _served_to_a_raw_host(plugin: BlobPlugin) -> AsyncIterator[tuple[Any, Any, Any]]:
    """``plugin`` served, and a raw host connected that has read its hello: the host's
    socket, the plugin's session, and the session's aiohttp writer (whose transport's flow
    control says when the socket takes no more)."""
    server = WebSocketPluginServer(PluginHost(plugin), plugin_id="blobs", version="1.0.0")
    url = await server.start()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(url, max_msg_size=0) as socket,
        ):
            assert orjson.loads((await socket.receive()).data)["type"] == "hello"
            (session,) = server.sessions
            writing = session.socket._writer
            assert writing is not None
            yield socket, session, writing
    finally:
        await server.aclose(grace=0.5)


async def test_a_call_cancelled_while_its_answer_waits_for_the_socket_breaks_no_other() -> None:
    async with _served_to_a_raw_host(BlobPlugin()) as (socket, session, writing):
        # The host reads nothing from here on.
        big = [1, 3, 5, 7]
        await _stall_the_socket(socket, writing, big)
        # Stream 2 starts behind them; then the host cancels the large calls.
        await socket.send_bytes(_frame("stream", 2, "blobs", {"n": CHUNKS, "size": CHUNK}))
        await _until(lambda: 2 in session._tasks)
        await asyncio.sleep(0.1)  # stream 2's first chunk waits to go out
        for call_id in big:
            await socket.send_bytes(_frame("cancel", call_id))
        await _until(lambda: not set(big) & set(session._tasks))
        await asyncio.sleep(0.1)  # stream 2 goes on: before, it ended here
        await socket.send_bytes(_frame("health", 9))

        # The host reads again: stream 2 is whole and answered, and the session serves.
        chunks = 0
        answered: dict[str, Any] = {}
        health: dict[str, Any] = {}
        async with asyncio.timeout(10):
            while not (answered and health):
                frame = orjson.loads((await socket.receive()).data)
                if frame["type"] == "chunk" and frame["id"] == 2:
                    chunks += 1
                elif frame["type"] == "response" and frame["id"] == 2:
                    answered = frame["response"]
                elif frame["type"] == "health":
                    health = frame
        assert chunks == CHUNKS
        assert answered == {"ok": True, "result": None}
        assert health["status"] == "serving"
        assert not session._tasks


def _client_frame(payload: bytes) -> bytes:
    """``payload`` as a masked text frame, as a client sends it (RFC 6455, section 5.2)."""
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


async def test_a_host_that_stops_reading_is_dropped_after_one_and_a_half_heartbeats() -> None:
    # The host stops reading while the plugin writes it a large answer, and goes on
    # sending (frames the session takes and answers nothing to), which keeps aiohttp's
    # heartbeat from finding it: before, the session's writer waited for it for ever,
    # and so did every answer behind it. A write it takes nothing of for 1.5 heartbeats
    # now drops the connection, as the dispatcher drops a plugin that does so.
    heartbeat = 0.4
    server = WebSocketPluginServer(
        PluginHost(BlobPlugin()), plugin_id="blobs", version="1.0.0", heartbeat=heartbeat
    )
    url = await server.start()
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(peer, (host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(peer, upgrade.encode())
        answer = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in answer:
                answer += await loop.sock_recv(peer, 1024)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        await _until(lambda: len(server.sessions) == 1)
        (session,) = server.sessions
        assert session.stall_after == pytest.approx(1.5 * heartbeat)
        # From here the host reads nothing.
        await loop.sock_sendall(peer, _client_frame(_frame("call", 1, "blob", {"size": BIG})))
        await _until(lambda: session._draining)
        stalled_at = loop.time()
        keep_sending = _client_frame(orjson.dumps({"type": "credit", "id": 99, "n": 1}))
        dropped = None
        async with asyncio.timeout(10):
            while dropped is None:
                try:
                    await loop.sock_sendall(peer, keep_sending)
                except OSError as error:  # reset: the plugin dropped the connection
                    dropped = error
                await asyncio.sleep(0.05)
        assert loop.time() - stalled_at < 1.5 * heartbeat + 1.0
        await _until(lambda: not server.sessions)
        assert session.ended.is_set()
    finally:
        peer.close()
    try:
        # The plugin serves on: a host that reads is answered.
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(url, max_msg_size=0) as good,
        ):
            assert orjson.loads((await good.receive()).data)["type"] == "hello"
            await good.send_bytes(_frame("health", 2))
            assert orjson.loads((await good.receive()).data)["status"] == "serving"
    finally:
        await server.aclose(grace=0.5)


async def test_events_for_a_host_that_does_not_read_keep_the_newest_1024(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The host stops reading until large answers fill the socket, then the plugin emits
    # three times the bound. Before, the session kept the first 1,024 events and dropped the
    # newest; it now keeps the newest, as the Go, Rust and Java SDKs and an Events stream do,
    # and hands none to the socket while it takes no more.
    plugin = BlobPlugin()
    emitted = 3 * _SESSION_EVENT_QUEUE
    async with _served_to_a_raw_host(plugin) as (socket, session, writing):
        calls = len(await _stall_the_socket(socket, writing, range(1, 9)))
        await _until(lambda: session._draining)
        with caplog.at_level(logging.WARNING, "linchkit_plugin.websocket"):
            for seq in range(emitted):
                plugin.emit("tick", {"seq": seq})
            await asyncio.sleep(0.1)  # the events sender's turn: it hands nothing over
        assert session.events_dropped == emitted - _SESSION_EVENT_QUEUE
        warnings = [r for r in caplog.records if "not reading" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert warnings[0].getMessage() == (
            "the host is not reading its Events stream; dropping the oldest events"
        )

        # The host reads again: its answers, and the newest 1,024 events, in order.
        answers = 0
        ticks: list[int] = []
        async with asyncio.timeout(30):
            while answers < calls or len(ticks) < _SESSION_EVENT_QUEUE:
                frame = orjson.loads((await socket.receive()).data)
                if frame["type"] == "response":
                    answers += 1
                elif frame["type"] == "event":
                    ticks.append(frame["data"]["seq"])
        assert ticks == list(range(emitted - _SESSION_EVENT_QUEUE, emitted))
        # Nothing more waits: a health probe is answered next.
        await socket.send_bytes(_frame("health", 99))
        assert orjson.loads((await socket.receive()).data)["type"] == "health"
        assert session.events_dropped == emitted - _SESSION_EVENT_QUEUE


async def test_the_dropped_frame_outlives_a_flood_of_events_and_says_its_count() -> None:
    # Events emitted while no host is connected go to the next one, then a ``dropped`` frame
    # with the count lost from them. Before, that frame waited among the events for a host
    # that reads nothing, and a flood dropped it once it was the oldest, the count with it.
    plugin = BlobPlugin()
    lost_before_a_host = 7
    waited = 1000  # the server's max_buffered_events
    flood = 3 * _SESSION_EVENT_QUEUE
    server = WebSocketPluginServer(PluginHost(plugin), plugin_id="blobs", version="1.0.0")
    url = await server.start()
    try:
        # 32 KiB each: those that waited fill the loopback socket's buffers, most wait on.
        for seq in range(waited + lost_before_a_host):
            plugin.emit("waited", {"seq": seq, "pad": "w" * 32_768})
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(url, max_msg_size=0) as socket,
        ):
            assert orjson.loads((await socket.receive()).data)["type"] == "hello"
            (session,) = server.sessions
            await _until(lambda: session._draining)
            # The dropped frame, behind those that waited, waits too.
            assert len(session._events) > 1, "the socket took them all: make them larger"
            for seq in range(flood):
                plugin.emit("flood", {"seq": seq})

            # The host reads again, up to the flood's last event.
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(30):
                while not frames or frames[-1].get("data") != {"seq": flood - 1}:
                    frames.append(orjson.loads((await socket.receive()).data))
    finally:
        await server.aclose(grace=0.5)
    at = [i for i, frame in enumerate(frames) if frame["type"] == "dropped"]
    assert len(at) == 1, f"dropped frames at {at} (none: lost in the flood)"
    assert frames[at[0]] == {"type": "dropped", "count": lost_before_a_host}
    # Those that waited for a host before it, then the newest of the flood in order: as
    # many as the queue holds beside the dropped frame.
    assert {frame.get("event") for frame in frames[: at[0]]} == {"waited"}
    after = [frame["data"]["seq"] for frame in frames[at[0] + 1 :]]
    assert after == list(range(flood - (_SESSION_EVENT_QUEUE - 1), flood))


#: A host's text for an operator's terminal: a screen clear, then a line of its own.
FORGED = "\x1b[2J\nINFO forged: the plugin stopped"


async def test_the_host_s_error_frames_are_logged_escaped_and_only_the_first_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, every error frame made a line: 1,000 frames, 1,000 lines.
    flood = 1000
    async with _served_to_a_raw_host(BlobPlugin()) as (socket, session, _):
        with caplog.at_level(logging.INFO, "linchkit_plugin.websocket"):
            forged = {"type": "error", "error": {"type": "provider_error", "message": FORGED}}
            await socket.send_bytes(orjson.dumps(forged))
            flooded = orjson.dumps({"type": "error", "id": 3, "error": {"message": "again"}})
            for _ in range(flood - 1):
                await socket.send_bytes(flooded)
            # None is answered, and the session serves on: the call's answer comes next.
            await socket.send_bytes(_frame("call", 1, "blob", {"size": 3}))
            async with asyncio.timeout(10):
                answer = orjson.loads((await socket.receive()).data)
        assert answer == {"type": "response", "id": 1, "response": {"ok": True, "result": "xxx"}}
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "linchkit_plugin.websocket" and record.levelno == logging.INFO
    ]
    assert lines == [
        "the host could not use a frame: \\x1b[2J\\nINFO forged: the plugin stopped",
        *["the host could not use a frame: again"] * (LOGGED_HOST_ERRORS - 1),
        f"the host sent more than {LOGGED_HOST_ERRORS} error frames on this connection;"
        " further ones are not logged",
    ]
    assert session.host_errors == flood


async def test_the_host_s_dropped_frames_are_logged_only_the_first_few(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, every dropped frame made a line: 1,000 frames, 1,000 lines.
    async with _served_to_a_raw_host(BlobPlugin()) as (socket, session, _):
        with caplog.at_level(logging.INFO, "linchkit_plugin.websocket"):
            for count in range(1, 1001):
                await socket.send_bytes(orjson.dumps({"type": "dropped", "count": count}))
            await socket.send_bytes(_frame("call", 1, "blob", {"size": 3}))
            async with asyncio.timeout(10):
                answer = orjson.loads((await socket.receive()).data)
        assert answer == {"type": "response", "id": 1, "response": {"ok": True, "result": "xxx"}}
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "linchkit_plugin.websocket" and record.levelno == logging.INFO
    ]
    assert session.host_dropped == 1000
    assert lines[0] == "host says: {'type': 'dropped', 'count': 1}"
    assert len(lines) == LOGGED_HOST_ERRORS + 1, lines
    assert lines[-1] == (
        f"the host sent more than {LOGGED_HOST_ERRORS} dropped frames on this connection;"
        " further ones are not logged"
    )
