"""``telemetry.metrics.listen`` and ``token_env``: /metrics on an admin listener of its own
(with /healthz and /readyz), off the gateway's port, and behind a bearer token.

Real gateways on 127.0.0.x, real sockets and raw requests for the hostile cases, and
``dispatcher serve`` as a real process for what an operator sees at start and stop. A
real Prometheus scrapes the admin port with the token (tests/test_telemetry_prometheus.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from dispatcher import Dispatcher, ManifestError, parse_manifest
from dispatcher.config import TelemetryEnvironmentError, load_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from dispatcher.gateway.admin import ADMIN_MAX_CONNECTIONS, ADMIN_MAX_CONNECTIONS_PER_PEER
from dispatcher.gateway.scrape import ScrapeToken
from tests.conftest import ROOT
from tests.gateway_support import echo_entry, read_answer

TOKEN = "scrape-t0ken-that-must-never-leak-4f9c"
VARIABLE = "LINCHKIT_TEST_SCRAPE_TOKEN"
#: A connection refused at a limit is answered as it is accepted: well within this.
PROMPTLY = 1.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def metrics_manifest(tmp_path: Path, **metrics: Any) -> Any:
    document = {
        "version": 1,
        "plugins": [echo_entry(say={}, sleep={})],
        "telemetry": {"metrics": {"enabled": True, **metrics}},
    }
    return parse_manifest(document, base_dir=tmp_path)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, settings: GatewaySettings | None = None, **metrics: Any
) -> AsyncIterator[tuple[Dispatcher, GatewayServer]]:
    settings = settings or GatewaySettings(port=0, header_timeout=30.0)
    async with (
        Dispatcher(metrics_manifest(tmp_path, **metrics)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
    ):
        yield dispatcher, server


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


async def _connect(url: str, source: str = "127.0.0.1") -> Connection:
    host, port = _address(url)
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def _close(connection: Connection) -> None:
    connection[1].close()
    with contextlib.suppress(ConnectionError):
        await connection[1].wait_closed()


async def _until(condition: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while not condition():
        assert loop.time() < until, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def raw_get(url: str, path: str, *headers: str, source: str = "127.0.0.1") -> bytes:
    """Send ``GET path`` with ``headers`` on a new connection; the whole answer."""
    reader, writer = await _connect(url, source)
    try:
        head = "".join(f"{header}\r\n" for header in headers)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: admin\r\n{head}\r\n".encode())
        return (await read_answer(reader))[1]
    finally:
        await _close((reader, writer))


def nothing_listens_at(url: str) -> bool:
    try:
        socket.create_connection(_address(url), timeout=2).close()
    except OSError:
        return True
    return False


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def envelope_of(answer: bytes) -> dict[str, Any]:
    return orjson.loads(answer.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


# -- the manifest --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:0", ("::", 0)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_listen_is_host_and_port_an_ipv6_host_in_brackets(
    tmp_path: Path, listen: str, address: tuple[str, int]
) -> None:
    metrics = metrics_manifest(tmp_path, listen=listen).telemetry.metrics
    assert metrics.listen_at == address


@pytest.mark.parametrize(
    ("listen", "complaint"),
    [
        ("::1:9464", "an IPv6 address goes in brackets, [::1]:9464"),
        (":9464", "the host is empty (0.0.0.0 or [::] for every interface)"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:65536", "is not a number from 0 to 65535"),
        ("127.0.0.1:-1", "is not a number from 0 to 65535"),
        ("127.0.0.1:", "is not a number from 0 to 65535"),
        ("[::1]9464", "an IPv6 address in brackets, then ':' and the port"),
        ("[fe80::zz]:9464", "in brackets is not an IPv6 address"),
        ("metrics host:9464", "is neither an IPv4 address nor a host name"),
        ("http://127.0.0.1:9464", "an address, not a URL"),
        ("fe80::zz:9464", "is neither an IPv4 address nor a host name"),
    ],
)
def test_a_listen_that_is_not_host_and_port_is_a_manifest_problem_saying_how(
    tmp_path: Path, listen: str, complaint: str
) -> None:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "plugins": [echo_entry(say={})],
                "telemetry": {"metrics": {"enabled": True, "listen": listen}},
            }
        )
    )
    with pytest.raises(ManifestError) as refused:
        load_manifest(manifest)
    message = str(refused.value)
    assert "telemetry.metrics.listen" in message
    assert "HOST:PORT expected (127.0.0.1:9464, [::1]:9464" in message
    assert complaint in message


@pytest.mark.parametrize("setting", [{"listen": "127.0.0.1:0"}, {"token_env": VARIABLE}])
def test_listen_and_token_env_need_metrics_on(tmp_path: Path, setting: dict[str, str]) -> None:
    document = {
        "version": 1,
        "plugins": [echo_entry(say={})],
        "telemetry": {"metrics": setting},
    }
    with pytest.raises(ManifestError, match="metrics are off: add enabled: true"):
        parse_manifest(document, base_dir=tmp_path)


@pytest.mark.parametrize("name", ["", "1TOKEN", "SCRAPE-TOKEN", "a b", TOKEN, "X" * 129])
def test_token_env_is_the_name_of_a_variable(tmp_path: Path, name: str) -> None:
    with pytest.raises(ManifestError, match="the name of an environment variable") as refused:
        metrics_manifest(tmp_path, token_env=name)
    assert TOKEN not in str(refused.value)


# -- the admin listener ----------------------------------------------------------------------


async def test_metrics_move_to_the_admin_port_and_probes_answer_on_both(tmp_path: Path) -> None:
    async with (
        serving(tmp_path, listen="127.0.0.2:0") as (_, server),
        aiohttp.ClientSession() as session,
    ):
        assert server.admin is not None
        admin = server.admin.url
        assert admin.startswith("http://127.0.0.2:") and not admin.endswith(":0")
        async with session.post(
            f"{server.url}/v1/plugins/echo/methods/say", json={"text": "hi"}
        ) as answer:
            assert answer.status == 200
        async with session.get(f"{admin}/metrics") as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            exposition = await answer.text()
        assert 'dispatcher_calls_total{method="say",outcome="ok",plugin="echo"} 1.0' in exposition
        assert 'dispatcher_gateway_connections{port="admin"} 1.0' in exposition
        assert f'dispatcher_gateway_max_connections{{port="admin"}} {ADMIN_MAX_CONNECTIONS}.0' in (
            exposition
        )
        # The gateway's port: /metrics is a route it does not have, in its envelope.
        async with session.get(f"{server.url}/metrics") as answer:
            assert answer.status == 404
            error = (await answer.json())["error"]
        assert error["type"] == "invalid_params"
        assert error["message"] == "no route GET /metrics (see /openapi.json)"
        for base in (server.url, admin):
            for probe, body in (
                ("/healthz", {"status": "alive"}),
                ("/readyz", {"status": "ready"}),
            ):
                async with session.get(f"{base}{probe}") as answer:
                    assert (answer.status, await answer.json()) == (200, body), (base, probe)
        # Anything else on the admin port is 404 in the envelope, calls included.
        for method, path in (
            ("GET", "/v1/plugins"),
            ("POST", "/v1/plugins/echo/methods/say"),
            ("GET", "/openapi.json"),
            ("POST", "/metrics"),
            ("GET", "/metrics/"),
        ):
            async with session.request(method, f"{admin}{path}", json={"text": "hi"}) as answer:
                assert answer.status == 404, (method, path)
                error = (await answer.json())["error"]
                assert error["type"] == "invalid_params"
                assert "this port serves GET /metrics, /healthz and /readyz" in error["message"]
    assert nothing_listens_at(admin)  # stopped with the gateway


async def test_without_listen_metrics_stay_on_the_gateway_port(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_, server), aiohttp.ClientSession() as session:
        assert server.admin is None
        async with session.get(f"{server.url}/metrics") as answer:
            assert answer.status == 200
            assert "dispatcher_calls_in_flight" in await answer.text()


async def test_readiness_is_503_on_both_ports_while_the_gateway_drains_and_the_admin_closes_last(
    tmp_path: Path,
) -> None:
    async with (
        serving(tmp_path, listen="127.0.0.3:0") as (dispatcher, server),
        aiohttp.ClientSession() as session,
    ):
        assert server.admin is not None
        admin = server.admin.url
        slow = asyncio.create_task(
            session.post(f"{server.url}/v1/plugins/echo/methods/sleep", json={"seconds": 1.0})
        )
        await _until(lambda: dispatcher.stats()["dispatcher"]["calls_in_flight"] == 1)
        drain = asyncio.create_task(dispatcher.drain(10))
        await _until(lambda: dispatcher.draining)
        for base in (server.url, admin):
            async with session.get(f"{base}/readyz") as answer:
                assert answer.status == 503, base
                assert answer.headers["Retry-After"] == "1"
            async with session.get(f"{base}/healthz") as answer:
                assert answer.status == 200, base
        async with session.get(f"{admin}/metrics") as answer:  # scraped while it drains
            assert answer.status == 200
            assert "dispatcher_draining 1.0" in await answer.text()
        await drain
        (await slow).release()
        # The gateway's port closes first, its connections winding down (one held idle
        # here keeps it at that for a second); the admin port still answers meanwhile.
        held = await _connect(server.url)
        try:
            held[1].write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert (await read_answer(held[0]))[0] == 200
            closing = asyncio.create_task(server.aclose())
            await asyncio.sleep(0.3)
            assert not closing.done()
            assert status_of(await raw_get(admin, "/readyz")) == 503
            await closing
        finally:
            await _close(held)
        assert nothing_listens_at(admin)


async def test_a_listen_address_in_use_is_a_clear_error_and_nothing_stays_open(
    tmp_path: Path,
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.4", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        settings = GatewaySettings(port=0)
        async with Dispatcher(metrics_manifest(tmp_path, listen=f"127.0.0.4:{port}")) as dispatcher:
            server = GatewayServer(dispatcher, settings)
            with pytest.raises(OSError, match="address already in use") as refused:
                await server.start()
            assert f"cannot serve telemetry.metrics.listen 127.0.0.4:{port}:" in str(refused.value)
            assert server.admin is None
            assert server._listening is None  # the gateway's port was closed again
    finally:
        taken.close()


# -- the token -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["admin", "gateway"])
async def test_a_token_is_required_wherever_metrics_are_served(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(VARIABLE, TOKEN)
    caplog.set_level(logging.DEBUG)
    listen = {"listen": "127.0.0.5:0"} if where == "admin" else {}
    async with serving(tmp_path, token_env=VARIABLE, **listen) as (dispatcher, server):
        url = server.admin.url if server.admin is not None else server.url
        answers = []
        for refused in (
            (),  # no token
            ("Authorization: Bearer",),
            ("Authorization: Bearer ",),
            (f"Authorization: Bearer {TOKEN[:-1]}x",),  # wrong, same length
            (f"Authorization: Bearer {TOKEN[:8]}",),  # a prefix of it
            (f"Authorization: Bearer {TOKEN}x",),  # longer
            (f"Authorization: Bearer  {TOKEN}",),  # two spaces
            (f"Authorization: Basic {TOKEN}",),  # another scheme
            (f"Authorization: {TOKEN}",),  # no scheme
            (f"X-API-Key: {TOKEN}",),  # the gateway's other credential
            (f"Authorization: Bearer {TOKEN}", f"Authorization: Bearer {TOKEN}"),
            ("Authorization: Bearer \xe9t\xe9".encode().decode("latin-1"),),  # non-ASCII
        ):
            answer = await raw_get(url, "/metrics", *refused)
            answers.append(answer)
            assert status_of(answer) == 401, (refused, answer)
            assert b"\r\nWWW-Authenticate: Bearer\r\n" in answer
            error = envelope_of(answer)["error"]
            assert (error["type"], error["retryable"]) == ("unauthorized", False)
            assert error["message"] == "/metrics needs the scrape token: Authorization: Bearer …"
        for scheme in ("Bearer", "bearer", "BEARER"):
            answer = await raw_get(url, "/metrics", f"Authorization: {scheme} {TOKEN}")
            assert status_of(answer) == 200, scheme
            assert b"dispatcher_calls_in_flight" in answer
        # The probes stay open: orchestrators hold no token.
        assert status_of(await raw_get(url, "/readyz")) == 200
        # Nothing of it anywhere: answers, logs, the manifest's and the parts' reprs.
        shown = [
            *answers,
            repr(dispatcher.manifest).encode(),
            str(dispatcher.manifest).encode(),
            repr(server.admin).encode(),
            caplog.text.encode(),
        ]
    assert all(TOKEN.encode() not in each for each in shown)
    assert all(TOKEN[:12].encode() not in each for each in shown)


def test_the_token_admits_one_bearer_of_it_and_never_shows() -> None:
    token = ScrapeToken(VARIABLE, TOKEN)
    assert token.admits(f"Bearer {TOKEN}")
    assert token.admits(f"bEaReR {TOKEN}")  # the scheme is case-insensitive (RFC 9110)
    for presented in (None, "", "Bearer", "Bearer ", f"Bearer {TOKEN} ", f"Token {TOKEN}"):
        assert not token.admits(presented), presented
    assert not ScrapeToken(VARIABLE, "").admits("Bearer ")  # an empty token admits nobody
    assert TOKEN not in repr(token) and VARIABLE in repr(token)


@pytest.mark.parametrize("value", [None, ""])
async def test_a_token_variable_unset_or_empty_fails_the_start_naming_it(
    tmp_path: Path, value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, value)
    for listen in ({"listen": "127.0.0.6:0"}, {}):
        async with Dispatcher(metrics_manifest(tmp_path, token_env=VARIABLE, **listen)) as d:
            server = GatewayServer(d, GatewaySettings(port=0))
            with pytest.raises(TelemetryEnvironmentError) as refused:
                await server.start()
            assert refused.value.variable == VARIABLE
            assert f"{VARIABLE}: telemetry.metrics.token_env names this variable" in str(
                refused.value
            )
            assert "unset or empty" in str(refused.value)
            assert server._listening is None and server.admin is None  # nothing listened


async def test_a_token_no_header_could_carry_fails_the_start_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for token in (f"{TOKEN} with a space", f"{TOKEN}\n", f"{TOKEN}\u00e9"):
        monkeypatch.setenv(VARIABLE, token)
        async with Dispatcher(metrics_manifest(tmp_path, token_env=VARIABLE)) as dispatcher:
            with pytest.raises(TelemetryEnvironmentError) as refused:
                await GatewayServer(dispatcher, GatewaySettings(port=0)).start()
            assert refused.value.variable == VARIABLE
            assert "letters, digits and punctuation only" in str(refused.value)
            assert TOKEN not in str(refused.value)


# -- hostile clients of the admin port ------------------------------------------------------


async def test_an_oversized_head_is_refused_in_the_envelope_and_never_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(VARIABLE, TOKEN)
    caplog.set_level(logging.DEBUG)
    async with serving(tmp_path, listen="127.0.0.7:0", token_env=VARIABLE) as (_, server):
        assert server.admin is not None
        url = server.admin.url
        oversized = f"Authorization: Bearer {TOKEN}{'A' * 9000}"
        answer = await raw_get(url, "/metrics", oversized)
        assert status_of(answer) == 431
        assert b"\r\nConnection: close\r\n" in answer
        assert envelope_of(answer)["error"]["type"] == "invalid_params"
        many = [f"X-Padding-{index}: {TOKEN}" for index in range(200)]  # too many headers
        answer = await raw_get(url, "/metrics", f"Authorization: Bearer {TOKEN}", *many)
        assert status_of(answer) in (400, 431)
        assert TOKEN.encode() not in answer
        # Still serving.
        assert status_of(await raw_get(url, "/metrics", f"Authorization: Bearer {TOKEN}")) == 200
    assert TOKEN not in caplog.text
    assert "refused a request from 127.0.0.1" in caplog.text


async def test_a_head_that_never_completes_is_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    settings = GatewaySettings(port=0, header_timeout=1.0)
    async with serving(tmp_path, settings, listen="127.0.0.8:0") as (_, server):
        assert server.admin is not None
        url = server.admin.url
        slow = [await _connect(url) for _ in range(5)]
        try:
            started = time.monotonic()
            for _, writer in slow:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Slow: ")
            assert status_of(await raw_get(url, "/metrics")) == 200  # others are served
            for reader, writer in slow:
                writer.write(b"a")  # still trickling in
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 10) == b""
            took = time.monotonic() - started
            assert 0.8 < took < 6.0, took
            await _until(lambda: server.admin is not None and server.admin.connections.open == 0)
            # An idle connection (nothing sent) is closed after it too.
            idle = await _connect(url)
            try:
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(idle[0].read(), 10) == b""
            finally:
                await _close(idle)
        finally:
            for connection in slow:
                await _close(connection)


async def test_connections_past_the_admin_limits_are_refused_and_the_gateway_is_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "dispatcher.gateway")
    sources = [f"127.0.1.{index}" for index in range(1, 5)]
    assert ADMIN_MAX_CONNECTIONS_PER_PEER * len(sources) == ADMIN_MAX_CONNECTIONS
    async with serving(tmp_path, listen="127.0.0.9:0") as (_, server):
        assert server.admin is not None
        admin, limit = server.admin.url, server.admin.connections
        held: list[Connection] = []
        try:
            for source in sources[:1]:
                held += [
                    await _connect(admin, source) for _ in range(ADMIN_MAX_CONNECTIONS_PER_PEER)
                ]
            await _until(lambda: limit.open == ADMIN_MAX_CONNECTIONS_PER_PEER)
            started = time.monotonic()
            answer = await raw_get(admin, "/readyz", source=sources[0])
            assert time.monotonic() - started < PROMPTLY
            assert status_of(answer) == 503
            assert b"\r\nConnection: close\r\n" in answer and b"\r\nRetry-After: 1\r\n" in answer
            error = envelope_of(answer)["error"]
            assert error["type"] == "overloaded"
            assert error["details"] == {"stage": "refused", "limit": "max_connections_per_peer"}
            assert (
                f"holds {ADMIN_MAX_CONNECTIONS_PER_PEER} connections from your address"
                in (error["message"])
            )
            for source in sources[1:]:
                held += [
                    await _connect(admin, source) for _ in range(ADMIN_MAX_CONNECTIONS_PER_PEER)
                ]
            await _until(lambda: limit.open == ADMIN_MAX_CONNECTIONS)
            answer = await raw_get(admin, "/metrics", source="127.0.1.200")
            assert status_of(answer) == 503
            assert envelope_of(answer)["error"]["details"]["limit"] == "max_connections"
            # The gateway's port has limits of its own: it serves as before.
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{server.url}/v1/plugins/echo/methods/say", json={"text": "hi"}
                ) as call:
                    assert call.status == 200
                async with session.get(f"{server.url}/readyz") as ready:
                    assert ready.status == 200
            # A connection held is served; one closed makes room.
            reader, writer = held[0]
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
            status, exposition = await read_answer(reader)
            assert status == 200
            assert (
                b'dispatcher_gateway_connections_refused_total{port="admin",reason="max_connections"} 1.0'
                in exposition
            )
            await _close(held.pop())
            await _until(lambda: limit.open == ADMIN_MAX_CONNECTIONS - 1)
            assert status_of(await raw_get(admin, "/healthz", source="127.0.1.200")) == 200
        finally:
            for connection in held:
                await _close(connection)
    assert limit.refused == {"max_connections": 1, "max_connections_per_peer": 1}
    lines = [r.getMessage() for r in caplog.records if "on the admin port" in r.getMessage()]
    # One line per interval, not one per connection: the first refusal at once, the
    # second when the port closed (before the interval ended).
    assert len(lines) == 2, lines
    assert "1 from peers at max_connections_per_peer" in lines[0]
    assert "1 with the port at max_connections" in lines[1]


# -- dispatcher serve ---------------------------------------------------------------------------


async def start_serve(
    tmp_path: Path, metrics: dict[str, Any], token: str | None, *options: str
) -> asyncio.subprocess.Process:
    manifest = tmp_path / "plugins.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "plugins": [echo_entry(sleep={}, say={})],
                "telemetry": {"metrics": {"enabled": True, **metrics}},
            }
        )
    )
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    environment.pop(VARIABLE, None)
    if token is not None:
        environment[VARIABLE] = token
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), "serve", "--port", "0",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )  # fmt: skip


async def test_serve_says_where_the_admin_port_listens_and_drains_it_last(tmp_path: Path) -> None:
    listen = {"listen": "127.0.0.10:0", "token_env": VARIABLE}
    process = await start_serve(tmp_path, listen, TOKEN, "--grace", "10", "-v")
    try:
        assert process.stdout is not None and process.stderr is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        second = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert first.startswith("listening on http://127.0.0.1:"), first
        assert second.startswith("admin listening on http://127.0.0.10:"), second
        gateway, admin = first.split()[-1], second.split()[-1]
        assert not admin.endswith(":0")
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{admin}/metrics", headers=bearer) as answer:
                assert answer.status == 200
            async with session.get(f"{admin}/metrics") as answer:
                assert answer.status == 401
            async with session.get(f"{gateway}/metrics", headers=bearer) as answer:
                assert answer.status == 404
            slow = asyncio.create_task(
                session.post(f"{gateway}/v1/plugins/echo/methods/sleep", json={"seconds": 1.5})
            )
            await asyncio.sleep(0.3)  # the call is in flight
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            for base in (gateway, admin):
                async with session.get(f"{base}/readyz") as answer:
                    assert answer.status == 503, base
            async with session.get(f"{admin}/metrics", headers=bearer) as answer:
                assert "dispatcher_draining 1.0" in await answer.text()
            (await slow).release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
        stderr = await process.stderr.read()
        assert b"draining" in stderr
        assert TOKEN.encode() not in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert nothing_listens_at(admin)


@pytest.mark.parametrize("token", [None, "", f"{TOKEN} and more"])
async def test_serve_refuses_to_start_without_a_usable_token_naming_the_variable(
    tmp_path: Path, token: str | None
) -> None:
    process = await start_serve(tmp_path, {"listen": "127.0.0.11:0", "token_env": VARIABLE}, token)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert stdout == b""  # nothing listened
    assert stderr.startswith(f"error: {VARIABLE}: ".encode()), stderr
    assert b"Traceback" not in stderr
    assert TOKEN.encode() not in stderr


async def test_serve_with_the_listen_address_taken_says_so_and_exits(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.12", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        process = await start_serve(tmp_path, {"listen": f"127.0.0.12:{port}"}, None)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        taken.close()
    assert process.returncode == 2
    message = stderr.decode()
    assert f"cannot serve telemetry.metrics.listen 127.0.0.12:{port}:" in message
    assert "address already in use" in message
    assert "Traceback" not in message


async def test_top_reads_the_admin_port_with_the_token_from_a_variable(tmp_path: Path) -> None:
    settings = {"listen": "127.0.0.14:0", "token_env": VARIABLE}
    serve = await start_serve(tmp_path, settings, TOKEN)
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}

    async def top(*options: str, token: str | None = None) -> tuple[int | None, str, str]:
        env = {**environment, VARIABLE: token} if token is not None else environment
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dispatcher.cli", "top", "--once", "--interval", "0.2",
            *options,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode(), err.decode()

    try:
        assert serve.stdout is not None
        gateway = (await asyncio.wait_for(serve.stdout.readline(), 60)).decode().split()[-1]
        admin = (await asyncio.wait_for(serve.stdout.readline(), 60)).decode().split()[-1]
        code, out, err = await top("--url", admin, "--token-env", VARIABLE, token=TOKEN)
        assert code == 0, err
        assert "CALLS/S" in out
        code, _, err = await top("--url", admin)
        assert code == 1
        assert "needs the scrape token (telemetry.metrics.token_env): --token-env NAME" in err
        code, _, err = await top("--url", gateway, "--token-env", VARIABLE, token=TOKEN)
        assert code == 1
        assert "or point --url at its admin listener (telemetry.metrics.listen)" in err
        code, _, err = await top("--url", admin, "--token-env", "LINCHKIT_TEST_UNSET_VARIABLE")
        assert code == 2
        assert (
            err
            == "error: --token-env LINCHKIT_TEST_UNSET_VARIABLE: the variable is unset or empty\n"
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
