"""Each SDK's WebSocket side against a lying or broken host, raw (docs/protocol.md,
"WebSocket binding", "What a plugin owes a lying or broken host").

An aiohttp client dials a served plugin (``serve --websocket``), or an aiohttp server
stands in for the gateway a ``connect``ing plugin dials; each case sends what no
dispatcher would and checks the typed answer, then that the plugin still serves a new
connection. One plugin per (language, mode), shared by the module's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web

from linchkit_plugin.ws_protocol import MAX_MESSAGE_BYTES_HEADER
from tests.conformance.conftest import (
    LANGUAGES,
    WEBSOCKET_MODES,
    _start_service,
    _stop_service,
    executable,
)
from tests.services import until

MODES = {"websocket": "serve", "inbound": "connect"}
CASES = [
    (language, MODES[mode]) for language in LANGUAGES for mode in WEBSOCKET_MODES.get(language, ())
]
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_IN_FLIGHT = 1024
TIMEOUT = 10.0
MARKER = "hostile-marker-do-not-echo"
#: ``Link.connect``'s cap when the host says none.
UNSAID: Any = object()

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Link:
    """A running example plugin and the means to open a fresh connection to it."""

    language: str
    mode: str
    process: asyncio.subprocess.Process
    stderr: Any
    address: str = ""
    client: aiohttp.ClientSession | None = None
    #: connect mode: what the gateway does with the next upgrade.
    behaviour: str = "normal"
    #: The next connection agrees to permessage-deflate: serve mode offers it, connect mode
    #: accepts the plugin's offer. Off otherwise, so the other cases' frames go plain.
    deflate: bool = False
    #: connect mode: whether the gateway would agree to deflate, by upgraded connection.
    deflating: dict[int, bool] = field(default_factory=dict)
    #: connect mode: the ``LinchKit-Max-Message-Bytes`` headers of the gateway's next 101,
    #: and those each upgraded connection got.
    upgrade_caps: tuple[str, ...] = ()
    announced: dict[int, tuple[str, ...]] = field(default_factory=dict)
    arrivals: asyncio.Queue[web.WebSocketResponse] = field(default_factory=asyncio.Queue)
    upgrades: int = 0
    current: Any = None
    done: dict[int, asyncio.Event] = field(default_factory=dict)
    transports: dict[int, Any] = field(default_factory=dict)
    next_id: int = 1
    #: The last connection's hello.
    hello: dict[str, Any] = field(default_factory=dict)
    #: connect mode: the connections welcomed (``close`` welcomes the others first).
    welcomed: set[int] = field(default_factory=set)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def connect(self, *, cap: Any = UNSAID, welcome: bool = True) -> Any:
        """A new connection whose hello has been read (the previous one closed); ``cap``:
        the largest message this host says it reads (serve: the upgrade's header, as
        given; connect: the welcome's ``max_message_bytes``), unless UNSAID. Connect mode:
        the gateway's 101 carries ``upgrade_caps``, and ``welcome`` says whether it
        welcomes the plugin."""
        await self.close()
        if self.mode == "serve":
            assert self.client is not None
            ws = await self.client.ws_connect(
                f"ws://{self.address}/",
                max_msg_size=64 * 1024 * 1024,
                autoping=True,
                compress=15 if self.deflate else 0,
                headers={} if cap is UNSAID else {MAX_MESSAGE_BYTES_HEADER: cap},
            )
        else:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    ws = await self.arrivals.get()
                    deflating = self.deflating.pop(id(ws))
                    if (deflating, self.announced.pop(id(ws))) == (self.deflate, self.upgrade_caps):
                        break
                    # Upgraded before the case said otherwise (the plugin dials at once):
                    # let it go, and take the next.
                    self.current = ws
                    await self.close()
        self.current = ws
        hello = self.hello = await frame(ws)
        assert hello["type"] == "hello", hello
        assert hello["id"] == "example", hello
        if self.mode == "connect" and welcome:
            said = {"type": "welcome", "instance": "x"}
            if cap is not UNSAID:
                said["max_message_bytes"] = cap
            await ws.send_str(orjson.dumps(said).decode())
            self.welcomed.add(id(ws))
        return ws

    async def close(self, *, abort: bool = False) -> None:
        """Close the current connection; in connect mode one not welcomed yet is welcomed
        first: a plugin doubles its redial backoff after each connection that ended
        unwelcomed (up to 10 s), which every later case would wait out."""
        ws, self.current = self.current, None
        if ws is not None:
            if self.mode == "connect" and not abort and id(ws) not in self.welcomed:
                with contextlib.suppress(Exception):
                    await ws.send_str('{"type": "welcome", "instance": "x"}')
            self.welcomed.discard(id(ws))
            if abort:  # a write may hang on a peer that does not read: drop the TCP connection
                transport = getattr(getattr(ws, "_writer", None), "transport", None)
                if transport is not None:
                    transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
            event = self.done.pop(id(ws), None)
            if event is not None:
                event.set()

    async def still_serving(self) -> None:
        """A new connection answers an echo: whatever came before left the plugin serving."""
        assert self.process.returncode is None, "the plugin exited"
        ws = await self.connect()
        call_id = self.new_id()
        await send(ws, {"type": "call", "id": call_id, "request": request("echo", {"x": 1})})
        answer = await response(ws, call_id)
        assert answer == {"ok": True, "result": {"x": 1}}, answer


def request(method: str, params: Any, **context: Any) -> dict[str, Any]:
    return {"v": 1, "plugin": "example", "method": method, "params": params, "context": context}


async def send(ws: Any, value: Any) -> None:
    await ws.send_str(value if isinstance(value, str) else orjson.dumps(value).decode())


async def frame(ws: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next frame the plugin sent (events skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                raise ConnectionError(f"closed ({ws.close_code})")
            assert message.type in (WSMsgType.TEXT, WSMsgType.BINARY), message
            value = orjson.loads(message.data)
            if value.get("type") not in ("event", "dropped"):
                return value  # type: ignore[no-any-return]


async def response(ws: Any, call_id: int) -> dict[str, Any]:
    while True:
        value = await frame(ws)
        if value.get("type") == "response" and value.get("id") == call_id:
            return value["response"]  # type: ignore[no-any-return]


def short_error(value: dict[str, Any], kind: str = "provider_error") -> dict[str, Any]:
    """``value`` is an error frame of ``kind`` whose message is one short line."""
    assert value["type"] == "error", value
    error = value["error"]
    assert error["type"] == kind, error
    message = error["message"]
    assert len(message) <= 200 and "\n" not in message and MARKER not in message, message
    return error  # type: ignore[no-any-return]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=CASES,
    ids=[f"{language}-{mode}" for language, mode in CASES],
)
async def link(request: pytest.FixtureRequest) -> AsyncIterator[Link]:
    language, mode = request.param
    path = executable(language)
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    client = aiohttp.ClientSession()
    runner: web.AppRunner | None = None
    try:
        if mode == "serve":
            process, address = await _start_service(
                path, stderr=stderr.fileno(), protocol="websocket", extra=("--websocket",)
            )
            found = Link(language, mode, process, stderr, address=address, client=client)
        else:
            holder: list[Link] = []

            async def gateway(http: web.Request) -> web.WebSocketResponse:
                found = holder[0]
                found.upgrades += 1
                ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024, compress=found.deflate)
                found.deflating[id(ws)] = found.deflate
                found.announced[id(ws)] = found.upgrade_caps
                for value in found.upgrade_caps:
                    ws.headers.add(MAX_MESSAGE_BYTES_HEADER, value)
                await ws.prepare(http)
                if found.behaviour == "close":
                    await ws.close()
                    return ws
                if found.behaviour == "garbage":
                    await ws.send_str(f"<html>{MARKER}")
                    await ws.send_bytes(b"\xff\xfe" + MARKER.encode())
                found.transports[id(ws)] = http.transport
                done = found.done[id(ws)] = asyncio.Event()
                found.arrivals.put_nowait(ws)
                await done.wait()
                return ws

            app = web.Application()
            app.router.add_get("/v1/plugins/connect", gateway)
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            env = {**os.environ, "LINCHKIT_PLUGIN_TOKEN": "hostile-token"}
            env.pop("LINCHKIT_PLUGIN_TOKEN_FILE", None)
            process = await asyncio.create_subprocess_exec(
                str(path), "connect", "--url", f"ws://127.0.0.1:{port}/v1/plugins/connect",
                stdin=asyncio.subprocess.PIPE, stderr=stderr.fileno(), env=env,
            )  # fmt: skip
            found = Link(language, mode, process, stderr)
            holder.append(found)
        yield found
        await found.close()
        stderr.seek(0)
        log = stderr.read().decode(errors="replace")
        assert "Traceback" not in log and "panic:" not in log, log[-4000:]
    finally:
        with contextlib.suppress(NameError):
            await _stop_service(process)
        await client.close()
        if runner is not None:
            for event in list(holder[0].done.values()) if mode == "connect" else ():
                event.set()
            await runner.cleanup()
        stderr.close()


async def test_messages_that_are_not_json_get_an_error_frame(link: Link) -> None:
    ws = await link.connect()
    await ws.send_str(f"{{not json {MARKER}")
    short_error(await frame(ws))
    await ws.send_bytes(b"\xff\xfe\x00" + MARKER.encode())  # not UTF-8 either
    short_error(await frame(ws))
    await ws.send_str("")
    short_error(await frame(ws))
    await link.still_serving()


async def test_a_binary_message_is_read_as_the_same_json(link: Link) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    call = {"type": "call", "id": call_id, "request": request("echo", [1, "two"])}
    await ws.send_bytes(orjson.dumps(call))
    assert await response(ws, call_id) == {"ok": True, "result": [1, "two"]}
    await link.still_serving()


async def test_frames_of_the_wrong_shape_get_an_error_frame(link: Link) -> None:
    ws = await link.connect()
    echo = request("echo", MARKER)
    for wrong in (
        [1, 2],
        {"id": 3},
        {"type": 7, "id": 3},
        {"type": "call", "request": echo},  # no id
        {"type": "call", "id": "7", "request": echo},
        {"type": "call", "id": 1.5, "request": echo},
        '{"type": "call", "id": 1180591620717411303424, "request": {"v": 1}}',  # 2**70
        {"type": "stream", "id": None, "request": echo},
    ):
        await send(ws, wrong)
        short_error(await frame(ws))
    await send(ws, {"type": "no-such-frame", "id": 5, MARKER: 1})
    error = await frame(ws)
    short_error(error)
    assert error.get("id") in (5, None), error
    # A call whose request is no envelope is that call's own error.
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": [MARKER]})
    answer = await response(ws, call_id)
    assert answer["ok"] is False and answer["error"]["type"] == "provider_error", answer
    await link.still_serving()


@pytest.mark.parametrize(
    "params",
    [
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-100000"),
        pytest.param("[" * 251 + "]" * 251, id="nested-251"),
        pytest.param("[1e400]", id="1e400"),
        pytest.param("[" + "9" * 5000 + "]", id="integer-5000-digits"),
        pytest.param('["\\ud800"]', id="lone-surrogate"),
    ],
)
async def test_params_json_cannot_carry_are_refused(link: Link, params: str) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    text = (
        f'{{"type": "call", "id": {call_id}, "request": {{"v": 1, "plugin": "example",'
        f' "method": "echo", "params": {params}, "context": {{}}}}}}'
    )
    started = time.monotonic()
    await ws.send_str(text)
    short_error(await frame(ws))
    assert time.monotonic() - started < 2
    await link.still_serving()


async def test_params_250_deep_still_echo(link: Link) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    deep: Any = []
    for _ in range(249):
        deep = [deep]
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", deep)})
    assert (await response(ws, call_id))["ok"] is True


async def test_the_hello_says_the_largest_message_the_plugin_reads(link: Link) -> None:
    """So that the host sends it no larger call or event: one would close the connection
    (1009) under every call on it."""
    await link.connect()
    assert link.hello.get("max_message_bytes") == MAX_MESSAGE_BYTES, link.hello


async def test_a_cap_the_host_announces_bounds_the_plugin_s_answers(link: Link) -> None:
    """An answer over the host's cap is that call's ``too_large`` error, not sent: the
    host would close the connection (1009) under every call on it."""
    ws = await link.connect(cap="2048" if link.mode == "serve" else 2048)
    await _answers_held_to_2048(link, ws)


async def _answers_held_to_2048(link: Link, ws: Any) -> None:
    """An echo of 4,000 bytes is answered ``too_large`` (limit 2,048), and the connection
    then answers an echo of 1,000 as usual."""
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", "x" * 4000)})
    answer = await response(ws, call_id)
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert error["type"] == "provider_error" and not error.get("retryable"), error
    assert error["details"]["reason"] == "too_large", error
    assert error["details"]["limit"] == 2048 and error["details"]["bytes"] > 4000, error
    assert "the result of echo" in error["message"], error
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", "x" * 1000)})
    assert await response(ws, call_id) == {"ok": True, "result": "x" * 1000}


HEADER_CAPS = ["1023", "abc", "-5", "+4096", "1e6", "12.5", "99999999999999999", ""]
WELCOME_CAPS: list[Any] = [1023, "4096", 12.5, -1, True, None, 2**60, [4096]]


@pytest.mark.parametrize("which", range(len(HEADER_CAPS)))
async def test_a_cap_that_is_no_valid_one_leaves_the_plugin_s_own(link: Link, which: int) -> None:
    """Below 1,024, not a plain decimal integer, past 2**53: ignored, not taken as a
    smaller bound (nor the connection ended); the plugin's own 8 MiB stays."""
    cap = HEADER_CAPS[which] if link.mode == "serve" else WELCOME_CAPS[which]
    ws = await link.connect(cap=cap)
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", "x" * 4000)})
    assert await response(ws, call_id) == {"ok": True, "result": "x" * 4000}


async def test_a_long_method_name_is_not_found_and_not_echoed(link: Link) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("m" * 10_000, None)})
    answer = await response(ws, call_id)
    assert answer["ok"] is False and answer["error"]["type"] == "method_not_found", answer
    assert len(answer["error"]["message"]) < 200, answer
    await link.still_serving()


async def test_a_message_over_the_size_limit_closes_with_1009(link: Link) -> None:
    ws = await link.connect()
    # The header of a text message 1 KiB over the limit, and its first KiB: the plugin must
    # refuse it by its length, before reading it whole. (Written raw: a host still writing
    # 8 MiB when the plugin closes would get a TCP reset instead of the close frame.)
    length = MAX_MESSAGE_BYTES + 1024
    masked = link.mode == "serve"  # a client masks its frames (RFC 6455 §5.3), zero key here
    header = bytes([0x81, (0x80 if masked else 0) | 127]) + length.to_bytes(8, "big")
    transport = ws._writer.transport
    transport.write(header + (b"\0" * 4 if masked else b"") + b"x" * 1024)
    closing = asyncio.ensure_future(_closed(ws))
    done, _ = await asyncio.wait([closing], timeout=1)
    if not done:  # Go's coder/websocket counts the bytes as they come: send the rest
        transport.write(b"x" * (length - 1024))
    async with asyncio.timeout(TIMEOUT):
        await closing
    assert ws.close_code == 1009, ws.close_code
    await link.still_serving()


async def _closed(ws: Any) -> None:
    while (await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
        pass


BOMB_MIB = 256


@functools.cache
def deflated_bomb() -> bytes:
    """The payload of one text message of ``BOMB_MIB`` MiB of one letter, deflated as RFC
    7692 sends it (raw deflate, the closing ``00 00 ff ff`` left off): 0.25 MB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"x" * (1 << 20)
    body = b"".join(compressor.compress(chunk) for _ in range(BOMB_MIB))
    body += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(b"\x00\x00\xff\xff")
    return body[:-4]


async def test_a_deflated_message_that_inflates_past_the_limit_closes_with_1009(
    link: Link,
) -> None:
    """permessage-deflate agreed (a plugin's connect offers it, its server accepts it): one
    message of 0.25 MB on the wire that inflates to 256 MiB. The plugin stops inflating at
    its message limit and closes 1009, as for a plain message over it; its memory grows by
    what that limit holds, not by the bomb."""
    link.deflate = True
    try:
        ws = await link.connect()
    finally:
        link.deflate = False
    assert ws.compress == 15, "permessage-deflate was not agreed: nothing is inflated"
    bomb = deflated_bomb()
    pid = link.process.pid
    before = rss_kib(pid)
    # Written raw: RSV1 set (a deflated message), one frame whose length is within the
    # limit, so only what it inflates to can be refused. A client masks (zero key here).
    masked = link.mode == "serve"
    header = bytes([0xC1, (0x80 if masked else 0) | 127]) + len(bomb).to_bytes(8, "big")
    ws._writer.transport.write(header + (b"\0" * 4 if masked else b"") + bomb)
    async with asyncio.timeout(TIMEOUT):
        await _closed(ws)
    assert ws.close_code == 1009, ws.close_code
    grown = (rss_kib(pid) - before) / 1024
    assert grown < 100, f"the plugin grew {grown:.0f} MiB inflating a {BOMB_MIB} MiB bomb"
    await link.still_serving()


async def test_a_burst_over_the_bound_waits_instead_of_starting_all(link: Link) -> None:
    """More calls than ``max_in_flight``: the plugin reads no more until some end, so a call
    sent after the burst is answered only after the first of the burst ended."""
    ws = await link.connect()
    first = link.next_id + 1
    burst = MAX_IN_FLIGHT + 200
    for _ in range(burst):
        call = request("sleep", {"ms": 60_000}, deadline_ms=1_500)
        await send(ws, {"type": "call", "id": link.new_id(), "request": call})
    echo_id = link.new_id()
    await send(ws, {"type": "call", "id": echo_id, "request": request("echo", 1)})
    ended = 0
    async with asyncio.timeout(30):
        while True:
            value = await frame(ws, timeout=30)
            assert value["type"] == "response", value
            if value["id"] == echo_id:
                break
            assert first <= value["id"] < echo_id, value
            assert value["response"]["error"]["type"] == "deadline_exceeded", value
            ended += 1
    assert ended > 0, "the call after the burst ran before any of the burst ended"
    await link.still_serving()


async def test_a_host_that_never_reads_costs_bounded_memory(link: Link) -> None:
    """Calls whose answers the host never reads: the plugin's sends wait for the socket,
    it stops reading calls, and its memory stays bounded: its calls in flight and their
    answers at most, not the 200 MB the answers add up to."""
    ws = await link.connect()
    transport = link.transports.get(id(ws))
    if transport is not None:  # the gateway's side: aiohttp's server would read on
        transport.pause_reading()
    pid = link.process.pid
    before = rss_kib(pid)
    payload = "y" * 50_000
    for _ in range(4_000):
        call = {"type": "call", "id": link.new_id(), "request": request("echo", payload)}
        try:  # until the plugin stops reading: its buffers are full
            await asyncio.wait_for(send(ws, call), 2)
        except (TimeoutError, ConnectionError):
            break
    grown = (rss_kib(pid) - before) / 1024
    await link.close(abort=True)
    assert grown < 200, f"the plugin grew {grown:.0f} MiB for a host that does not read"
    await link.still_serving()


@pytest.mark.parametrize("deadline_ms", [2**63 - 1, -1, -(2**63)])
async def test_a_deadline_no_clock_holds_or_negative_sets_none(
    link: Link, deadline_ms: int
) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    call = request("sleep", {"ms": 50}, deadline_ms=deadline_ms)
    await send(ws, {"type": "call", "id": call_id, "request": call})
    assert await response(ws, call_id) == {"ok": True, "result": {"slept_ms": 50}}
    await link.still_serving()


async def test_a_duplicate_id_in_flight_is_refused(link: Link) -> None:
    ws = await link.connect()
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("sleep", {"ms": 1_000})})
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", MARKER)})
    short_error(await frame(ws))
    # The first call still answers, once.
    assert await response(ws, call_id) == {"ok": True, "result": {"slept_ms": 1_000}}
    await link.still_serving()


async def test_a_cancel_for_an_unknown_id_is_ignored(link: Link) -> None:
    ws = await link.connect()
    await send(ws, {"type": "cancel", "id": 987_654_321})
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", 2)})
    # Nothing answers the cancels: the next frame is the echo's answer.
    assert await frame(ws) == {
        "type": "response",
        "id": call_id,
        "response": {"ok": True, "result": 2},
    }


async def test_the_connection_dropped_mid_call(link: Link) -> None:
    ws = await link.connect()
    for _ in range(20):
        call = request("sleep", {"ms": 30_000})
        await send(ws, {"type": "call", "id": link.new_id(), "request": call})
    await send(
        ws, {"type": "stream", "id": link.new_id(), "request": request("count", {"n": 10_000})}
    )
    await frame(ws)  # the stream has started
    await link.close()
    await link.still_serving()


def _connect_only(link: Link) -> None:
    if link.mode != "connect":
        pytest.skip("a gateway's behaviour: connect mode only")


async def test_a_gateway_that_never_welcomes_is_still_served(link: Link) -> None:
    _connect_only(link)
    await link.close()
    async with asyncio.timeout(TIMEOUT):
        ws = await link.arrivals.get()
    link.current = ws
    assert (await frame(ws))["type"] == "hello"
    # No welcome: the plugin neither gives up nor spins; it serves calls.
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", 3)})
    assert await response(ws, call_id) == {"ok": True, "result": 3}
    await link.still_serving()


async def test_the_upgrade_s_cap_bounds_what_the_plugin_sends_before_the_welcome(
    link: Link,
) -> None:
    """The gateway's answer to the upgrade says its cap; what the plugin sends before the
    welcome (its kept events, answers to a gateway that calls first) is held to it: an
    event over it is not sent, an answer over it is the call's ``too_large`` error. Sent,
    either would close the connection (1009) under every call on it."""
    _connect_only(link)
    link.upgrade_caps = ("2048",)
    try:
        ws = await link.connect(welcome=False)
        big, small = link.new_id(), link.new_id()
        for call_id, name, pad in ((big, "big", 4000), (small, "small", 10)):
            emit = request("emit", {"name": name, "pad": pad})
            await send(ws, {"type": "call", "id": call_id, "request": emit})
        answers, events = await _answers_and_events(ws, {big, small}, until_event="small")
        emitted = {"ok": True, "result": True}
        assert answers == {big: emitted, small: emitted}, answers
        assert [event["event"] for event in events] == ["small"], events
        await _answers_held_to_2048(link, ws)
    finally:
        link.upgrade_caps = ()
    await link.still_serving()


UPGRADE_CAPS = [(value,) for value in HEADER_CAPS] + [("2048", "2048")]


@pytest.mark.parametrize("which", range(len(UPGRADE_CAPS)))
async def test_an_upgrade_cap_that_is_no_valid_one_leaves_the_plugin_s_own(
    link: Link, which: int
) -> None:
    """The request header's rule for the answer's: one header of 1-16 digits, from 1,024 to
    2**53; anything else (two headers too) is ignored, and the plugin's own 8 MiB stays."""
    _connect_only(link)
    link.upgrade_caps = UPGRADE_CAPS[which]
    try:
        ws = await link.connect(welcome=False)
        call_id = link.new_id()
        await send(ws, {"type": "call", "id": call_id, "request": request("echo", "x" * 4000)})
        assert await response(ws, call_id) == {"ok": True, "result": "x" * 4000}
    finally:
        link.upgrade_caps = ()


async def test_the_welcome_s_cap_replaces_the_upgrade_s(link: Link) -> None:
    """The welcome says the cap again, as the plugin's targets stand once its hello was
    read; a valid one replaces the upgrade's, larger or smaller."""
    _connect_only(link)
    link.upgrade_caps = ("2048",)
    try:
        ws = await link.connect(cap=65536)
        call_id = link.new_id()
        await send(ws, {"type": "call", "id": call_id, "request": request("echo", "x" * 4000)})
        assert await response(ws, call_id) == {"ok": True, "result": "x" * 4000}
    finally:
        link.upgrade_caps = ()


async def _answers_and_events(
    ws: Any, call_ids: set[int], *, until_event: str
) -> tuple[dict[int, Any], list[dict[str, Any]]]:
    """The answers to ``call_ids`` and every event that came until both those answers and
    the event ``until_event`` did."""
    answers: dict[int, Any] = {}
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while answers.keys() != call_ids or until_event not in [e["event"] for e in events]:
            message = await ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                raise ConnectionError(f"closed ({ws.close_code})")
            value = orjson.loads(message.data)
            if value.get("type") == "event":
                events.append(value)
            elif value.get("type") == "response" and value.get("id") in call_ids:
                answers[value["id"]] = value["response"]
    return answers, events


async def test_a_gateway_sending_garbage_before_the_welcome(link: Link) -> None:
    _connect_only(link)
    link.behaviour = "garbage"
    try:
        await link.close()
        async with asyncio.timeout(TIMEOUT):
            ws = await link.arrivals.get()
        link.current = ws
        kinds = [(await frame(ws))["type"] for _ in range(3)]
        assert sorted(kinds) == ["error", "error", "hello"], kinds
    finally:
        link.behaviour = "normal"
    await link.still_serving()


#: Text a gateway controls, as a terminal would run it and a log would take it as a line.
FORGED = "\x1b[2J\nINFO forged: the plugin stopped" + "x" * 100_000


async def test_a_gateway_s_error_and_dropped_frames_reach_the_log_escaped_and_cut(
    link: Link,
) -> None:
    _connect_only(link)
    await link.close()
    async with asyncio.timeout(TIMEOUT):
        ws = await link.arrivals.get()
    link.current = ws
    assert (await frame(ws))["type"] == "hello"
    await send(ws, {"type": "error", "id": None, "error": {"type": "x", "message": FORGED}})
    await send(ws, {"type": "dropped", "count": 1, "note": FORGED})
    await link.still_serving()

    await until(lambda: "could not use a frame" in _said(link), "the error frame's line")
    log = _said(link)
    assert "\x1b" not in log and "\nINFO forged" not in log, log[-2000:]
    assert all(len(line) < 1000 for line in log.splitlines()), max(log.splitlines(), key=len)[:300]


def _said(link: Link, since: int = 0) -> str:
    """What the plugin has written on stderr, from byte ``since`` on."""
    return os.pread(link.stderr.fileno(), 16 * 1024 * 1024, since).decode(errors="replace")


async def test_a_gateway_s_flood_of_error_frames_makes_a_few_lines(link: Link) -> None:
    """Every SDK logs the first 10 error frames of a connection, then one line saying the
    rest are not (docs/protocol.md, the ``error`` frame), and answers none. Before, Python
    and TypeScript wrote a line for each, Go, Java and Rust none."""
    _connect_only(link)
    await link.close()
    async with asyncio.timeout(TIMEOUT):
        ws = await link.arrivals.get()
    link.current = ws
    assert (await frame(ws))["type"] == "hello"
    since = os.fstat(link.stderr.fileno()).st_size
    flood = orjson.dumps({"type": "error", "error": {"type": "x", "message": "flood"}}).decode()
    for _ in range(1000):
        await ws.send_str(flood)
    # Read in order: the call's answer is the next frame, once every error frame was read.
    call_id = link.new_id()
    await send(ws, {"type": "call", "id": call_id, "request": request("echo", 1)})
    answer = await frame(ws)
    assert (answer["type"], answer["id"], answer["response"]["ok"]) == ("response", call_id, True)
    await until(lambda: "further ones are not logged" in _said(link, since), "the last line")
    lines = _said(link, since).splitlines()
    assert sum("could not use a frame: flood" in line for line in lines) == 10, lines
    assert sum("further ones are not logged" in line for line in lines) == 1, lines


async def test_a_gateway_that_closes_at_once_is_redialled_with_backoff(link: Link) -> None:
    _connect_only(link)
    link.behaviour = "close"
    pid = link.process.pid
    cpu = cpu_seconds(pid)
    try:
        await link.close()
        upgrades = link.upgrades
        # Wait for the gateway to close a few upgrades; how many came in 2 s says whether
        # the plugin backs off (~5 with full jitter from 100 ms) or hammers (~40).
        await asyncio.sleep(2)
        redials = link.upgrades - upgrades
        used = cpu_seconds(pid) - cpu
    finally:
        link.behaviour = "normal"
    assert 1 <= redials <= 15, f"{redials} redials in 2 s"
    assert used < 1.0, f"{used:.2f} s of CPU in 2 s"
    assert link.process.returncode is None
    await link.still_serving()
