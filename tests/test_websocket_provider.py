"""provider: websocket in dial mode, against the SDK's real WebSocket server on loopback,
through a TCP proxy the tests control (tests/fault_proxy.py) to drop, delay, cut and
blackhole the wire. No mocks: real sockets, real aiohttp on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from socket_plugin import SocketPlugin

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    PluginError,
    TargetUnavailable,
)
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_protocol import GOAWAY_GRACE
from linchkit_plugin.ws_server import WebSocketPluginServer
from tests.conftest import manifest
from tests.fault_proxy import FaultProxy

METHODS = ("echo", "sleep", "count", "burst", "fail")


@dataclass
class Rig:
    plugin: SocketPlugin
    server: WebSocketPluginServer
    proxy: FaultProxy
    dispatcher: Dispatcher
    events: list[tuple[str, Any]]

    def provider(self) -> Any:
        return self.dispatcher.providers["websocket"]

    def dialed(self) -> Any:
        (dialed,) = self.provider().dialed
        return dialed


def _manifest(port: int, **target: Any) -> Any:
    methods: dict[str, Any] = {name: {} for name in METHODS}
    # Every call may retry (budget_ratio 1): the drops here cut whatever is in flight, and on
    # a starved machine that was more than the default budget's 20 tokens once, which is
    # the budget's job, not the drops' this file tests.
    retry = {"attempts": 5, "initial_backoff_ms": 20, "budget_ratio": 1}
    methods["echo"] = {"idempotent": True, "retry": retry}
    return manifest(
        {
            "id": "sock",
            "version": "1.0.0",
            "target": {
                "provider": "websocket",
                "url": f"ws://127.0.0.1:{port}/",
                "reconnect_backoff_ms": 20,
                "reconnect_backoff_max_ms": 200,
                **target,
            },
            "defaults": {"timeout_ms": 10_000},
            "methods": methods,
        }
    )


@contextlib.asynccontextmanager
async def rigged(**target: Any) -> AsyncIterator[Rig]:
    plugin = SocketPlugin()
    server = WebSocketPluginServer(PluginHost(plugin), plugin_id="sock", version="1.0.0")
    url = await server.start()
    proxy = FaultProxy("127.0.0.1", int(url.rsplit(":", 1)[1]))
    port = await proxy.start()
    events: list[tuple[str, Any]] = []
    dispatcher = Dispatcher(_manifest(port, **target))
    dispatcher.on("sock", "*", lambda event, data: events.append((event, data)))
    try:
        async with dispatcher:
            yield Rig(plugin, server, proxy, dispatcher, events)
    finally:
        await proxy.aclose()
        await server.aclose()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with rigged() as each:
        yield each


async def _until(condition: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.01)


async def test_calls_streams_errors_and_events_both_ways(rig: Rig) -> None:
    d = rig.dispatcher
    assert await d.call("sock", "echo", {"value": {"a": [1, "é"]}}) == {"a": [1, "é"]}
    assert [chunk async for chunk in d.stream("sock", "count", {"n": 5})] == [0, 1, 2, 3, 4]
    with pytest.raises(PluginError) as raised:
        await d.call("sock", "fail", {"message": "broken"})
    assert raised.value.remote_type == "LookupError"
    assert await d.call("sock", "burst", {"name": "tick", "count": 3}) == 3
    await _until(lambda: len(rig.events) == 3)
    assert rig.events == [("tick", {"n": 0}), ("tick", {"n": 1}), ("tick", {"n": 2})]
    await d.publish("sock", "hello", {"x": 1})
    await _until(lambda: rig.plugin.received == [("hello", {"x": 1})])
    (health,) = await d.health()
    assert health.health.ok, health
    assert rig.proxy.connections == 1


async def test_health_just_after_start_waits_for_the_first_dial() -> None:
    """``dispatcher health`` starts a dispatcher and probes at once: the dial still under way
    is waited for (within the probe), not reported as a plugin that is down."""
    async with rigged() as rig:
        (report,) = await rig.dispatcher.health()
        assert report.health.status == "serving", report


async def test_health_of_a_plugin_that_is_not_running_says_so_at_once() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with Dispatcher(_manifest(port)) as dispatcher:
        started = time.monotonic()
        (report,) = await dispatcher.health(timeout=5)
    assert report.health.status == "not_serving", report
    assert "cannot connect" in report.health.detail
    assert time.monotonic() - started < 2  # the refused dial, not the probe's timeout


async def test_a_thousand_calls_in_flight_on_one_connection(rig: Rig) -> None:
    d = rig.dispatcher
    results = await asyncio.gather(
        *(d.call("sock", "sleep", {"seconds": 0.2, "value": i}) for i in range(1000))
    )
    assert results == list(range(1000))  # every result to its own caller
    assert rig.proxy.connections == 1
    assert len(rig.plugin.ran) == len(set(rig.plugin.ran)) == 1000
    channel = rig.dialed().channel
    assert channel.in_flight == 0 and channel.unknown_ids == 0


async def test_a_drop_mid_call_fails_in_flight_calls_typed_and_reconnects(rig: Rig) -> None:
    d = rig.dispatcher
    await d.call("sock", "echo", {"value": 0})
    calls = [
        asyncio.ensure_future(d.call("sock", "sleep", {"seconds": 5, "value": i}))
        for i in range(20)
    ]
    await _until(lambda: len(rig.plugin.ran) == 21)
    rig.proxy.drop()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:  # sleep is not idempotent: never resent, failed typed
        assert isinstance(outcome, TargetUnavailable), outcome
        assert outcome.retryable and outcome.details["stage"] == "in_flight"
    # The next calls wait for the reconnect (backoff 20-200 ms) and go through.
    assert await d.call("sock", "echo", {"value": "after"}) == "after"
    assert rig.proxy.connections == 2


async def test_drops_under_load_lose_and_duplicate_no_result(rig: Rig) -> None:
    """Idempotent calls retried across repeated drops: each caller gets exactly its own
    value back, once."""
    d = rig.dispatcher

    async def dropper() -> None:
        for _ in range(3):
            await asyncio.sleep(0.15)
            rig.proxy.drop()

    values = list(range(300))
    drops = asyncio.ensure_future(dropper())

    async def one(value: int) -> Any:
        await asyncio.sleep(value / 1000)
        return await d.call("sock", "echo", {"value": value})

    results = await asyncio.gather(*(one(v) for v in values))
    await drops
    assert results == values
    assert rig.proxy.connections >= 2


async def test_delayed_frames_still_answer_and_deadlines_are_typed(rig: Rig) -> None:
    d = rig.dispatcher
    rig.proxy.delay = 0.05
    assert await d.call("sock", "echo", {"value": 1}) == 1
    with pytest.raises(DeadlineExceeded):
        await d.call("sock", "sleep", {"seconds": 1.0}, timeout=0.3)
    await _until(lambda: rig.plugin.cancelled == 1)  # the cancel frame reached the plugin
    rig.proxy.delay = 0
    assert await d.call("sock", "echo", {"value": 2}) == 2
    assert rig.dialed().channel.unknown_ids <= 1  # a late answer, if any, is dropped


async def test_a_frame_cut_in_half_is_a_typed_failure_then_a_reconnect(rig: Rig) -> None:
    d = rig.dispatcher
    assert await d.call("sock", "echo", {"value": 1}) == 1
    rig.proxy.cut_next("to_host")
    with pytest.raises(TargetUnavailable) as raised:
        await d.call("sock", "sleep", {"seconds": 0, "value": "x" * 1000})
    assert raised.value.details["stage"] == "in_flight"
    assert await d.call("sock", "echo", {"value": 2}) == 2
    assert rig.proxy.connections == 2


async def test_a_half_open_connection_is_detected_within_the_keepalive_window() -> None:
    async with rigged(heartbeat_ms=400) as rig:
        d = rig.dispatcher
        assert await d.call("sock", "echo", {"value": 1}) == 1
        rig.proxy.blackhole()  # no FIN, no RST: bytes simply stop
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TargetUnavailable):
            await d.call("sock", "sleep", {"seconds": 0.01}, timeout=30)
        assert loop.time() - started < 10  # the keepalive (0.4 s + 0.2 s), not the deadline
        (health,) = await d.health()
        assert not health.health.ok
        rig.proxy.drop()
        rig.proxy.restore()
        assert await d.call("sock", "echo", {"value": 2}) == 2


async def test_host_events_sent_while_disconnected_are_delivered_after_reconnect() -> None:
    async with rigged(event_buffer=3) as rig:
        d = rig.dispatcher
        assert await d.call("sock", "echo", {"value": 1}) == 1
        rig.proxy.refusing = True
        rig.proxy.drop()
        await _until(lambda: rig.dialed().channel is None or rig.dialed().channel.closed)
        for index in range(5):
            await d.publish("sock", "queued", index)
        rig.proxy.refusing = False
        await _until(lambda: len(rig.plugin.received) == 3)
        # The buffer keeps the newest 3; the 2 dropped are counted and reported.
        assert rig.plugin.received == [("queued", 2), ("queued", 3), ("queued", 4)]
        assert rig.dialed().events_dropped == 0  # reported to the plugin, then reset


async def test_a_plugin_that_is_not_running_fails_calls_typed_within_the_connect_timeout() -> None:
    async with rigged(connect_timeout_ms=300) as rig:
        await rig.server.aclose()
        rig.proxy.drop()
        with pytest.raises(TargetUnavailable) as raised:
            await rig.dispatcher.call("sock", "sleep", {"seconds": 0})
        assert raised.value.details["stage"] == "connect"


async def test_a_slow_stream_reader_holds_its_stream_not_the_connection(rig: Rig) -> None:
    """Per-stream credit: the plugin sends a window of chunks, then waits for the host's
    credit; the host holds at most that window, and other calls go on meanwhile."""
    from linchkit_plugin.ws_protocol import STREAM_WINDOW

    d = rig.dispatcher
    stream = d.stream("sock", "count", {"n": 5_000})
    received = [await anext(stream)]
    await asyncio.sleep(0.5)  # the plugin fills its window, then waits
    channel = rig.dialed().channel
    (queue,) = channel._in_flight.streams.values()
    assert STREAM_WINDOW // 2 <= queue.qsize() <= STREAM_WINDOW
    assert await d.call("sock", "echo", {"value": "meanwhile"}) == "meanwhile"
    received += [chunk async for chunk in stream]
    assert received == list(range(5_000))


# -- a plugin that stops: goaway ---------------------------------------------------------------


async def test_a_plugin_going_away_finishes_its_calls_and_the_next_go_to_its_successor() -> None:
    """The plugin stops (``aclose``: goaway): its 20 calls in flight are answered, the host
    closes the connection once they are (well before the plugin's grace), and a call made
    meanwhile goes over a new connection, here to a successor the proxy now points at.
    Before goaway every call in flight failed with the connection (close 1001/1006)."""
    async with rigged() as rig:
        d = rig.dispatcher
        calls = [
            asyncio.create_task(d.call("sock", "sleep", {"seconds": 0.5, "value": i}))
            for i in range(20)
        ]
        # Every call running in the plugin (its session's tasks) before it is stopped.
        await _until(lambda: sum(len(s._tasks) for s in rig.server.sessions) == 20)
        successor_plugin = SocketPlugin()
        successor = WebSocketPluginServer(
            PluginHost(successor_plugin), plugin_id="sock", version="1.0.0"
        )
        successor_url = await successor.start()
        try:
            rig.proxy.upstream = ("127.0.0.1", int(successor_url.rsplit(":", 1)[1]))
            first = rig.dialed().channel
            started = asyncio.get_running_loop().time()
            stopping = asyncio.create_task(rig.server.aclose())
            await _until(lambda: first.going_away)
            assert await d.call("sock", "echo", {"value": 7}) == 7  # on the successor
            assert await asyncio.gather(*calls) == list(range(20))
            await stopping
            assert asyncio.get_running_loop().time() - started < GOAWAY_GRACE - 1
            assert rig.proxy.connections == 2
            assert len(successor.sessions) == 1
        finally:
            await successor.aclose()


async def test_a_host_that_ignores_goaway_is_closed_after_the_grace_its_calls_answered() -> None:
    """A host that predates goaway keeps the connection: the plugin answers what it still
    sends, then closes it (1001) after the grace."""
    server = WebSocketPluginServer(PluginHost(SocketPlugin()), plugin_id="sock", version="1.0.0")
    url = await server.start()
    async with aiohttp.ClientSession() as client, client.ws_connect(url) as socket:
        assert orjson.loads((await socket.receive()).data)["type"] == "hello"
        stopping = asyncio.create_task(server.aclose(grace=0.5))
        assert orjson.loads((await socket.receive()).data) == {"type": "goaway"}
        request = {"v": 1, "plugin": "sock", "method": "echo", "params": {"value": 3}}
        await socket.send_bytes(orjson.dumps({"type": "call", "id": 1, "request": request}))
        answer = orjson.loads((await socket.receive()).data)
        assert answer == {"type": "response", "id": 1, "response": {"ok": True, "result": 3}}
        closing = await socket.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert socket.close_code == 1001
        await asyncio.wait_for(stopping, 5)
