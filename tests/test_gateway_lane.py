"""The call lane (``dispatcher.gateway.lane``) against hostile clients, on real servers on
127.0.0.1 and raw sockets: pipelining, split writes, hand-off to aiohttp mid-connection,
smuggling shapes, timeouts, hang-ups, shutdown, back-pressure, TLS; and, request by
request, the same answer with the lane as with aiohttp alone (``call_lane=False``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import random
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
from cryptography import x509

from dispatcher import Dispatcher
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.lane import DRAIN_IDLE_SECONDS, LANE_MAX_BODY, LANE_MAX_HEAD, CallLane
from dispatcher.identity import Authenticator
from tests.conftest import manifest
from tests.gateway_support import SECRET_TOKEN, OneToken, echo_entry, raw_connection
from tests.test_gateway_tls import client_context, write_pair

SAY = "/v1/plugins/echo/methods/say"
SETTINGS = GatewaySettings(port=0, header_timeout=2.0, body_timeout=2.0)


# -- helpers ---------------------------------------------------------------------------------


def request(
    path: str = SAY,
    body: bytes | None = b'{"text": "hi"}',
    *,
    method: str = "POST",
    version: str = "1.1",
    content_type: str | None = "application/json",
    headers: Sequence[tuple[str, str]] = (),
    raw_headers: bytes = b"",
) -> bytes:
    """One request's bytes: ``Content-Length`` from ``body`` (none when ``body`` is None)."""
    lines = [f"{method} {path} HTTP/{version}", "Host: gateway"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return "\r\n".join(lines).encode() + b"\r\n" + raw_headers + b"\r\n" + (body or b"")


#: A request hidden where only a parser fooled about framing would find one.
SMUGGLED = request(body=b'{"text": "SMUGGLED"}')
SMUGGLED_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)


class Reply:
    """One HTTP answer as the bytes said it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error_type(self) -> str | None:
        try:
            document = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None  # aiohttp's parser refusals are text
        return document.get("error", {}).get("type") if isinstance(document, dict) else None

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.headers} {self.body[:200]!r}>"


async def read_reply(
    reader: asyncio.StreamReader, timeout: float = 10.0, *, to_head: bool = False
) -> Reply:
    """The next answer on ``reader`` (Content-Length or chunked body; none to a HEAD)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 1"):  # 100 Continue: the answer follows
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if to_head:
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            body = await reader.read()
        return Reply(status, headers, body)


async def replies_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> list[Reply]:
    """Every answer the server sends until it closes the connection."""
    got: list[Reply] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                got.append(await read_reply(reader, timeout))
            except (asyncio.IncompleteReadError, ConnectionResetError):
                return got


async def closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True when the server closed the connection (EOF or reset) within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@contextlib.asynccontextmanager
async def gateway(
    *entries: dict[str, Any],
    settings: GatewaySettings = SETTINGS,
    authenticator: Authenticator | None = None,
    lane: bool = True,
) -> AsyncIterator[GatewayServer]:
    """A gateway with the lane (the default) or with aiohttp serving every request."""
    settings = dataclasses.replace(settings, call_lane=lane)
    async with (
        Dispatcher(manifest(*(entries or (echo_entry(),)))) as dispatcher,
        GatewayServer(dispatcher, settings, authenticator=authenticator) as server,
    ):
        assert (server.lanes is not None) == lane
        yield server


async def test_the_access_log_turns_the_lane_off_since_aiohttp_writes_it() -> None:
    async with (
        Dispatcher(manifest(echo_entry())) as dispatcher,
        GatewayServer(dispatcher, SETTINGS, access_log=True) as server,
    ):
        assert server.lanes is None


def lanes_of(server: GatewayServer) -> Any:
    assert server.lanes is not None
    return server.lanes


async def eventually(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def slow_entry() -> dict[str, Any]:
    """echo with ``sleep`` unbounded: the default entry caps it at 0.05 s."""
    entry = echo_entry()
    entry["methods"]["sleep"] = {}
    return entry


# -- pipelining and split writes -------------------------------------------------------------


async def test_pipelined_calls_are_answered_in_order_each_with_its_own_request_id() -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        first = request(body=b'{"text": "one"}', headers=[("X-Request-Id", "r-1")])
        second = request(body=b'{"text": "two"}', headers=[("X-Request-Id", "r-2")])
        writer.write(first + second)
        replies = [await read_reply(reader), await read_reply(reader)]
        assert [(r.status, r.headers["x-request-id"]) for r in replies] == [
            (200, "r-1"),
            (200, "r-2"),
        ]
        assert [r.json["result"]["text"] for r in replies] == ["one", "two"]
        await asyncio.sleep(0.3)
        writer.write(request(body=b'{"text": "three"}', headers=[("X-Request-Id", "r-3")]))
        third = await read_reply(reader)
        assert (third.status, third.headers["x-request-id"]) == (200, "r-3")
        assert third.json["result"]["text"] == "three"
        assert not third.closes
        assert (lanes_of(server).served, lanes_of(server).handed_off) == (3, 0)


async def test_a_call_whose_head_and_body_arrive_apart_or_byte_by_byte_is_answered() -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        whole = request(body=b'{"text": "apart"}')
        head, body = whole.split(b"\r\n\r\n", 1)
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body)
        reply = await read_reply(reader)
        assert (reply.status, reply.json["result"]["text"]) == (200, "apart")
        # The next one a byte at a time, head and body, with pauses between the bytes.
        for byte in request(body=b'{"text": "trickle"}'):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.002)
        reply = await read_reply(reader)
        assert (reply.status, reply.json["result"]["text"]) == (200, "trickle")
        assert lanes_of(server).served == 2


# -- hand-off to aiohttp on a live connection ------------------------------------------------


async def test_a_lane_call_then_a_handed_off_request_then_a_call_on_one_connection() -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(body=b'{"text": "lane"}'))
        assert (await read_reply(reader)).json["result"]["text"] == "lane"
        writer.write(request("/healthz", None, method="GET", content_type=None))
        health = await read_reply(reader)
        assert (health.status, health.json) == (200, {"status": "alive"})
        writer.write(request(body=b'{"text": "aiohttp"}'))
        reply = await read_reply(reader)
        assert (reply.status, reply.json["result"]["text"]) == (200, "aiohttp")
        lanes = lanes_of(server)
        assert (lanes.served, lanes.handed_off, len(lanes.open)) == (1, 1, 0)


async def test_a_first_request_handed_off_keeps_the_connection_with_aiohttp() -> None:
    chunked = (
        b"POST " + SAY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n7\r\n{"text"\r\n8\r\n: "chunk\r\n2\r\n"}\r\n0\r\n\r\n'
    )
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(chunked + request(body=b'{"text": "after"}'))  # pipelined, one write
        first, second = await read_reply(reader), await read_reply(reader)
        assert (first.status, first.json["result"]["text"]) == (200, "chunk")
        assert (second.status, second.json["result"]["text"]) == (200, "after")
        lanes = lanes_of(server)
        assert (lanes.served, lanes.handed_off) == (0, 1)


async def test_a_request_pipelined_after_connection_close_is_never_answered() -> None:
    # aiohttp alone refuses the pair when it arrives in one read (400, "Data after
    # `Connection: close`"); the lane answers the first and closes: either way, never two.
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(headers=[("Connection", "close")]) + SMUGGLED)
        replies = await replies_until_closed(reader)
        assert len(replies) == 1, replies
        assert replies[0].closes
        assert b"SMUGGLED" not in replies[0].body


# -- smuggling -------------------------------------------------------------------------------


def head_with(*lines: bytes) -> bytes:
    return b"\r\n".join([b"POST " + SAY.encode() + b" HTTP/1.1", b"Host: x", *lines]) + b"\r\n\r\n"


#: Framed right: a body that is a request is a body (bad JSON for the lane), never a request.
A_BODY_THAT_IS_A_REQUEST = (
    head_with(b"Content-Type: application/json", b"Content-Length: %d" % len(SMUGGLED)) + SMUGGLED
)


async def test_a_head_of_bare_lf_lines_is_answered_at_once_not_at_the_header_timeout() -> None:
    """No CRLF CRLF ever comes: the lane hands it to aiohttp's parser at once (which
    answers 400), instead of waiting out header_timeout for an end it cannot see."""
    settings = GatewaySettings(port=0, header_timeout=60.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(b"POST " + SAY.encode() + b" HTTP/1.1\nHost: x\nContent-Length: 0\n\n")
        await writer.drain()
        replies = await replies_until_closed(reader, timeout=10.0)
    assert [reply.status for reply in replies] == [400], replies


@pytest.mark.parametrize(
    "attack",
    [
        # The lane must not take Content-Length while aiohttp would take chunked, or back.
        head_with(
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(SMUGGLED),
            b"Transfer-Encoding: chunked",
        )
        + b"0\r\n\r\n"
        + SMUGGLED,
        head_with(
            b"Content-Type: application/json",
            b"Transfer-Encoding: chunked",
            b"Content-Length: 5",
        )
        + SMUGGLED_CHUNKED,
        head_with(b"Content-Type: application/json", b"Content-Length: 0", b"Content-Length: 5")
        + b"{}   "
        + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Content-Length: +5") + b"{}   " + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Content-Length:  5 x") + b"{}   " + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Content-Length: 5,5") + b"{}   " + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Content-Length: 0x5") + b"{}   " + SMUGGLED,
        # A bare LF inside the head: the lane's \r\n\r\n search and the parser disagree.
        b"POST " + SAY.encode() + b" HTTP/1.1\r\nHost: x\nContent-Type: application/json\n"
        b"Content-Length: 0\n\n" + SMUGGLED,
        b"POST " + SAY.encode() + b" HTTP/1.1\nHost: x\nContent-Length: 0\n\n" + SMUGGLED,
        # obs-fold: a folded Content-Length or Transfer-Encoding.
        head_with(b"Content-Type: application/json", b"X-A: a", b" Content-Length: 5")
        + b"{}   "
        + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Content-Length: 0", b"X-A: a\r\n chunked")
        + SMUGGLED,
        head_with(b"Content-Type: application/json", b"Transfer-Encoding: chunked, identity")
        + SMUGGLED_CHUNKED,
        head_with(b"Content-Type: application/json", b"Transfer-Encoding : chunked")
        + SMUGGLED_CHUNKED,
        head_with(b"Content-Type: application/json", b"Content-Length\t: 5") + b"{}   " + SMUGGLED,
        A_BODY_THAT_IS_A_REQUEST,
    ],
    ids=[
        "cl-then-te",
        "te-then-cl",
        "two-content-lengths",
        "plus-sign",
        "trailing-garbage",
        "comma-list",
        "hex",
        "bare-lf-in-head",
        "bare-lf-head",
        "obs-fold-content-length",
        "obs-fold-chunked",
        "te-list",
        "space-before-colon",
        "tab-before-colon",
        "body-is-a-request",
    ],
)
async def test_smuggling_shapes_are_refused_and_the_hidden_request_never_answered(
    attack: bytes,
) -> None:
    # The connection ends idle after its one answer (if any): within a second.
    settings = GatewaySettings(port=0, header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(attack)
        await writer.drain()
        replies = await replies_until_closed(reader)
        assert all(b"SMUGGLED" not in reply.body for reply in replies), replies
        assert len(replies) <= 1, replies
        assert all(400 <= reply.status < 500 for reply in replies), replies
        # Nothing of it was the lane's own call but the one well framed.
        assert lanes_of(server).served == (attack == A_BODY_THAT_IS_A_REQUEST)


# -- heads -----------------------------------------------------------------------------------


async def test_a_head_over_the_lanes_limit_gets_aiohttps_refusal_not_a_hang() -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(headers=[("X-Long", "a" * (LANE_MAX_HEAD + 100))]))
        reply = await read_reply(reader, timeout=5)
        assert 400 <= reply.status < 500
        assert await closed(reader)
        assert lanes_of(server).handed_off == 1


async def test_a_head_that_never_completes_is_closed_by_the_header_timeout() -> None:
    settings = GatewaySettings(port=0, header_timeout=1.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(b"POST " + SAY.encode() + b" HTTP/1.1\r\nHost: x\r\nX-A: ")

        async def trickle() -> None:  # a byte now and then must not keep it open
            while True:
                await asyncio.sleep(0.2)
                writer.write(b"a")

        trickling = asyncio.create_task(trickle())
        try:
            started = time.monotonic()
            assert await closed(reader, timeout=10)
            assert time.monotonic() - started >= 0.5
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
        await eventually(lambda: not lanes_of(server).open)


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    settings = GatewaySettings(port=0, header_timeout=1.0, keep_alive_timeout=2.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        await asyncio.sleep(0.6)  # most of the head timeout spent before the first head
        writer.write(request())
        assert (await read_reply(reader)).status == 200
        started = time.monotonic()  # the idle wait starts from the answer
        assert await closed(reader, timeout=10)
        assert time.monotonic() - started >= 1.5
        assert lanes_of(server).served == 1


async def test_a_connection_idle_past_the_header_timeout_still_takes_the_next_call() -> None:
    """Idle between calls is the keep-alive timeout's alone: the header timeout closed it
    too, after 10 s, while clients keep an idle connection longer (aiohttp 15 s), and a
    call sent as the gateway closed it was dropped (4 of 300 calls timed at the expiry)."""
    settings = GatewaySettings(port=0, header_timeout=0.3, keep_alive_timeout=5.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        for _ in range(3):
            writer.write(request())
            assert (await read_reply(reader)).status == 200
            await asyncio.sleep(0.8)  # idle past the header timeout
        assert lanes_of(server).served == 3


async def test_a_head_begun_after_an_idle_wait_is_timed_from_its_first_byte() -> None:
    settings = GatewaySettings(port=0, header_timeout=0.5, keep_alive_timeout=30.0)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(request())
        assert (await read_reply(reader)).status == 200
        await asyncio.sleep(0.2)
        writer.write(b"POST " + SAY.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # and no more
        started = time.monotonic()
        assert await closed(reader, timeout=10)
        assert 0.3 <= time.monotonic() - started < 5


# -- bodies ----------------------------------------------------------------------------------


async def test_a_body_over_the_lanes_limit_but_within_max_body_bytes_is_answered() -> None:
    body = b'{"text": "big"' + b" " * (LANE_MAX_BODY + 10) + b"}"
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(body=body))
        reply = await read_reply(reader)
        assert (reply.status, reply.json["result"]["text"]) == (200, "big")
        assert lanes_of(server).handed_off == 1


async def test_a_content_length_over_max_body_bytes_is_413_and_closed() -> None:
    settings = GatewaySettings(port=0, max_body_bytes=1000)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(head_with(b"Content-Type: application/json", b"Content-Length: 2000"))
        reply = await read_reply(reader)
        assert (reply.status, reply.error_type) == (413, "invalid_params")
        assert reply.closes
        assert await closed(reader)


async def test_a_body_that_stops_arriving_is_408_and_closed() -> None:
    settings = GatewaySettings(port=0, header_timeout=5.0, body_timeout=0.5)
    async with gateway(settings=settings) as server, raw_connection(server.url) as (reader, writer):
        writer.write(head_with(b"Content-Type: application/json", b"Content-Length: 100") + b"{")
        reply = await read_reply(reader)
        assert (reply.status, reply.error_type) == (408, "deadline_exceeded")
        assert reply.closes
        assert await closed(reader)
        assert lanes_of(server).handed_off == 0  # the lane's own timer answered


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("text/plain", 415),
        (None, 415),  # a body without a type: aiohttp takes it for octet-stream
    ],
)
async def test_the_content_type_of_a_body_decides_as_aiohttp_does(
    content_type: str | None, status: int
) -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(content_type=content_type))
        reply = await read_reply(reader)
        assert reply.status == status, reply
        if status != 200:
            assert reply.error_type == "invalid_params"


# -- the same answer with and without the lane -----------------------------------------------

AUTH = "auth"  # the case needs a gateway with an authenticator
RATE = "rate"  # a rate-limited ``say``
SLOW = "slow"  # ``sleep`` unbounded
SMALL = "small"  # max_body_bytes=1000, under the lane's own limit
ENDS = "ends"  # the connection may end without an answer (both stacks alike)
EOF_ = b"<write_eof>"  # in a case's requests: the client half-closes here

SLEEP = SAY.replace("say", "sleep")
#: (id, requests sent one after another on one connection, what the gateway needs).
SAME_ANSWER: list[tuple[str, list[bytes], str]] = [
    ("call", [request(headers=[("X-Request-Id", "r-1")])], ""),
    ("call-without-request-id", [request()], ""),
    ("empty-body", [request(body=b"")], ""),
    ("empty-body-text-plain", [request(body=b"", content_type="text/plain")], ""),
    ("no-body-no-length", [request(body=None, content_type=None)], ""),
    (
        "leading-zero-length",
        [head_with(b"Content-Type: application/json", b"Content-Length: 02") + b"{}"],
        "",
    ),
    ("connection-close", [request(headers=[("Connection", "close")])], ""),
    ("keep-alive-then-call", [request(headers=[("Connection", "keep-alive")]), request()], ""),
    ("http-1.0", [request(version="1.0")], ""),
    ("http-1.0-keep-alive", [request(version="1.0", headers=[("Connection", "keep-alive")])], ""),
    ("http-1.2", [request(version="1.2")], ENDS),
    ("no-host", [request().replace(b"Host: gateway\r\n", b"")], ""),
    ("empty-host", [request().replace(b"Host: gateway", b"Host:")], ""),
    ("two-hosts", [request(headers=[("Host", "other")])], ""),
    ("two-json-types", [request(headers=[("Content-Type", "application/json")])], ""),
    ("two-user-agents", [request(headers=[("User-Agent", "a"), ("User-Agent", "b")])], ""),
    ("two-etags", [request(headers=[("ETag", '"a"'), ("ETag", '"b"')])], ""),
    # Host, Content-Type, Content-Length and these: 128 headers, aiohttp's most, then 129.
    ("128-headers", [request(headers=[(f"X-{i}", "v") for i in range(125)])], ""),
    ("129-headers", [request(headers=[(f"X-{i}", "v") for i in range(126)])], ""),
    ("300-headers", [request(headers=[(f"X-{i}", "v") for i in range(300)])], ""),
    ("trailing-space-request-id", [request(raw_headers=b"X-Request-Id: r-1 \t\r\n")], ""),
    ("trailing-space-type", [request(content_type="application/json  ")], ""),
    ("trailing-space-version", [request(raw_headers=b"X-Plugin-Version: 1.0.0 \r\n")], ""),
    ("leading-space-request-id", [request(raw_headers=b"X-Request-Id:   r-1\r\n")], ""),
    ("ctl-in-header", [request(raw_headers=b"X-Request-Id: r\x01\r\n")], ""),
    ("del-in-header", [request(raw_headers=b"X-Request-Id: r\x7f\r\n")], ""),
    ("bad-header-name", [request(raw_headers=b"X(A): 1\r\n")], ""),
    ("invalid-params", [request(body=b'{"text": 5}')], ""),
    ("plugin-error", [request(SAY.replace("say", "withdraw"), b'{"amount": 500}')], ""),
    ("unknown-plugin", [request("/v1/plugins/ghost/methods/say")], ""),
    ("unknown-method", [request("/v1/plugins/echo/methods/shout")], ""),
    ("long-plugin-name", [request(f"/v1/plugins/{'p' * 200}/methods/say")], ""),
    ("utf8-plugin-name", [request("/v1/plugins/\u00e9cho/methods/say")], ""),
    ("unknown-version", [request(headers=[("X-Plugin-Version", "9.9.9")])], ""),
    ("known-version", [request(headers=[("X-Plugin-Version", "1.0.0")])], ""),
    ("bad-json", [request(body=b"{not json")], ""),
    ("not-utf8-json", [request(body=b'{"text": "\xff"}')], ""),
    ("too-deep", [request(body=b"[" * 100 + b"]" * 100)], ""),
    ("deeper-than-orjson", [request(body=b"[" * 5000 + b"]" * 5000)], ""),
    ("bad-request-id", [request(headers=[("X-Request-Id", "a b")])], ""),
    ("long-request-id", [request(headers=[("X-Request-Id", "a" * 200)])], ""),
    ("two-request-ids", [request(headers=[("X-Request-Id", "a"), ("X-Request-Id", "b")])], ""),
    ("bad-timeout", [request(headers=[("X-Timeout-Ms", "1e3")])], ""),
    ("zero-timeout", [request(headers=[("X-Timeout-Ms", "0")])], ""),
    ("bad-request-timeout", [request(headers=[("Request-Timeout", "nan")])], ""),
    ("deadline", [request(SLEEP, b'{"seconds": 2}', headers=[("X-Timeout-Ms", "50")])], SLOW),
    ("bad-idempotency-key", [request(headers=[("Idempotency-Key", "a" * 300)])], ""),
    ("escaped-plugin", [request("/v1/plugins/%65cho/methods/say")], ""),
    ("escaped-method", [request("/v1/plugins/echo/methods/s%61y")], ""),
    ("escaped-slash", [request("/v1/plugins/echo%2Fx/methods/say")], ""),
    ("query", [request(SAY + "?x=1")], ""),
    ("empty-query", [request(SAY + "?")], ""),
    ("fragment", [request(SAY + "#x")], ""),
    ("dot-segments", [request("/v1/plugins/../methods/say")], ""),
    ("dot-segment-method", [request("/v1/plugins/echo/methods/../methods/say")], ""),
    ("double-slash", [request("//v1/plugins/echo/methods/say")], ""),
    ("trailing-slash", [request(SAY + "/")], ""),
    ("absolute-form", [request("http://gateway" + SAY)], ""),
    ("submit", [request(SAY + ":submit")], ""),
    ("get-on-call-path", [request(body=None, method="GET", content_type=None)], ""),
    ("put-on-call-path", [request(method="PUT")], ""),
    ("head-on-call-path", [request(body=None, method="HEAD", content_type=None)], ""),
    ("lowercase-method", [request(method="post")], ENDS),
    ("healthz", [request("/healthz", None, method="GET", content_type=None)], ""),
    ("call-then-healthz", [request() + request("/healthz", None, method="GET")], ""),
    ("no-route", [request("/nowhere", None, method="GET", content_type=None)], ""),
    ("charset", [request(content_type="application/json; charset=utf-8")], ""),
    ("uppercase-type", [request(content_type="APPLICATION/JSON")], ""),
    ("text-plain", [request(content_type="text/plain")], ""),
    ("no-content-type", [request(content_type=None)], ""),
    ("two-content-types", [request(headers=[("Content-Type", "text/plain")])], ""),
    ("gzip-declared-not-gzip", [request(headers=[("Content-Encoding", "gzip")])], ""),
    ("unknown-encoding", [request(headers=[("Content-Encoding", "rot13")])], ""),
    ("expect-continue", [request(headers=[("Expect", "100-continue")])], ""),
    ("upgrade-h2c", [request(headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")])], ENDS),
    ("many-headers", [request(headers=[(f"X-H{i}", "v" * 90) for i in range(100)])], ""),
    ("long-header", [request(headers=[("X-Long", "v" * 9000)])], ""),
    ("huge-content-length", [head_with(b"Content-Length: " + b"9" * 30)], ""),
    (
        "over-max-body",
        [head_with(b"Content-Type: application/json", b"Content-Length: 2000")],
        SMALL,
    ),
    ("body-over-max-body", [request(body=b'{"text": "' + b"a" * 1500 + b'"}')], SMALL),
    ("non-utf8-request-id", [request(raw_headers=b"X-Request-Id: r\xff\r\n")], ""),
    ("non-utf8-idempotency", [request(raw_headers=b"Idempotency-Key: k\xc3\x28\r\n")], ""),
    ("non-utf8-version", [request(raw_headers=b"X-Plugin-Version: 1.\xff\r\n")], ""),
    ("nul-in-header", [request(raw_headers=b"X-A: a\x00b\r\n")], ""),
    ("pipelined-pair", [request() + request(body=b'{"text": 1}')], ""),
    ("half-closed-after-call", [request(), EOF_], ENDS),
    ("rate-limited", [request(), request()], RATE),
    ("unauthorized", [request()], AUTH),
    ("wrong-token", [request(headers=[("Authorization", "Bearer nope")])], AUTH),
    ("non-ascii-token", [request(raw_headers=b"Authorization: Bearer \xc3\xa9\r\n")], AUTH),
    ("authorized", [request(headers=[("Authorization", f"Bearer {SECRET_TOKEN}")])], AUTH),
    (
        "token-trailing-space",
        [request(raw_headers=b"Authorization: Bearer " + SECRET_TOKEN.encode() + b" \r\n")],
        AUTH,
    ),
    ("api-key", [request(headers=[("X-API-Key", SECRET_TOKEN)])], AUTH),
]

#: Headers whose value the two stacks must agree on (Date, Server and made-up ids aside).
COMPARED_HEADERS = ("content-type", "www-authenticate", "retry-after", "allow")


def same_answer_entry(needs: str) -> dict[str, Any]:
    if RATE in needs:
        return echo_entry(say={"rate_limit": {"rate": 0.01, "burst": 1, "mode": "reject"}})
    if SLOW in needs:
        return slow_entry()
    return echo_entry()


def seen_as(reply: Reply, sent: bytes) -> tuple[Any, ...]:
    """What of ``reply`` both stacks must agree on."""
    body: Any = reply.body
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(reply.body)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body["error"].pop("request_id", None)
        if "retry_after" in body["error"]:  # seconds left: a float, moving
            body["error"]["retry_after"] = round(body["error"]["retry_after"])
    echoed = reply.headers.get("x-request-id")
    if echoed is not None:  # the caller's own id, or one made up (random)
        echoed = "sent" if f"X-Request-Id: {echoed}\r\n".encode() in sent else "made"
    shown = {name: reply.headers.get(name) for name in COMPARED_HEADERS}
    return (reply.status, reply.error_type, body, shown, echoed)


async def exchange(
    requests: list[bytes], needs: str, *, lane: bool
) -> tuple[list[tuple[Any, ...]], tuple[int, int]]:
    """What each request got, then whether the connection ended and with what; and the
    lane's counts (served, handed off)."""
    authenticator = OneToken() if AUTH in needs else None
    settings = GatewaySettings(
        port=0,
        header_timeout=1.0,
        body_timeout=1.0,
        max_body_bytes=1000 if SMALL in needs else 1024 * 1024,
    )
    seen: list[tuple[Any, ...]] = []
    async with (
        gateway(
            same_answer_entry(needs), settings=settings, authenticator=authenticator, lane=lane
        ) as server,
        raw_connection(server.url) as (reader, writer),
    ):
        ended = False
        for data in requests:
            if data == EOF_:
                writer.write_eof()
                continue
            writer.write(data)
            for _ in range(data.count(b" HTTP/1.")):
                try:
                    reply = await read_reply(reader, to_head=data.startswith(b"HEAD "))
                except (asyncio.IncompleteReadError, ConnectionResetError):
                    seen.append(("ended without an answer",))
                    ended = True
                    break
                seen.append(seen_as(reply, data))
                if reply.closes:
                    # Nothing more: a request after it is never answered.
                    seen.append(("closed, then", await reader.read()))
                    ended = True
                    break
            if ended:
                break
        counts = (server.lanes.served, server.lanes.handed_off) if server.lanes else (0, 0)
    return seen, counts


@pytest.mark.parametrize(
    ("requests", "needs"),
    [pytest.param(requests, needs, id=name) for name, requests, needs in SAME_ANSWER],
)
async def test_the_lane_answers_exactly_as_aiohttp_alone(requests: list[bytes], needs: str) -> None:
    # Two gateways of their own, side by side: a case that waits out a 1 s timeout waits
    # it once, not once per stack.
    (with_lane, (served, handed_off)), (without, _) = await asyncio.gather(
        exchange(requests, needs, lane=True), exchange(requests, needs, lane=False)
    )
    if with_lane != without and with_lane:
        # The one difference by design: a refusal decided before the body is read
        # (credentials, X-Request-Id, X-Timeout-Ms, Idempotency-Key) closes aiohttp's
        # connection, the body unread; the lane holds the body whole, so it stays open.
        status, error_type = with_lane[-1][:2]
        assert (status, error_type) in {(400, "invalid_params"), (401, "unauthorized")}
        assert without == [*with_lane, ("closed, then", b"")]
        assert served == len(with_lane)
        return
    assert with_lane == without
    if ENDS not in needs:  # not a vacuous agreement: each request was answered
        assert with_lane and with_lane[0][0] in range(200, 600)
    assert served + handed_off >= 1  # the lane saw the connection first


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/plugins/%65cho/methods/say", 200),
        (SAY + "?x=1", 200),
        ("/v1/plugins/../methods/say", 404),
        (SAY + ":submit", 501),
    ],
)
async def test_paths_the_lane_does_not_serve_are_handed_to_aiohttp(
    path: str, expected: int
) -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        writer.write(request(path))
        reply = await read_reply(reader)
        assert reply.status == expected, reply
        assert (lanes_of(server).served, lanes_of(server).handed_off) == (0, 1)
        if expected == 501:
            assert reply.error_type == "jobs_unavailable"


# -- header bytes that are not UTF-8 ---------------------------------------------------------


@pytest.mark.parametrize("header", [b"X-Request-Id", b"Idempotency-Key", b"X-Plugin-Version"])
async def test_header_values_that_are_not_utf8_are_a_typed_400_and_serving_goes_on(
    header: bytes,
) -> None:
    async with gateway() as server, raw_connection(server.url) as (reader, writer):
        for value in (b"\xff\xfe", b"ok\xc3", b"\x80"):
            writer.write(request(raw_headers=header + b": " + value + b"\r\n"))
            reply = await read_reply(reader)
            assert (reply.status, reply.error_type) == (400, "invalid_params"), reply
            assert reply.headers["x-request-id"].isascii()
        writer.write(request())
        assert (await read_reply(reader)).status == 200
        assert lanes_of(server).served == 4


# -- hang-ups and many connections -----------------------------------------------------------


async def test_a_client_that_hangs_up_on_a_slow_call_leaks_no_lane() -> None:
    async with gateway(slow_entry()) as server:
        lanes = lanes_of(server)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        for _ in range(5):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(request(SLEEP, b'{"seconds": 0.5}'))
            await writer.drain()
            await eventually(lambda: any(lane.task for lane in lanes.open))
            writer.close()  # gone before the answer
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        async with raw_connection(server.url) as (reader, writer):
            writer.write(request())  # others are served meanwhile
            assert (await read_reply(reader)).status == 200
        await eventually(lambda: not lanes.open)
        await eventually(lambda: lanes.served == 6)  # the slow calls ended, answers dropped


async def test_many_connections_opened_and_closed_leave_no_lane_open() -> None:
    async with gateway() as server:
        lanes = lanes_of(server)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        kinds = [b"", request()[:30], request(), request() + request()[:50], b"GET /healthz"]
        connections = []
        for number in range(200):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(kinds[number % len(kinds)])
            connections.append((reader, writer))
        await eventually(lambda: len(lanes.open) + lanes.handed_off >= 150)
        for number, (_, writer) in enumerate(connections):
            if number % 2:
                writer.transport.abort()  # a reset
            else:
                writer.close()
        for _, writer in connections:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await eventually(lambda: not lanes.open)
        async with raw_connection(server.url) as (reader, writer):
            writer.write(request())
            assert (await read_reply(reader)).status == 200


# -- shutdown --------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.5, 20.0])
async def test_closing_the_server_with_a_call_in_flight_ends_promptly_and_leaves_no_task(
    seconds: float,
) -> None:
    async with Dispatcher(manifest(slow_entry())) as dispatcher:
        before = asyncio.all_tasks()
        server = GatewayServer(dispatcher, SETTINGS)
        await server.start()
        lanes = lanes_of(server)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        busy = await asyncio.open_connection(host, int(port))
        idle = await asyncio.open_connection(host, int(port))
        answered = await asyncio.open_connection(host, int(port))
        try:
            answered[1].write(request())
            assert (await read_reply(answered[0])).status == 200
            busy[1].write(request(SAY.replace("say", "sleep"), b'{"seconds": %g}' % seconds))
            await eventually(lambda: any(lane.task for lane in lanes.open))
            started = time.monotonic()
            await asyncio.wait_for(server.aclose(), 10)
            assert time.monotonic() - started < 8  # the call's 20 s cut short
            assert await closed(idle[0], timeout=2)
            assert await closed(answered[0], timeout=2)
            if seconds < 2:  # within the shutdown's grace: answered, and closed
                reply = await read_reply(busy[0])
                assert (reply.status, reply.closes) == (200, True)
            assert await closed(busy[0], timeout=2)
            await asyncio.sleep(0.1)
            left = {task for task in asyncio.all_tasks() - before if not task.done()}
            assert not left, left
            assert not lanes.open
        finally:
            for _, writer in (busy, idle, answered):
                writer.close()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_stopping_while_clients_call_on_kept_connections_loses_no_call(lane: bool) -> None:
    """As ``dispatcher serve`` stops: drain, then close. A connection closed under a call
    its client was writing drops a call the client cannot tell from one that ran: 43 such
    in 10 stops with the lane and 105 with aiohttp alone, before; each connection now gets
    an answer (``Connection: close``) and the client's next connect is refused (never sent)."""
    outcomes: dict[str, int] = {}

    def count(outcome: str) -> None:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async def client(url: str) -> None:
        connector = aiohttp.TCPConnector(limit=1)  # one kept connection per client
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    async with session.post(url + SAY, json={"text": "hi"}) as reply:
                        await reply.read()
                        count(str(reply.status))
                except aiohttp.ClientConnectorError:
                    count("refused")  # never sent: the listener had closed
                    return
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
                    count(f"lost: {error!r}")
                await asyncio.sleep(random.uniform(0, 0.02))

    settings = dataclasses.replace(SETTINGS, call_lane=lane)
    for _ in range(3):
        async with Dispatcher(manifest(echo_entry())) as dispatcher:
            server = GatewayServer(dispatcher, settings)
            await server.start()
            clients = [asyncio.create_task(client(server.url)) for _ in range(32)]
            await asyncio.sleep(0.3)
            await dispatcher.drain(1)
            await server.aclose()
            await asyncio.wait_for(asyncio.gather(*clients), 20)
    lost = {outcome: n for outcome, n in outcomes.items() if outcome.startswith("lost")}
    assert not lost, outcomes
    assert outcomes["refused"] == 3 * 32
    assert outcomes["503"] > 0  # drained: the last answer on each connection refuses


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_a_call_sent_on_an_idle_connection_as_the_gateway_stops_is_answered(
    lane: bool,
) -> None:
    async with gateway(lane=lane) as server, raw_connection(server.url) as (reader, writer):
        writer.write(request())
        assert not (await read_reply(reader)).closes
        stopping = asyncio.create_task(server.aclose())
        await asyncio.sleep(0.2)  # the stop has begun (the listener is closed)
        assert not stopping.done()
        writer.write(request())  # before: the connection was closed under it
        reply = await read_reply(reader)
        assert (reply.status, reply.json["result"]["text"], reply.closes) == (200, "hi", True)
        assert await closed(reader, timeout=5)
        await asyncio.wait_for(stopping, 10)


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_a_connection_left_idle_when_the_gateway_stops_closes_soon_after(
    lane: bool,
) -> None:
    async with gateway(lane=lane) as server, raw_connection(server.url) as (reader, writer):
        writer.write(request())
        assert (await read_reply(reader)).status == 200
        started = time.monotonic()
        await asyncio.wait_for(server.aclose(), 10)
        assert await closed(reader, timeout=5)
        waited = time.monotonic() - started
        assert DRAIN_IDLE_SECONDS * 0.9 <= waited < DRAIN_IDLE_SECONDS + 3


# -- back-pressure ---------------------------------------------------------------------------


async def test_pipelined_calls_never_read_do_not_grow_the_servers_buffer_without_bound() -> None:
    # A header timeout shorter than the wait: a client not reading is not an idle one.
    settings = GatewaySettings(port=0, header_timeout=1.0)
    async with gateway(settings=settings) as server:
        lanes = lanes_of(server)
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        # Answers of ~1 KiB, never read: they fill the kernel's buffers, then the
        # transport's, and the lane must stop reading rather than keep every request.
        call = request(body=orjson.dumps({"text": "x" * 1000}))
        flood = call * 200

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(300):  # 60,000 calls, ~70 MB: far over any kernel buffer
                    writer.write(flood)
                    await writer.drain()

        sending = asyncio.create_task(send())
        try:
            await asyncio.sleep(3)
            (lane,) = lanes.open
            assert isinstance(lane, CallLane)
            # Private state, read on purpose: how much the lane holds is the property
            # under test, and nothing public says it.
            held = len(lane._buffer)
            written = lane._transport.get_write_buffer_size()  # type: ignore[union-attr]
            assert held <= 2 * (LANE_MAX_HEAD + LANE_MAX_BODY) + 256 * 1024, held
            assert written <= 4 * 1024 * 1024, written
            assert not sending.done()  # the server stopped reading: the client is blocked
            async with raw_connection(server.url) as (other_reader, other_writer):
                other_writer.write(request())
                assert (await read_reply(other_reader)).status == 200
            # Reading the answers lets the flood go on: nothing was lost on the way.
            first = await read_reply(reader)
            assert first.status == 200
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            writer.transport.abort()
            gc.collect()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_a_pipelining_client_that_reads_its_answers_late_gets_every_one(lane: bool) -> None:
    # Not reading is not idling: the requests arrived in time, the server waits on its
    # own writes (as aiohttp alone does), and no header timeout drops the answers made.
    settings = GatewaySettings(port=0, header_timeout=1.0)
    async with (
        gateway(settings=settings, lane=lane) as server,
        raw_connection(server.url) as (reader, writer),
    ):
        call = request(body=orjson.dumps({"text": "x" * 1000}))
        writer.write(call * 4000)  # ~4.5 MB of requests, ~4.5 MB of answers
        sending = asyncio.create_task(writer.drain())
        await asyncio.sleep(3)  # reading nothing for three header timeouts
        for number in range(4000):
            reply = await read_reply(reader, timeout=30)
            assert reply.status == 200, number
        await sending
        if lane:
            assert lanes_of(server).served == 4000


#: A plugin whose answer is as large as asked: more than the sockets between client and
#: gateway hold, so the gateway waits on its own write.
BIG_PLUGIN = """
class Big:
    async def blob(self, size: int) -> str:
        return "x" * size
"""


def big_entry(folder: Path) -> dict[str, Any]:
    (folder / "big_plugin.py").write_text(BIG_PLUGIN)
    target = {"provider": "local", "entrypoint": "big_plugin:Big", "path": str(folder)}
    return {"id": "big", "version": "1.0.0", "target": target, "methods": {"blob": {}}}


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_an_answer_still_going_out_is_not_cut_by_the_header_timeout(
    tmp_path: Path, lane: bool
) -> None:
    """One call, its 8 MB answer read only after three header timeouts: a connection whose
    answer is still being written is not idle (nor for aiohttp, which drains it first)."""
    settings = GatewaySettings(port=0, header_timeout=1.0)
    size = 8_000_000
    async with (
        gateway(big_entry(tmp_path), settings=settings, lane=lane) as server,
        raw_connection(server.url) as (reader, writer),
    ):
        writer.write(request("/v1/plugins/big/methods/blob", orjson.dumps({"size": size})))
        await writer.drain()
        await asyncio.sleep(3)  # the client's buffers fill; the gateway's write waits
        reply = await read_reply(reader, timeout=30)
    assert reply.status == 200
    assert len(reply.json["result"]) == size


# -- TLS -------------------------------------------------------------------------------------


async def tls_calls(url: str, context: ssl.SSLContext) -> list[Reply]:
    """On one TLS connection: a call (the lane's), /healthz (handed off), a call (aiohttp's)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname="localhost"
    )
    replies = []
    try:
        for data in (request(), request("/healthz", None, method="GET"), request()):
            writer.write(data)
            replies.append(await read_reply(reader))
        return replies
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_over_tls_the_lane_answers_and_a_client_certificate_reaches_the_authenticator(
    tmp_path: Path,
) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_pair(tmp_path, server_ca.issue_cert("localhost"))
    client_ca_path = tmp_path / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_path))
    alice = client_ca.issue_cert("alice.example", common_name="alice", organization_name="Ex")
    subject = x509.load_pem_x509_certificate(
        alice.cert_chain_pems[0].bytes()
    ).subject.rfc4514_string()
    settings = GatewaySettings(
        port=0, tls_cert=cert, tls_key=key, client_ca=client_ca_path, client_cert="optional"
    )
    seen = []
    for lane in (True, False):
        authenticator = OneToken(subjects=frozenset({subject}))
        async with gateway(settings=settings, authenticator=authenticator, lane=lane) as server:
            assert server.url.startswith("https://")
            first, health, last = await tls_calls(server.url, client_context(server_ca, alice))
            assert [first.status, health.status, last.status] == [200, 200, 200]
            assert first.json["result"]["caller"] == last.json["result"]["caller"] == subject
            first, health, last = await tls_calls(server.url, client_context(server_ca))
            assert [first.status, health.status, last.status] == [401, 200, 401]
            if lane:
                lanes = lanes_of(server)
                assert (lanes.served, lanes.handed_off) == (2, 2)
            seen.append(authenticator.seen)
    with_lane, with_aiohttp = seen
    assert with_lane == with_aiohttp
    assert [credentials.certificate_subject for credentials in with_lane] == [
        subject,
        subject,
        None,
        None,
    ]
    assert with_lane[0].certificate_sans == ("DNS:alice.example",)
