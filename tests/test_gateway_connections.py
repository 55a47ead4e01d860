"""Connection limits of the gateway's two ports, against peers that open more connections
than a port takes: real sockets against a real gateway, distinct peers made by binding the
client's source address (127.0.0.2, 127.0.0.3: the whole of 127/8 is loopback). Limits are
kept small, so no test comes near the file descriptors of the machine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import h2.config
import h2.connection
import orjson
import pytest
import trustme

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.connections import LOG_INTERVAL, ConnectionLimit, Seat, peer_of
from dispatcher.gateway.server import FD_RESERVE, descriptors_short
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ROOT, manifest
from tests.gateway_support import echo_entry, read_answer, running_gateway
from tests.test_gateway_tls import client_context, write_pair

CALL = (
    b"POST /v1/plugins/echo/methods/say HTTP/1.1\r\nHost: gateway\r\n"
    b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    b'{"text":"hi"}'
)
SAY = gateway_pb2.GatewayCall(plugin="echo", method="say", params_json=orjson.dumps({"text": "hi"}))
#: A refused connection is answered (or closed) as it is accepted: well within this.
PROMPTLY = 1.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


async def _connect(url: str, source: str = "127.0.0.1", **options: Any) -> Connection:
    host, port = _address(url)
    return await asyncio.open_connection(host, port, local_addr=(source, 0), **options)


async def _close(connection: Connection) -> None:
    writer = connection[1]
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def _until(condition: Any, within: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while not condition():
        assert loop.time() < until, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def _call_on(connection: Connection) -> int:
    reader, writer = connection
    writer.write(CALL)
    status, _ = await read_answer(reader, timeout=5)
    return status


async def _refused(url: str, source: str = "127.0.0.1") -> tuple[float, int, dict[str, str], Any]:
    """Open a connection the gateway must refuse, send a call on it, and read what comes
    back: the seconds it took, the status, the headers, the envelope; then the end."""
    started = time.monotonic()
    reader, writer = await _connect(url, source)
    try:
        writer.write(CALL)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        status, raw = await read_answer(reader, timeout=5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and then closed
    finally:
        await _close((reader, writer))
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = {}
    for line in head.decode().split("\r\n")[1:]:
        name, value = line.split(":", 1)
        headers[name.lower()] = value.strip()
    return time.monotonic() - started, status, headers, orjson.loads(body)


def _settings(**limits: Any) -> GatewaySettings:
    # Long enough that the connections a test holds idle stay open while it runs.
    return GatewaySettings(port=0, header_timeout=30.0, keep_alive_timeout=30.0, **limits)


@contextlib.asynccontextmanager
async def _held(url: str, count: int, source: str = "127.0.0.1") -> AsyncIterator[list[Connection]]:
    connections = [await _connect(url, source) for _ in range(count)]
    try:
        yield connections
    finally:
        for connection in connections:
            await _close(connection)


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
async def test_connections_past_max_connections_are_refused_503_and_open_ones_keep_working(
    lane: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every connection was taken (tens of thousands exhaust the descriptors and
    the memory, then real callers cannot connect). Now the 21st of 20 is answered 503 at
    once and closed, the 20 keep calling, and a connection closed makes room."""
    settings = _settings(max_connections=20, max_connections_per_peer=20, call_lane=lane)
    caplog.set_level(logging.WARNING, "dispatcher.gateway")
    async with (
        running_gateway(echo_entry(), settings=settings) as (_, server),
        _held(server.url, 20) as held,
    ):
        await _until(lambda: server.connections.open == 20)
        for _ in range(10):
            took, status, headers, envelope = await _refused(server.url)
            assert took < PROMPTLY
            assert status == 503
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            assert headers["content-type"] == "application/json"
            error = envelope["error"]
            assert (error["type"], error["retryable"]) == ("overloaded", True)
            assert error["details"] == {"stage": "refused", "limit": "max_connections"}
            assert "max_connections" in error["message"]
        assert server.connections.refused["max_connections"] == 10
        assert await _call_on(held[0]) == 200  # the calls of a connection held go on
        # One handed over to aiohttp (another route) is counted until it closes, too.
        reader, writer = held[1]
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert (await read_answer(reader))[0] == 200
        for connection in held[:5]:
            await _close(connection)
        await _until(lambda: server.connections.open == 15)
        again = await _connect(server.url)
        try:
            assert await _call_on(again) == 200
        finally:
            await _close(again)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # Not a line per connection: the first at once, the other 9 when the port closed.
    assert len(refusals) == 2, refusals
    assert "refused 1 new connection(s)" in refusals[0]
    assert "refused 9 new connection(s)" in refusals[1]
    assert "max_connections (20)" in refusals[0]


async def test_refusals_of_a_burst_are_logged_by_a_timer_when_a_quiet_period_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the first refusal was logged at once, the rest of the burst only when another
    refusal came after the interval, minutes later maybe ("refused 1 new connection(s)"
    after 1,122 were). Now the rest is logged when the interval ends, with its count."""
    settings = _settings(max_connections=4, max_connections_per_peer=4)
    caplog.set_level(logging.WARNING, "dispatcher.gateway")
    async with (
        running_gateway(echo_entry(), settings=settings) as (_, server),
        _held(server.url, 4),
    ):
        server.connections.log_interval = 0.5
        await _until(lambda: server.connections.open == 4)
        for _ in range(12):
            assert (await _refused(server.url))[1] == 503

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]

        await _until(lambda: len(lines()) >= 2, within=3.0)
        counted = [int(line.split("refused ", 1)[1].split(" ", 1)[0]) for line in lines()]
        assert sum(counted) == 12, lines()
        await asyncio.sleep(1.0)
        assert len(lines()) == len(counted)  # nothing more refused: nothing more said


async def test_one_peer_cannot_take_every_connection() -> None:
    """``max_connections_per_peer`` 5 of 20: the sixth connection from 127.0.0.2 is
    refused while 127.0.0.3 and 127.0.0.1 (loopback counts as any peer) still connect."""
    settings = _settings(max_connections=20, max_connections_per_peer=5)
    async with (
        running_gateway(echo_entry(), settings=settings) as (_, server),
        _held(server.url, 5, "127.0.0.2") as first,
    ):
        await _until(lambda: server.connections.by_peer.get("127.0.0.2") == 5)
        took, status, _, envelope = await _refused(server.url, "127.0.0.2")
        assert (took < PROMPTLY, status) == (True, 503)
        assert envelope["error"]["details"]["limit"] == "max_connections_per_peer"
        async with _held(server.url, 5, "127.0.0.3") as second:
            await _until(lambda: server.connections.open == 10)
            assert await _call_on(second[4]) == 200
            assert (await _refused(server.url, "127.0.0.3"))[1] == 503
            local = await _connect(server.url)
            try:
                assert await _call_on(local) == 200
            finally:
                await _close(local)
        assert await _call_on(first[0]) == 200
        await _close(first[0])
        await _until(lambda: server.connections.by_peer.get("127.0.0.2") == 4)
        again = await _connect(server.url, "127.0.0.2")
        try:
            assert await _call_on(again) == 200
        finally:
            await _close(again)
        assert server.connections.refused == {
            "max_connections": 0,
            "max_connections_per_peer": 2,
        }


async def test_an_http_client_refused_reads_the_503_not_a_reset() -> None:
    """The answer is written as the connection is accepted, after what the client sent
    already is read: closing a socket with unread bytes resets it, and a reset may
    reach the client before it reads the answer."""
    async with (
        running_gateway(
            echo_entry(), settings=_settings(max_connections=2, max_connections_per_peer=2)
        ) as (
            _,
            server,
        ),
        _held(server.url, 2),
    ):
        await _until(lambda: server.connections.open == 2)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(30):
                url = f"{server.url}/v1/plugins/echo/methods/say"
                async with session.post(url, json={"text": "hi"}) as answer:
                    assert answer.status == 503
                    assert (await answer.json())["error"]["type"] == "overloaded"
        assert server.connections.refused["max_connections"] == 30


async def test_tls_refused_connections_are_closed_and_handshakes_are_bounded(
    tmp_path: Path,
) -> None:
    """On TLS a refused connection is closed unanswered (an answer would need the
    handshake). A connection that never starts its handshake holds its seat
    ``header_timeout`` at most: before, asyncio's 60 s."""
    ca = trustme.CA()
    cert, key = write_pair(tmp_path, ca.issue_cert("localhost", "127.0.0.1"))
    settings = GatewaySettings(
        port=0,
        tls_cert=cert,
        tls_key=key,
        header_timeout=0.5,
        max_connections=3,
        max_connections_per_peer=3,
    )
    context = client_context(ca)
    async with running_gateway(echo_entry(), settings=settings) as (_, server):
        await _a_silent_connection_is_closed_within_2_s(server)
        held = [
            await _connect(server.url, ssl=context, server_hostname="localhost") for _ in range(3)
        ]
        try:
            await _until(lambda: server.connections.open == 3)
            started = time.monotonic()
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await _connect(server.url, ssl=context, server_hostname="localhost")
            assert time.monotonic() - started < PROMPTLY
            assert server.connections.refused["max_connections"] == 1
            await _close(held.pop())
            await _until(lambda: server.connections.open == 2)
            held.append(await _connect(server.url, ssl=context, server_hostname="localhost"))
        finally:
            for connection in held:
                await _close(connection)


async def _a_silent_connection_is_closed_within_2_s(server: Any) -> None:
    """A TCP connection that never sends a ClientHello holds its seat ``header_timeout``
    (0.5 s here) at most: closed within 2 s, and counted open no more."""
    silent = await _connect(server.url)
    await _until(lambda: server.connections.open == 1)
    started = time.monotonic()
    assert await asyncio.wait_for(silent[0].read(), 5) == b""
    assert time.monotonic() - started < 2.0
    await _close(silent)
    await _until(lambda: server.connections.open == 0)


async def test_a_handshake_never_started_is_bounded_where_client_certificates_are_checked(
    tmp_path: Path,
) -> None:
    """A port that checks client certificates takes its own TLS protocol (the one that
    sends a refusal's alert, dispatcher/gateway/tls_alerts.py): a connection that never
    starts its handshake there holds its seat ``header_timeout`` at most too, and one
    that sends garbage for a ClientHello is closed at once."""
    ca = trustme.CA()
    cert, key = write_pair(tmp_path, ca.issue_cert("localhost", "127.0.0.1"))
    client_ca = tmp_path / "client-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(client_ca))
    settings = GatewaySettings(
        port=0,
        tls_cert=cert,
        tls_key=key,
        client_ca=client_ca,
        client_cert="required",
        header_timeout=0.5,
    )
    async with running_gateway(echo_entry(), settings=settings) as (_, server):
        await _a_silent_connection_is_closed_within_2_s(server)
        lying = await _connect(server.url)
        lying[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 64)  # no TLS at all
        try:
            reply = await asyncio.wait_for(lying[0].read(), 5)
        except ConnectionError:  # reset rather than closed: nothing answered either
            reply = b""
        assert b"HTTP" not in reply  # at most TLS's alert: never an answer in clear
        await _close(lying)
        await _until(lambda: server.connections.open == 0)


def _h2_connection(address: str) -> Any:
    """A TCP connection to the gRPC port that has sent HTTP/2's preface and SETTINGS,
    as a client does before its first call, and then nothing."""
    import socket

    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=5)
    h2_state = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2_state.initiate_connection()
    connection.sendall(h2_state.data_to_send())
    return connection


async def test_the_grpc_port_closes_connections_past_max_connections() -> None:
    """grpc's own quota (``grpc.max_allowed_incoming_connections``): the 21st connection
    of 20 is closed as it is accepted; a call on a connection held still runs; one closed
    makes room. channelz's count of open connections is exported."""
    document = manifest(echo_entry()).model_dump(mode="json", exclude_none=True)
    document["telemetry"] = {"metrics": {"enabled": True}}
    settings = _settings(grpc_port=0, max_connections=20, max_connections_per_peer=20)
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
    ):
        assert server.grpc is not None
        grpc_port = server.grpc
        address = grpc_port.address
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            assert (await stub.Call(SAY, timeout=10)).ok
            raw = [await loop.run_in_executor(None, _h2_connection, address) for _ in range(19)]
            try:
                await _until(lambda: grpc_port.connection_stats()["open"] == 20)
                for _ in range(5):
                    started = time.monotonic()
                    extra = await loop.run_in_executor(None, _h2_connection, address)
                    try:
                        assert await loop.run_in_executor(None, extra.recv, 1024) == b""
                    finally:
                        extra.close()
                    assert time.monotonic() - started < PROMPTLY
                assert (await stub.Call(SAY, timeout=10)).ok
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{server.url}/metrics") as answer,
                ):
                    exposition = await answer.text()
                assert 'dispatcher_gateway_connections{port="grpc"} 20.0' in exposition
                assert 'dispatcher_gateway_max_connections{port="grpc"} 20.0' in exposition
                assert 'dispatcher_gateway_connections{port="http"} 1.0' in exposition  # /metrics
                for connection in raw[:5]:
                    connection.close()
                await _until(lambda: grpc_port.connection_stats()["open"] == 15)
                async with grpc.aio.insecure_channel(address) as another:
                    reply = await gateway_pb2_grpc.GatewayServiceStub(another).Call(SAY, timeout=10)
                    assert reply.ok
            finally:
                for connection in raw:
                    connection.close()


async def test_refusals_are_exported_as_metrics_by_port_and_reason() -> None:
    document = manifest(echo_entry()).model_dump(mode="json", exclude_none=True)
    document["telemetry"] = {"metrics": {"enabled": True}}
    settings = _settings(max_connections=4, max_connections_per_peer=2)
    async with (
        Dispatcher(parse_manifest(document, base_dir=ROOT)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
        _held(server.url, 2, "127.0.0.2"),
    ):
        await _until(lambda: server.connections.open == 2)
        assert (await _refused(server.url, "127.0.0.2"))[1] == 503
        metrics = await _connect(server.url)
        try:
            reader, writer = metrics
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
            exposition = (await read_answer(reader))[1].decode()
        finally:
            await _close(metrics)
    assert 'dispatcher_gateway_connections{port="http"} 3.0' in exposition
    assert 'dispatcher_gateway_max_connections{port="http"} 4.0' in exposition
    refused = "dispatcher_gateway_connections_refused_total"
    assert f'{refused}{{port="http",reason="max_connections_per_peer"}} 1.0' in exposition
    assert f'{refused}{{port="http",reason="max_connections"}} 0.0' in exposition


# -- the accounting, without sockets ------------------------------------------------------


def test_a_peer_is_an_address_and_an_ipv6_peer_its_64() -> None:
    assert peer_of(("192.0.2.7", 4711)) == "192.0.2.7"
    assert peer_of(("::ffff:192.0.2.7", 4711, 0, 0)) == "192.0.2.7"  # dual-stack socket
    assert peer_of(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_of(("2001:db8:1:2:bbbb::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert peer_of("/run/gateway.sock") == "local"


def test_refusals_are_counted_each_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    limit = ConnectionLimit("HTTP", most=3, most_per_peer=2, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "dispatcher.gateway")
    seats = [limit.admit("a"), limit.admit("a"), limit.admit("b")]
    assert all(isinstance(seat, Seat) for seat in seats)
    assert limit.admit("c") == "max_connections"
    for _ in range(1000):
        assert limit.admit("c") == "max_connections"
    assert len(caplog.records) == 1
    now[0] += LOG_INTERVAL
    seats[2].release()  # b's: the port has room, a has not
    seats[2].release()  # a seat is given back once
    assert limit.open == 2
    assert limit.admit("a") == "max_connections_per_peer"
    assert limit.refused == {"max_connections": 1001, "max_connections_per_peer": 1}
    assert len(caplog.records) == 2
    second = caplog.records[1].getMessage()
    assert "refused 1001 new connection(s)" in second  # those since the first line
    assert "1000 with the port at max_connections (3)" in second
    assert "1 from peers at max_connections_per_peer (2; the latest a)" in second
    for seat in seats[:2]:
        assert isinstance(seat, Seat)
        seat.release()
    assert (limit.open, limit.by_peer) == (0, {})


def test_the_gateway_says_when_rlimit_nofile_cannot_hold_its_connections() -> None:
    settings = GatewaySettings(max_connections=4096, grpc_port=0)
    assert descriptors_short(settings, 20_000, 30) is None
    short = descriptors_short(settings, 1024, 30)
    assert short is not None
    assert "RLIMIT_NOFILE is 1024" in short
    assert f"need {2 * 4096 + 30 + FD_RESERVE}" in short
    assert "gateway.max_connections" in short
    assert descriptors_short(GatewaySettings(max_connections=10), 1100, 30) is None


# -- on uvloop, the loop `dispatcher serve` runs --------------------------------------------


@pytest.mark.parametrize(
    "test",
    [
        test_one_peer_cannot_take_every_connection,
        test_an_http_client_refused_reads_the_503_not_a_reset,
        test_the_grpc_port_closes_connections_past_max_connections,
    ],
    ids=lambda test: test.__name__.removeprefix("test_"),
)
def test_on_uvloop(test: Any) -> None:
    """``dispatcher serve`` runs the gateway on uvloop, whose ``add_reader`` and
    ``connect_accepted_socket`` are its own: the same tests there."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test())


def test_on_uvloop_lane_and_tls(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            test_connections_past_max_connections_are_refused_503_and_open_ones_keep_working(
                True, caplog
            )
        )
        runner.run(test_tls_refused_connections_are_closed_and_handshakes_are_bounded(tmp_path))
