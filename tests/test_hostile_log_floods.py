"""A plugin that tries to flood the host's log: a real aiohttp WebSocket plugin sends
thousands of frames the host cannot use (not JSON, and ``error`` frames answering no call
whose message is long and full of terminal escapes), and a real grpc.aio plugin streams
thousands of events whose data is not JSON under a long, escaped name.

Every such frame is counted, and the log says what happened without repeating it per
frame: a few WARNING lines (the first, then at 1,000 and every 100,000), each short, with
whatever the plugin wrote escaped. Before, each frame made a line: a plugin chose how many
lines the host wrote, how long each was (the whole of a message up to the connection's
cap) and what escape sequences reached an operator's terminal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from dispatcher import Dispatcher
from linchkit_plugin._proto import plugin_pb2, plugin_pb2_grpc
from linchkit_plugin.ws_protocol import hello_frame
from tests.conftest import manifest
from tests.hostile_peers import grpc_plugin, websocket_plugin
from tests.services import until

#: What a plugin writes for an operator's terminal: a colour, a line of its own, then much.
SHOUTED = "\x1b[31mPWNED\nERROR fake line " + "x" * 20_000
FRAMES = 1_500
#: Characters a line about what a plugin sent may take: the words, and 200 of its own.
LINE_CHARS = 400


def lines_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == logger and record.levelno >= logging.WARNING
    ]


async def test_frames_a_websocket_plugin_sends_that_cannot_be_used_are_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: 3,000 WARNING lines here, those of the error frames 20,000 characters each
    with the escape and the newline as sent."""
    caplog.set_level(logging.WARNING, logger="dispatcher.providers.websocket")
    error = orjson.dumps({"type": "error", "error": {"type": "Oops", "message": SHOUTED}})

    async def plugin(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(hello_frame("noisy", "1.0.0", ["echo"]))
        for _ in range(FRAMES):
            await ws.send_str("not json at all")
            await ws.send_bytes(error)  # answering no call
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            frame = orjson.loads(message.data)
            if frame["type"] == "call":
                response = {"ok": True, "result": "after the flood"}
                await ws.send_bytes(
                    orjson.dumps({"type": "response", "id": frame["id"], "response": response})
                )
        return ws

    async with websocket_plugin(plugin) as url:
        entry = {
            "id": "noisy",
            "version": "1.0.0",
            "target": {"provider": "websocket", "url": url},
            "methods": {"echo": {}},
        }
        async with Dispatcher(manifest(entry)) as dispatcher:
            assert await dispatcher.call("noisy", "echo", {}) == "after the flood"
            (dialed,) = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
            assert dialed.channel.protocol_errors == 2 * FRAMES  # every one counted
    lines = lines_of(caplog, "dispatcher.providers.websocket")
    assert 2 <= len(lines) <= 6, len(lines)  # the first, the 1,000th
    assert all(len(line) <= LINE_CHARS for line in lines), max(map(len, lines))
    assert not any("\x1b" in line or "\n" in line for line in lines)
    assert any("\\x1b[31mPWNED\\nERROR" in line for line in lines)  # said, escaped


class EventsNotJson(plugin_pb2_grpc.PluginServiceServicer):
    async def Call(self, request: Any, context: Any) -> Any:
        return plugin_pb2.CallReply(ok=True, result_json=b'"after the flood"')

    async def Events(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        for _ in range(FRAMES):
            yield plugin_pb2.PluginEvent(name=SHOUTED, data_json=b"{not json")
        yield plugin_pb2.PluginEvent(name="done", data_json=b"true")
        await asyncio.Event().wait()


async def test_events_a_grpc_plugin_sends_that_are_not_json_are_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: 1,500 WARNING lines here, each with the event's whole name (20,000
    characters; up to the channel's 64 MiB)."""
    caplog.set_level(logging.WARNING, logger="dispatcher.providers.grpc")
    done: list[Any] = []
    async with grpc_plugin(EventsNotJson()) as address:
        entry = {
            "id": "noisy",
            "version": "1.0.0",
            "target": {"provider": "grpc", "address": address},
            "methods": {"echo": {}},
        }
        dispatcher = Dispatcher(manifest(entry))
        dispatcher.on("noisy", "done", lambda event, data: done.append(data))
        async with dispatcher:
            await until(lambda: done == [True], "the event after the flood")
            assert await dispatcher.call("noisy", "echo", {}) == "after the flood"
    lines = lines_of(caplog, "dispatcher.providers.grpc")
    assert 1 <= len(lines) <= 3, len(lines)
    assert all(len(line) <= LINE_CHARS for line in lines), max(map(len, lines))
    assert not any("\x1b" in line or "\n" in line for line in lines)
