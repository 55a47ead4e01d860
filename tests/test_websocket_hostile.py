"""provider: websocket against plugins that lie: a real aiohttp WebSocket server on
loopback whose behaviour each test scripts (non-JSON, unknown ids, oversized messages,
event floods, a plugin that stops reading, a plugin calling the host, a wrong hello).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web

from dispatcher import DeadlineExceeded, Dispatcher, Overloaded, TargetUnavailable
from linchkit_plugin.ws_protocol import MAX_MESSAGE_BYTES_HEADER, hello_frame
from tests.conftest import manifest

Script = Callable[[web.WebSocketResponse], Awaitable[None]]
HELLO = hello_frame("liar", "1.0.0", ["echo"])


@contextlib.asynccontextmanager
async def scripted(
    script: Script, *, upgrades: list[web.Request] | None = None, **target: Any
) -> AsyncIterator[Dispatcher]:
    """A dispatcher dialling a plugin that runs ``script`` on each connection; each
    connection's upgrade request into ``upgrades``."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        if upgrades is not None:
            upgrades.append(request)
        ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)
        with contextlib.suppress(ConnectionError):
            await script(ws)
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    dispatcher = Dispatcher(
        manifest(
            {
                "id": "liar",
                "version": "1.0.0",
                "target": {
                    "provider": "websocket",
                    "url": f"ws://127.0.0.1:{port}/",
                    "reconnect_backoff_ms": 50,
                    "reconnect_backoff_max_ms": 200,
                    **target,
                },
                "defaults": {"timeout_ms": 3_000},
                "methods": {"echo": {}},
            }
        )
    )
    try:
        async with dispatcher:
            yield dispatcher
    finally:
        await runner.cleanup()


def channel_of(dispatcher: Dispatcher) -> Any:
    (dialed,) = dispatcher.providers["websocket"].dialed  # type: ignore[attr-defined]
    return dialed.channel


async def answer_calls(ws: web.WebSocketResponse, before: Callable[[int], list[bytes]]) -> None:
    """Answer every call with its params, first sending what ``before(id)`` returns."""
    await ws.send_bytes(HELLO)
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            return
        frame = orjson.loads(message.data)
        if frame["type"] == "call":
            for extra in before(frame["id"]):
                await ws.send_str(extra.decode())
            response = {"ok": True, "result": frame["request"]["params"]}
            await ws.send_str(
                orjson.dumps({"type": "response", "id": frame["id"], "response": response}).decode()
            )


@pytest.mark.parametrize("bound", [None, 65_536], ids=["default", "set"])
async def test_the_upgrade_tells_the_plugin_the_largest_message_the_host_reads(
    bound: int | None,
) -> None:
    """Its target's ``max_message_bytes``, so that the plugin refuses its own larger answer
    as that call's ``too_large`` error: sent, it would close the connection (1009) under
    every call on it."""
    upgrades: list[web.Request] = []
    target = {} if bound is None else {"max_message_bytes": bound}
    async with scripted(
        lambda ws: answer_calls(ws, lambda _: []), upgrades=upgrades, **target
    ) as d:
        assert await d.call("liar", "echo", {"n": 1}) == {"n": 1}
    (upgrade,) = upgrades
    assert upgrade.headers[MAX_MESSAGE_BYTES_HEADER] == str(bound or 8 * 1024 * 1024)


async def test_garbage_and_unknown_ids_are_counted_and_dropped_calls_still_answer() -> None:
    garbage = [
        b"not json at all",
        b"[1, 2, 3]",
        b'{"no": "type"}',
        b'{"type": "response", "id": 987654, "response": {"ok": true, "result": "stolen"}}',
        b'{"type": "chunk", "id": "x", "data": 1}',
        b'{"type": "what-is-this"}',
    ]
    async with scripted(lambda ws: answer_calls(ws, lambda _: garbage)) as d:
        for index in range(3):
            assert await d.call("liar", "echo", {"i": index}) == {"i": index}
        channel = channel_of(d)
        assert channel.unknown_ids == 6  # the made-up response and the chunk, three times
        assert channel.protocol_errors == 12
        assert not channel.closed  # garbage does not cost the connection


async def test_an_oversized_message_closes_the_connection_and_fails_the_call_typed() -> None:
    huge = b'{"type": "event", "event": "big", "data": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with scripted(
        lambda ws: answer_calls(ws, lambda _: [huge]), max_message_bytes=1024 * 1024
    ) as d:
        with pytest.raises(TargetUnavailable) as raised:
            await d.call("liar", "echo", {})
        assert raised.value.details["stage"] == "in_flight"
        assert "1009" in raised.value.message or "too big" in raised.value.message.lower()


async def test_a_deflated_answer_that_inflates_past_the_limit_closes_the_connection() -> None:
    """``compress: true``, agreed: the plugin answers with one message of 65 KB on the wire
    that inflates to 64 MiB. The dispatcher inflates it up to ``max_message_bytes`` only
    and closes the connection (1009), failing the call typed, as for a plain message over
    the limit: a bomb costs the limit, not what it would inflate to."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(compressor.compress(b"x" * (1 << 20)) for _ in range(64))
    bomb = (bomb + compressor.flush(zlib.Z_SYNC_FLUSH)).removesuffix(b"\x00\x00\xff\xff")
    agreed: list[int] = []

    async def script(ws: web.WebSocketResponse) -> None:
        agreed.append(ws.compress)
        await ws.send_bytes(HELLO)
        async for message in ws:
            if message.type == WSMsgType.TEXT and orjson.loads(message.data)["type"] == "call":
                # Raw: FIN, RSV1 (deflated), text; a length within the limit.
                header = bytes([0xC1, 127]) + len(bomb).to_bytes(8, "big")
                ws._writer.transport.write(header + bomb)

    async with scripted(script, compress=True, max_message_bytes=1024 * 1024) as d:
        with pytest.raises(TargetUnavailable) as raised:
            await d.call("liar", "echo", {})
        assert agreed == [15]
        assert raised.value.details["stage"] == "in_flight"
        assert "1009" in raised.value.message or "too big" in raised.value.message.lower()


async def test_a_call_larger_than_the_limit_is_refused_before_it_is_sent() -> None:
    from dispatcher import InvalidParams

    async with scripted(lambda ws: answer_calls(ws, lambda _: []), max_message_bytes=2048) as d:
        with pytest.raises(InvalidParams):
            await d.call("liar", "echo", {"blob": "y" * 4096})
        assert await d.call("liar", "echo", {"small": 1}) == {"small": 1}


def hello_reading(cap: Any) -> bytes:
    """A hello saying the plugin reads messages of up to ``cap`` bytes."""
    hello = orjson.loads(HELLO)
    hello["max_message_bytes"] = cap
    return orjson.dumps(hello)


def answering_with(hello: bytes, calls: list[Any], events: list[Any]) -> Script:
    """A plugin that says ``hello``, then answers each call with its params (each call's
    params into ``calls``, each host event's data into ``events``)."""

    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(hello)
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                return
            frame = orjson.loads(message.data)
            if frame["type"] == "event":
                events.append(frame["data"])
            elif frame["type"] == "call":
                calls.append(frame["request"]["params"])
                answer = {"ok": True, "result": frame["request"]["params"]}
                await ws.send_str(
                    orjson.dumps(
                        {"type": "response", "id": frame["id"], "response": answer}
                    ).decode()
                )

    return script


async def test_a_call_larger_than_the_plugin_says_it_reads_is_refused_before_it_is_sent() -> None:
    """Its hello's ``max_message_bytes``, below the target's: the call is the caller's
    ``too_large`` error, never sent (sent, the plugin would close the connection under
    every call on it), and the connection stays."""
    from dispatcher import InvalidParams

    calls: list[Any] = []
    async with scripted(answering_with(hello_reading(4096), calls, [])) as d:
        with pytest.raises(InvalidParams, match="the plugin reads") as refused:
            await d.call("liar", "echo", {"blob": "y" * 5000})
        assert refused.value.details["reason"] == "too_large"
        assert refused.value.details["limit"] == 4096
        assert not refused.value.retryable
        assert await d.call("liar", "echo", {"small": 1}) == {"small": 1}
        assert calls == [{"small": 1}]
        assert channel_of(d).plugin_reads == 4096


async def test_a_host_event_larger_than_the_plugin_says_it_reads_is_refused_and_the_next_goes() -> (
    None
):
    from dispatcher import InvalidParams

    events: list[Any] = []
    async with scripted(answering_with(hello_reading(4096), [], events)) as d:
        assert await d.call("liar", "echo", {"up": 1}) == {"up": 1}
        with pytest.raises(InvalidParams, match="the plugin reads") as refused:
            await d.publish("liar", "large", "z" * 5000)
        assert refused.value.details["reason"] == "too_large"
        await d.publish("liar", "small", 1)
        async with asyncio.timeout(5):
            while not events:  # noqa: ASYNC110 (another side's socket: polled)
                await asyncio.sleep(0.01)
        assert events == [1]
        assert not channel_of(d).closed


async def test_a_kept_host_event_larger_than_the_next_plugin_reads_is_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Published while no plugin is connected, kept, and larger than the plugin that
    connects says it reads: dropped (sent, it would close the connection), counted in the
    ``dropped`` frame, and logged; the events kept after it go."""
    connected = asyncio.Event()
    frames: list[Any] = []

    async def late_hello(ws: web.WebSocketResponse) -> None:
        connected.set()
        await asyncio.sleep(0.5)  # the dispatcher waits for the hello: events are kept
        await ws.send_bytes(hello_reading(4096))
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                return
            frames.append(orjson.loads(message.data))

    async with scripted(late_hello, connect_timeout_ms=50) as d:
        async with asyncio.timeout(5):
            await connected.wait()
        await d.publish("liar", "large", "z" * 5000)
        await d.publish("liar", "small", 1)
        async with asyncio.timeout(5):
            while len(frames) < 2:  # noqa: ASYNC110 (another side's socket: polled)
                await asyncio.sleep(0.01)
    assert frames == [
        {"type": "event", "event": "small", "data": 1},
        {"type": "dropped", "count": 1},
    ]
    assert "a host event kept for it is dropped" in caplog.text


@pytest.mark.parametrize("cap", [1023, "4096", True, 12.5, 2**60, [4096], None])
async def test_a_hello_cap_that_is_no_valid_one_bounds_nothing(cap: Any) -> None:
    """Below 1,024, past 2**53, or no JSON integer: the plugin is sent what its target
    allows, as a plugin that says none is."""
    calls: list[Any] = []
    async with scripted(answering_with(hello_reading(cap), calls, [])) as d:
        assert await d.call("liar", "echo", {"blob": "y" * 5000}) == {"blob": "y" * 5000}
        assert channel_of(d).plugin_reads is None


async def test_an_event_flood_is_bounded_and_calls_go_on() -> None:
    received = 0

    async def flood(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        event = orjson.dumps({"type": "event", "event": "spam", "data": {"x": 1}})
        for _ in range(20_000):
            await ws.send_bytes(event)
        await answer_calls_after_hello(ws)

    async with scripted(flood, max_events_per_second=500) as d:

        def count(event: str, data: Any) -> None:
            nonlocal received
            received += 1

        d.on("liar", "spam", count)
        assert await d.call("liar", "echo", {"after": "flood"}) == {"after": "flood"}
        channel = channel_of(d)
        assert channel.events_dropped > 10_000
        assert received + channel.events_dropped == 20_000
        assert received < 5_000


async def answer_calls_after_hello(ws: web.WebSocketResponse) -> None:
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            return
        frame = orjson.loads(message.data)
        if frame["type"] == "call":
            response = {"ok": True, "result": frame["request"]["params"]}
            await ws.send_bytes(
                orjson.dumps({"type": "response", "id": frame["id"], "response": response})
            )


async def test_a_plugin_that_stops_reading_bounds_what_the_dispatcher_holds() -> None:
    stop = asyncio.Event()

    async def deaf(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        await stop.wait()  # never reads: the socket buffers fill, then TCP pushes back

    async with scripted(deaf, max_in_flight=64) as d:
        blob = "z" * 200_000
        outcomes = await asyncio.gather(
            *(d.call("liar", "echo", {"blob": blob}, timeout=1.5) for _ in range(200)),
            return_exceptions=True,
        )
        stop.set()
        kinds = {type(outcome) for outcome in outcomes}
        assert kinds <= {Overloaded, DeadlineExceeded}, kinds
        assert sum(isinstance(o, Overloaded) for o in outcomes) >= 200 - 64
        assert channel_of(d).in_flight == 0


async def test_a_plugin_may_not_call_the_host() -> None:
    answers: list[dict[str, Any]] = []

    async def caller(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        request = {"v": 1, "plugin": "other", "method": "x", "params": {}, "context": {}}
        await ws.send_bytes(orjson.dumps({"type": "call", "id": 1, "request": request}))
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] == "error":
                answers.append(frame)
            elif frame["type"] == "call":
                response = {"ok": True, "result": None}
                await ws.send_bytes(
                    orjson.dumps({"type": "response", "id": frame["id"], "response": response})
                )

    async with scripted(caller) as d:
        await d.call("liar", "echo", {})
        async with asyncio.timeout(10):
            while not answers:  # noqa: ASYNC110 - filled by the server's handler
                await asyncio.sleep(0.01)
        assert answers[0]["id"] == 1
        assert answers[0]["error"]["type"] == "forbidden"


async def test_a_plugin_flooding_calls_it_never_reads_refusals_of_costs_bounded_memory() -> None:
    """150,000 call frames from a plugin that reads nothing back: each is counted, but the
    host holds at most ``MAX_REFUSALS_WAITING`` refusals waiting for it. Before: a task
    and an error frame per call frame (some 1.3 kB of the host's memory each), over
    100,000 waiting here, and cancelling them as the dispatcher closed took half a minute."""
    from providers.websocket.reader import MAX_REFUSALS_WAITING

    flood = 150_000
    reading = asyncio.Event()
    refusals = 0

    async def caller(ws: web.WebSocketResponse) -> None:
        nonlocal refusals
        await ws.send_bytes(HELLO)
        request = {"v": 1, "plugin": "liar", "method": "x", "params": {}, "context": {}}
        frame = orjson.dumps({"type": "call", "id": 1, "request": request})
        for _ in range(flood):
            await ws.send_bytes(frame)
        await reading.wait()  # reads nothing until the host has read the flood
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] == "error":
                refusals += 1
            elif frame["type"] == "call":
                response = {"ok": True, "result": "answered"}
                await ws.send_bytes(
                    orjson.dumps({"type": "response", "id": frame["id"], "response": response})
                )

    async with scripted(caller) as d:
        channel = None
        async with asyncio.timeout(30):
            while channel is None or channel.protocol_errors < flood:
                await asyncio.sleep(0.02)
                channel = channel_of(d)
        assert channel.background_tasks <= MAX_REFUSALS_WAITING
        reading.set()
        assert await d.call("liar", "echo", {}) == "answered"
        assert refusals > 0  # told, as far as it reads


async def test_a_plugin_that_says_it_is_another_plugin_is_not_called() -> None:
    async def impostor(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(hello_frame("someone-else", "1.0.0", ["echo"]))
        await answer_calls_after_hello(ws)

    async with scripted(impostor, connect_timeout_ms=500) as d:
        with pytest.raises(TargetUnavailable) as raised:
            await d.call("liar", "echo", {})
        assert "someone-else" in raised.value.message


def test_the_frames_both_sides_send_match_the_published_schema() -> None:
    import json

    import jsonschema
    from referencing import Registry, Resource

    from linchkit_plugin.errors import Forbidden
    from linchkit_plugin.ws_protocol import encode_frame, error_frame
    from tests.conftest import ROOT

    envelope = json.loads((ROOT / "proto" / "envelope.schema.json").read_text())
    frames = json.loads((ROOT / "proto" / "websocket.schema.json").read_text())
    registry = Registry().with_resource(envelope["$id"], Resource.from_contents(envelope))
    validator = jsonschema.Draft202012Validator(frames, registry=registry)
    request = {
        "v": 1,
        "plugin": "p",
        "method": "m",
        "params": {},
        "context": {"request_id": "r", "deadline_ms": 5},
    }
    samples = [
        hello_frame("p", "1.0.0", ["m"]),
        encode_frame({"type": "call", "id": 1, "request": request}),
        encode_frame({"type": "response", "id": 1, "response": {"ok": True, "result": None}}),
        encode_frame({"type": "chunk", "id": 1, "data": [1]}),
        encode_frame({"type": "event", "event": "e", "data": None}),
        encode_frame({"type": "dropped", "count": 3}),
        encode_frame({"type": "goaway"}),
        error_frame(Forbidden("no"), 4),
    ]
    for sample in samples:
        validator.validate(orjson.loads(sample))
    assert not validator.is_valid({"type": "call", "id": "x", "request": request})


async def test_a_plugin_saying_goaway_twice_mid_call_gets_its_call_answered_and_no_new_one() -> (
    None
):
    """goaway (twice, one with a field too many) while a call runs: the call is answered,
    nothing new reaches that connection, the host closes it (1000) once the call is done,
    and the next call goes over a new connection."""
    connections: list[dict[str, Any]] = []

    async def script(ws: web.WebSocketResponse) -> None:
        seen: dict[str, Any] = {"calls": 0, "after_goaway": 0, "goaway": False}
        connections.append(seen)
        await ws.send_bytes(HELLO)
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            frame = orjson.loads(message.data)
            if frame["type"] != "call":
                continue
            seen["calls"] += 1
            if seen["goaway"]:
                seen["after_goaway"] += 1
            if len(connections) == 1 and seen["calls"] == 1:
                seen["goaway"] = True
                await ws.send_str('{"type": "goaway"}')
                await ws.send_str('{"type": "goaway", "why": "twice"}')
                await asyncio.sleep(0.3)  # the call still runs while the host reads it
            response = {"ok": True, "result": frame["request"]["params"]}
            await ws.send_bytes(
                orjson.dumps({"type": "response", "id": frame["id"], "response": response})
            )
        seen["close_code"] = ws.close_code

    async with scripted(script) as dispatcher:
        first = asyncio.create_task(dispatcher.call("liar", "echo", {"n": 1}))
        while not connections or not connections[0]["goaway"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the host has read the goaway
        second = await dispatcher.call("liar", "echo", {"n": 2})  # waits for a new connection
        assert await first == {"n": 1}
        assert second == {"n": 2}
        assert connections[0]["after_goaway"] == 0
        assert len(connections) == 2 and connections[1]["calls"] == 1
        async with asyncio.timeout(5):
            while "close_code" not in connections[0]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert connections[0]["close_code"] == 1000


async def test_a_plugin_that_reads_nothing_but_keeps_talking_is_dropped_and_holds_little() -> None:
    """A plugin that stops reading but sends an event every 10 ms: any frame received
    puts aiohttp's ping off, so the heartbeat never finds the plugin gone. Before: every
    call abandoned meanwhile left a task waiting to send its ``cancel`` behind the stalled
    write (over 1,200 here, for as long as the plugin kept talking), and a caller could
    get a bare ``CancelledError`` (aiohttp's drain future, cancelled by another caller's
    deadline). Now a write the plugin takes nothing of for 1.5 heartbeats drops the
    connection, every caller gets a typed error, a call never written gets no ``cancel``,
    and what waits to be written stays near what is still wanted."""
    stop = asyncio.Event()

    async def deaf_but_talking(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        tick = orjson.dumps({"type": "event", "event": "tick", "data": None})
        while not stop.is_set():  # never reads: TCP pushes back once its buffers are full
            await ws.send_bytes(tick)
            await asyncio.sleep(0.01)

    async with scripted(deaf_but_talking, heartbeat_ms=200) as d:
        async with asyncio.timeout(5):
            while channel_of(d) is None:  # noqa: ASYNC110 - the dialer's first connection
                await asyncio.sleep(0.01)
        stalled = channel_of(d)
        most_tasks = most_queued = 0

        async def watch() -> None:
            nonlocal most_tasks, most_queued
            while True:
                most_tasks = max(most_tasks, stalled.background_tasks)
                most_queued = max(most_queued, stalled.to_write)
                await asyncio.sleep(0.005)

        async def callers() -> list[Any]:
            blob = "z" * (4 * 1024 * 1024)  # a few of these fill the socket's buffers
            fillers = [
                asyncio.ensure_future(d.call("liar", "echo", {"blob": blob}, timeout=1.0))
                for _ in range(4)
            ]
            small: list[asyncio.Future[Any]] = []
            for _ in range(30):  # 0.6 s of calls that give up after 30 ms
                small += [
                    asyncio.ensure_future(d.call("liar", "echo", {}, timeout=0.03))
                    for _ in range(40)
                ]
                await asyncio.sleep(0.02)
            return await asyncio.gather(*fillers, *small, return_exceptions=True)

        watching = asyncio.ensure_future(watch())
        try:
            outcomes = await callers()
        finally:
            watching.cancel()
            stop.set()
        assert most_tasks <= 8, most_tasks
        assert stalled.closed and "stalled" in stalled.close_reason, stalled.close_reason
        kinds = {type(outcome) for outcome in outcomes}
        assert kinds <= {DeadlineExceeded, TargetUnavailable}, kinds
        assert most_queued <= 256, most_queued
        assert not stalled.background_tasks


async def test_an_error_frame_for_a_stream_whose_queue_is_full_ends_the_stream_at_once() -> None:
    """A plugin sends a stream's window and more (8 chunks past it, which the host still
    holds for it) while the reader is busy, then an ``error`` frame for the stream.
    Before: the queue was full, the error was dropped, and the reader, once it had taken
    the chunks, waited for the stream's deadline (``DeadlineExceeded`` after 1.5 s). Now
    the stream's queue keeps a place for what ends it: the plugin's error arrives right
    after its chunks."""
    from dispatcher import PluginError
    from linchkit_plugin.ws_protocol import STREAM_WINDOW

    held = STREAM_WINDOW + 8  # what the host holds for a stream before it fails it

    async def failing_stream(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] != "stream":
                continue
            chunks = [
                orjson.dumps({"type": "chunk", "id": frame["id"], "data": n})
                for n in range(held + 1)
            ]
            await ws.send_bytes(chunks[0])
            await asyncio.sleep(0.05)  # the reader takes chunk 0, then is busy
            for chunk in chunks[1:]:
                await ws.send_bytes(chunk)
            error = {"type": "DiskFull", "message": "no room for row 265"}
            await ws.send_bytes(orjson.dumps({"type": "error", "id": frame["id"], "error": error}))

    async with scripted(failing_stream) as d:
        started = asyncio.get_running_loop().time()
        stream = d.stream("liar", "echo", {}, timeout=1.5)
        received = [await anext(stream)]
        await asyncio.sleep(0.3)  # busy: every frame above arrives meanwhile

        async def the_rest() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(PluginError) as raised:
            await the_rest()
        elapsed = asyncio.get_running_loop().time() - started
        assert raised.value.remote_type == "DiskFull"
        assert elapsed < 1.0, elapsed
        assert received == list(range(held + 1))


@pytest.mark.parametrize("lie", ["health", "chunk"])
async def test_a_reply_of_another_kind_for_a_calls_id_is_counted_and_the_call_gets_its_own(
    lie: str,
) -> None:
    """Before its response, the plugin sends a ``health`` (or ``chunk``) frame naming the
    call's id: no answer to what that id asked. Before: the ``health`` frame was taken
    for the call's response and the call failed (``ProviderError``: not a response
    envelope); the chunk was counted as an unknown id. Now both are the protocol errors
    they are: counted, dropped, and the call gets the answer the plugin sent for it."""
    lies = {
        "health": lambda call_id: {"type": "health", "id": call_id, "status": "serving"},
        "chunk": lambda call_id: {"type": "chunk", "id": call_id, "data": "stolen"},
    }
    async with scripted(
        lambda ws: answer_calls(ws, lambda call_id: [orjson.dumps(lies[lie](call_id))])
    ) as d:
        assert await d.call("liar", "echo", {"i": 1}) == {"i": 1}
        channel = channel_of(d)
        assert (channel.protocol_errors, channel.unknown_ids) == (1, 0)
        assert not channel.closed  # one frame that answers nothing does not cost the others
        assert await d.call("liar", "echo", {"i": 2}) == {"i": 2}


async def test_a_health_frame_for_a_streams_id_is_counted_and_the_stream_goes_on() -> None:
    async def streaming(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] != "stream":
                continue
            stream_id = frame["id"]
            for reply in (
                {"type": "chunk", "id": stream_id, "data": 1},
                {"type": "health", "id": stream_id, "status": "not_serving"},
                {"type": "chunk", "id": stream_id, "data": 2},
                {"type": "response", "id": stream_id, "response": {"ok": True, "result": None}},
            ):
                await ws.send_bytes(orjson.dumps(reply))

    async with scripted(streaming) as d:
        assert [chunk async for chunk in d.stream("liar", "echo", {})] == [1, 2]
        channel = channel_of(d)
        assert (channel.protocol_errors, channel.unknown_ids) == (1, 0)


async def test_a_response_frame_for_a_health_probes_id_is_not_read_as_its_health() -> None:
    """The plugin answers a health probe with a ``response`` frame whose payload says
    ``serving``, then with the ``health`` frame it owes, which says ``not_serving``.
    Before: the response was read as the probe's answer, and the plugin reported
    serving. Now it is a protocol error, counted and dropped: the health is the
    plugin's own answer to the probe."""

    async def lying_health(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] == "health":
                lie = {"type": "response", "id": frame["id"], "response": {"status": "serving"}}
                await ws.send_bytes(orjson.dumps(lie))
                truth = {
                    "type": "health",
                    "id": frame["id"],
                    "status": "not_serving",
                    "detail": "draining",
                }
                await ws.send_bytes(orjson.dumps(truth))
            elif frame["type"] == "call":
                response = {"ok": True, "result": None}
                await ws.send_bytes(
                    orjson.dumps({"type": "response", "id": frame["id"], "response": response})
                )

    async with scripted(lying_health) as d:
        await d.call("liar", "echo", {})  # connected
        channel = channel_of(d)
        health = await channel.health(2.0)
        assert (health.status, health.detail) == ("not_serving", "draining")
        assert (channel.protocol_errors, channel.unknown_ids) == (1, 0)


async def test_a_read_watch_probe_answered_after_the_next_one_went_out_is_no_stray() -> None:
    """The read watch probes a plugin silent for 1.5 heartbeats (0.3 s here). This plugin
    shows it is alive at once (an event) but answers that first probe only once the
    watch, finding it silent again, has sent a second: then it answers both, in order.
    Before: the channel remembered the last probe's id only, and counted the first
    probe's answer as a reply to nothing (``unknown_ids``), a plugin's stray. Now every
    probe still outstanding is answered by its own reply: no stray, no protocol error,
    and the connection stays."""
    answered = asyncio.Event()

    async def late_health(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        held: list[int] = []
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] == "call":
                response = {"ok": True, "result": frame["request"]["params"]}
                await ws.send_bytes(
                    orjson.dumps({"type": "response", "id": frame["id"], "response": response})
                )
            elif frame["type"] == "health" and not answered.is_set():
                held.append(frame["id"])
                if len(held) == 1:  # alive, but the probe's answer is slow to come
                    await ws.send_bytes(orjson.dumps({"type": "event", "event": "busy"}))
                    continue
                for probe_id in held:
                    health = {"type": "health", "id": probe_id, "status": "serving"}
                    await ws.send_bytes(orjson.dumps(health))
                answered.set()
            elif frame["type"] == "health":
                health = {"type": "health", "id": frame["id"], "status": "serving"}
                await ws.send_bytes(orjson.dumps(health))

    async with scripted(late_health, heartbeat_ms=200) as d:
        assert await d.call("liar", "echo", {"i": 1}) == {"i": 1}
        channel = channel_of(d)
        async with asyncio.timeout(10):
            await answered.wait()
        # Answered after both health frames, on the same connection: they have been read.
        assert await d.call("liar", "echo", {"i": 2}) == {"i": 2}
        assert (channel.unknown_ids, channel.protocol_errors) == (0, 0)
        assert not channel.closed, channel.close_reason


async def test_a_stream_its_caller_closes_is_no_longer_in_flight_once_the_close_returns() -> None:
    """A plugin that sends a stream's first chunk and then nothing; the caller takes the
    chunk and closes the stream. Before: the provider left the channel's stream to the
    garbage collector, so when the close returned it was still in flight (counted
    against ``max_in_flight``, its ``cancel`` not yet sent). Now it has ended, and the
    plugin is told to stop."""
    cancelled: list[int] = []

    async def one_chunk_then_silence(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(HELLO)
        async for message in ws:
            frame = orjson.loads(message.data)
            if frame["type"] == "stream":
                chunk = {"type": "chunk", "id": frame["id"], "data": "first"}
                await ws.send_bytes(orjson.dumps(chunk))
            elif frame["type"] == "cancel":
                cancelled.append(frame["id"])

    async with scripted(one_chunk_then_silence) as dispatcher:
        async with contextlib.aclosing(dispatcher.stream("liar", "echo", {})) as chunks:
            assert await anext(chunks) == "first"
        channel = channel_of(dispatcher)
        assert channel.in_flight == 0
        assert channel._bounds.own.in_flight == 0
        async with asyncio.timeout(5):
            while not cancelled:  # noqa: ASYNC110 - the plugin's side, polled
                await asyncio.sleep(0.01)
