"""The Python SDK's plugin servers: the subprocess executable, and the HTTP function against hostile clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import uvicorn

from dispatcher import Dispatcher, Unauthorized
from linchkit_plugin import Plugin, PluginApp, PluginHost, cli
from linchkit_plugin._automtls import der_from_handshake
from tests.conftest import ROOT, bound_socket, manifest

PLUGIN = [sys.executable, str(ROOT / "tests" / "plugins" / "crashing_plugin.py")]


def handshake_environment(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "LINCHKIT_PLUGIN_MAGIC_COOKIE": "d1spatch3r-pl4g1n",
        "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS": "1",
        "LINCHKIT_PLUGIN_NETWORK": "unix",
        **extra,
    }


def test_the_plugin_exits_when_its_stdin_ends(tmp_path: Path) -> None:
    environment = handshake_environment(LINCHKIT_PLUGIN_SOCKET_DIR=str(tmp_path))
    plugin = subprocess.Popen(
        PLUGIN, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert plugin.stdout is not None
        assert plugin.stdin is not None
        core, app, network, address, protocol, certificate = (
            plugin.stdout.readline().strip().split("|")
        )
        assert (core, app, network, protocol, certificate) == ("1", "1", "unix", "grpc", "")
        assert address.startswith(str(tmp_path))
        assert os.path.exists(address)
        plugin.stdin.close()  # what the host's death looks like from here
        assert plugin.wait(timeout=10) == 0
        assert not os.path.exists(address)  # it removed its socket
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait()
        if plugin.stdout is not None:
            plugin.stdout.close()


def test_with_a_client_certificate_it_answers_its_own_server_certificate(tmp_path: Path) -> None:
    from linchkit_plugin._automtls import generate_certificate

    client = generate_certificate("host")
    environment = handshake_environment(
        LINCHKIT_PLUGIN_SOCKET_DIR=str(tmp_path),
        LINCHKIT_PLUGIN_NETWORK="tcp",
        LINCHKIT_PLUGIN_CLIENT_CERT=client.certificate_pem.decode(),
    )
    plugin = subprocess.Popen(
        PLUGIN, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert plugin.stdout is not None
        fields = plugin.stdout.readline().strip().split("|")
        assert fields[2] == "tcp"
        assert fields[3].startswith("127.0.0.1:")
        assert "=" not in fields[5]  # base64 without padding
        from cryptography import x509

        certificate = x509.load_der_x509_certificate(der_from_handshake(fields[5]))
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    finally:
        plugin.kill()
        plugin.wait()
        if plugin.stdout is not None:
            plugin.stdout.close()
        if plugin.stdin is not None:
            plugin.stdin.close()


def test_it_refuses_a_host_that_offers_no_version_it_speaks() -> None:
    environment = handshake_environment(LINCHKIT_PLUGIN_PROTOCOL_VERSIONS="2,3")
    ran = subprocess.run(
        PLUGIN,
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 1
    assert ran.stdout == ""
    assert "offered '2,3'" in ran.stderr


def test_serve_mode_prints_a_tcp_handshake_and_stops_on_sigterm() -> None:
    plugin = subprocess.Popen(
        [*PLUGIN, "serve", "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")},
    )
    try:
        assert plugin.stdout is not None
        line = plugin.stdout.readline().strip()
        fields = line.split("|")
        assert fields[:3] == ["1", "1", "tcp"], line
        assert fields[4:] == ["grpc", ""], line
        assert fields[3].rsplit(":", 1)[1] != "0"  # the bound port, not the asked one
        plugin.terminate()
        assert plugin.wait(timeout=10) == 0
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait()
        if plugin.stdout is not None:
            plugin.stdout.close()


# -- the HTTP server (`dispatcher-plugin serve`) against hostile clients ------------------
# Real uvicorn on 127.0.0.1 port 0, configured as `dispatcher-plugin serve` configures it;
# hostile clients speak raw HTTP/1.1 over TCP, since no polite client can send these.

TOKEN = "s3cret-t0ken-for-tests"
IMPLEMENTATIONS = pytest.mark.parametrize("http", ["httptools", "h11"])


class Binding(Plugin):
    """Methods whose signatures params may fail to bind to."""

    calls = 0

    async def anything(self, **params: Any) -> dict[str, Any]:
        return params

    async def only_positional(self, value: int, /) -> int:
        return value

    def named(self, a: int) -> int:
        return a

    async def echo(self, **params: Any) -> Any:
        Binding.calls += 1
        return params

    async def broken(self, **params: Any) -> None:
        raise TypeError("the plugin's own bug")

    async def a_set(self) -> Any:
        return {1, 2}


@contextlib.asynccontextmanager
async def plugin_server(
    *, token: str | None = None, http: str = "httptools", **limits: Any
) -> AsyncIterator[int]:
    """The `Binding` plugin served as `dispatcher-plugin serve` serves; yields the port."""
    from linchkit_plugin._uvicorn import server_config
    from linchkit_plugin.auth import BearerToken
    from linchkit_plugin.limits import ServerLimits

    server_limits = ServerLimits(**limits)
    app = PluginApp(
        PluginHost(Binding()),
        token=BearerToken(token) if token else None,
        limits=server_limits,
    )
    sock = bound_socket()
    server = uvicorn.Server(server_config(app, server_limits, http=http))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def _serving(http: str) -> tuple[asyncio.subprocess.Process, str]:
    """``dispatcher-plugin serve`` of the example plugin on a free port, and its URL."""
    process = await asyncio.create_subprocess_exec(
        *serve_command("--port", "0", "--http", http),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    found = re.search(r"listening on (http://[0-9.:]+)", line)
    assert found, line
    return process, found.group(1)


@asynccontextmanager
async def _served(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``dispatcher-plugin serve`` of the example plugin with ``args`` (and ``env`` over
    this process's variables), and the first line it says (within 30 s): serving, or
    why not. Ended with the block, unless the block ended it."""
    process = await asyncio.create_subprocess_exec(
        *serve_command(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        yield process, line
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def _keep_calling(
    dispatcher: Dispatcher, stopping: asyncio.Event, outcomes: dict[str, int]
) -> None:
    """Call ``echo.say`` until ``stopping``, counting each outcome: answered, never sent
    (``never_sent``: the host knows the plugin did not run it) or lost."""
    from dispatcher import DispatchError
    from dispatcher.fleet import never_sent

    while not stopping.is_set():
        try:
            await dispatcher.call("echo", "say", {"text": "hi"}, timeout=5)
            outcome = "answered"
        except DispatchError as error:
            outcome = "never sent" if never_sent(error) else f"lost: {error}"
            await asyncio.sleep(0.001)  # the plugin is gone: no tight loop
        outcomes[outcome] = outcomes.get(outcome, 0) + 1


@IMPLEMENTATIONS
@pytest.mark.parametrize("client", ["aiohttp", "reqwest"])
async def test_a_graceful_stop_under_load_loses_no_call(http: str, client: str) -> None:
    """Stopped by SIGTERM while 32 calls are in flight, ``dispatcher-plugin serve`` ends
    each call answered or never sent (a refused connection), none in between.

    uvicorn's own stop closed every keep-alive connection idle at that instant (and, on
    h11, one right after an answer that did not say ``Connection: close``), and a call the
    dispatcher had just sent on one was dropped with its request written: a
    ``TargetUnavailable`` nobody can tell apart from a call the plugin ran (~30 per stop,
    on either client)."""
    outcomes: dict[str, int] = {}
    for _ in range(2):
        process, url = await _serving(http)
        plugin = {
            "id": "echo",
            "version": "1.0.0",
            "target": {"provider": "http", "url": url, "client": client},
            "methods": {"say": {}},
        }
        stopping = asyncio.Event()
        try:
            async with Dispatcher(manifest(plugin)) as dispatcher:
                callers = [
                    asyncio.create_task(_keep_calling(dispatcher, stopping, outcomes))
                    for _ in range(32)
                ]
                await asyncio.sleep(0.5)
                process.terminate()
                await asyncio.wait_for(process.wait(), 15)  # uvicorn ends by its signal
                await asyncio.sleep(0.1)
                stopping.set()
                await asyncio.gather(*callers)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    lost = {outcome: n for outcome, n in outcomes.items() if outcome.startswith("lost")}
    assert outcomes.get("answered", 0) > 0 and outcomes.get("never sent", 0) > 0, outcomes
    assert not lost, lost


@IMPLEMENTATIONS
async def test_connections_queued_when_the_server_stops_are_answered_not_reset(
    http: str,
) -> None:
    """A connection whose handshake the kernel completed but the server had not accepted
    yet when it was told to stop is accepted, answered and then closed, not reset with
    its listener: its request was written, and a reset would be a call the
    host cannot tell apart from one the plugin ran (a call lost under load, now and then,
    in ``test_a_graceful_stop_under_load_loses_no_call``)."""
    from linchkit_plugin._uvicorn import _AnnouncingServer, server_config
    from linchkit_plugin.limits import ServerLimits

    limits = ServerLimits()
    app = PluginApp(PluginHost(Binding()), limits=limits)
    config = server_config(app, limits, http=http)
    config.load()
    server = _AnnouncingServer(config, None)
    server.lifespan = config.lifespan_class(config)
    listener = bound_socket()
    await server.startup(sockets=[listener])
    request = envelope("echo", {"n": 1})
    body = orjson.dumps(request)
    head = (
        f"POST /invoke HTTP/1.1\r\nhost: plugin\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    clients = []
    try:
        # Connected and written without letting the event loop run: the connections wait
        # in the listener's accept queue when the stop begins.
        for _ in range(8):
            client = socket.create_connection(listener.getsockname()[:2], timeout=10)
            client.sendall(head + body)
            clients.append(client)
        await server.shutdown(sockets=[listener])
        answers = await asyncio.gather(*(asyncio.to_thread(_read_all, c) for c in clients))
    finally:
        for client in clients:
            client.close()
        listener.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["result"] == {"n": 1}


def _read_all(client: socket.socket) -> bytes:
    """Everything ``client`` receives until the server closes; a reset raises."""
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    return answer


def envelope(method: str, params: Any = None, **context: Any) -> dict[str, Any]:
    return {"v": 1, "plugin": "binding", "method": method, "params": params, "context": context}


async def call(
    port: int, body: Any, *, token: str | None = None, content_type: str = "application/json"
) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.post("/invoke", content=content, headers=headers)


async def raw_exchange(port: int, request: bytes, *, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``request`` bytes and read until the server closes; the answer and how long it took."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:  # refused while still sending: the answer may be lost
        pass
    finally:
        writer.close()
    return answer, time.monotonic() - started


def status_and_body(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


def post_head(length: int, content_type: bytes = b"application/json", extra: bytes = b"") -> bytes:
    return (
        b"POST /invoke HTTP/1.1\r\nHost: plugin\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n" + extra + b"\r\n"
    )


# 1. authentication


async def test_with_a_token_configured_calls_without_it_are_refused_and_nothing_leaks() -> None:
    async with plugin_server(token=TOKEN) as port:
        one = envelope("anything", {"x": 1}, caller="forged-admin")
        for sent in (None, "wrong-token", TOKEN + "x", TOKEN[:-1]):
            for body in (one, {"batch": [one, one]}):
                answer = await call(port, body, token=sent)
                assert answer.status_code == 401, (sent, answer.text)
                assert answer.json()["error"]["type"] == "unauthorized"
                assert answer.headers["www-authenticate"] == "Bearer"
                assert TOKEN not in answer.text
                assert sent is None or sent not in answer.text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            described = await client.get("/describe")
            assert described.status_code == 401
            health = await client.get("/health")  # orchestrators probe without a token
            assert health.json() == {"status": "serving"}  # … and learn no detail
            authorized = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-blind
            assert (await client.get("/describe", headers=authorized)).status_code == 200
            assert "detail" in (await client.get("/health", headers=authorized)).json()
        answer = await call(port, one, token=TOKEN)
        assert answer.json() == {"ok": True, "result": {"x": 1}}


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_more_than_one_authorization_header_is_refused_whatever_they_say(http: str) -> None:
    """Two ``Authorization`` headers, the first the token, were let in: the server read the
    first only. Now refused 401, as the gRPC service and every WebSocket server refuse two."""
    async with (
        plugin_server(token=TOKEN, http=http) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        body = orjson.dumps(envelope("anything", {"x": 1}))
        for second in ("Bearer wrong-token", f"Bearer {TOKEN}"):
            headers = [
                ("Content-Type", "application/json"),
                ("Authorization", f"Bearer {TOKEN}"),
                ("Authorization", second),
            ]
            answer = await client.post("/invoke", content=body, headers=headers)
            assert answer.status_code == 401, (second, answer.text)
            assert answer.json()["error"]["type"] == "unauthorized"
            assert TOKEN not in answer.text
            assert (await client.get("/describe", headers=headers)).status_code == 401
            assert (await client.get("/health", headers=headers)).json() == {"status": "serving"}
        one = [("Content-Type", "application/json"), ("Authorization", f"Bearer {TOKEN}")]
        answer = await client.post("/invoke", content=body, headers=one)
        assert answer.json() == {"ok": True, "result": {"x": 1}}


async def test_the_http_provider_s_bearer_token_opens_a_protected_server() -> None:
    async with plugin_server(token=TOKEN) as port:
        url = f"http://127.0.0.1:{port}"
        for token, expected in ((TOKEN, None), ("not-it", Unauthorized)):
            plugin = {
                "id": "binding",
                "version": "1.0.0",
                "target": {"provider": "http", "url": url, "bearer_token": token},
                "methods": {"anything": {}},
            }
            async with Dispatcher(manifest(plugin)) as dispatcher:
                if expected is None:
                    assert await dispatcher.call("binding", "anything", {"a": 1}) == {"a": 1}
                else:
                    with pytest.raises(expected) as raised:
                        await dispatcher.call("binding", "anything", {"a": 1})
                    assert token not in str(raised.value) and TOKEN not in str(raised.value)


def serve_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "linchkit_plugin.cli",
        "serve",
        "echo_plugin:EchoPlugin",
        "--path",
        str(ROOT / "examples" / "python"),
        *args,
    ]


def run_serve(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``serve`` with ``args``, run to its end (30 s at most), in this process's environment
    with ``environment`` added."""
    return subprocess.run(
        serve_command(*args),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **environment},
    )


def wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    for _ in range(300):
        if path.exists():
            return
        if process.poll() is not None:
            pytest.fail(f"dispatcher-plugin serve exited {process.returncode}")
        time.sleep(0.05)
    pytest.fail("dispatcher-plugin serve did not come up")


def unix_post(path: Path, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    transport = httpx.HTTPTransport(uds=str(path))
    with httpx.Client(transport=transport, base_url="http://plugin") as client:
        body = orjson.dumps({"v": 1, "method": "say", "params": {"text": "hi"}})
        return client.post("/invoke", content=body, headers=headers).status_code


def assert_a_usage_error(done: subprocess.CompletedProcess[str], said: str) -> None:
    """``serve`` refused its command line as argparse refuses one (status 2, its usage line,
    then ``said``), before anything started."""
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("usage: dispatcher-plugin serve "), done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith(f"dispatcher-plugin serve: error: {said}")
    ), done.stderr
    assert "listening" not in done.stderr and done.stdout == ""


def assert_one_error_line(done: subprocess.CompletedProcess[str], said: str) -> None:
    """``serve`` refused a setting of its environment: status 1, one line, ``serve: said``
    as every SDK's ``serve`` begins it (tests/conformance/test_serve_cli.py)."""
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"serve: {said}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


#: How ``serve --websocket`` refuses a flag of the HTTP server given on its command line.
NOT_OVER_WEBSOCKET = "not used over WebSocket (--websocket)"


@pytest.mark.parametrize("source", ["file", "environment"])
def test_serve_takes_its_token_from_a_file_or_the_environment(tmp_path: Path, source: str) -> None:
    socket_path = tmp_path / "plugin.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    environment["LINCHKIT_PLUGIN_UDS"] = str(socket_path)  # as the docker provider passes it
    if source == "file":
        (tmp_path / "token").write_text(TOKEN + "\n")
        environment["LINCHKIT_PLUGIN_TOKEN_FILE"] = str(tmp_path / "token")
    else:
        environment["LINCHKIT_PLUGIN_TOKEN"] = TOKEN
    process = subprocess.Popen(
        serve_command("--log-level", "debug"),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(socket_path, process)
        assert unix_post(socket_path, None) == 401
        assert unix_post(socket_path, "guess") == 401
        assert unix_post(socket_path, TOKEN) == 200
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    assert TOKEN not in out + err
    assert "no bearer token" not in err


def test_serve_without_a_token_serves_anyone_and_says_so(tmp_path: Path) -> None:
    socket_path = tmp_path / "plugin.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    process = subprocess.Popen(
        serve_command("--uds", str(socket_path)),
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_socket(socket_path, process)
        assert unix_post(socket_path, None) == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    assert "no bearer token configured" in err


def test_serve_refuses_an_empty_token_file_and_a_bad_limit(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    empty = run_serve("--token-file", str(tmp_path / "token"))
    assert empty.returncode == 1
    assert "token" in empty.stderr and "empty" in empty.stderr
    bad = run_serve(LINCHKIT_PLUGIN_MAX_BATCH_ITEMS="lots")
    assert bad.returncode == 1
    assert "LINCHKIT_PLUGIN_" in bad.stderr


@pytest.mark.parametrize(
    ("where", "said"),
    [
        (["--port", "99999"], "--port must be in 0-65535 (0: any free port), not 99999"),
        (["--port", "-1"], "--port must be in 0-65535"),
        (["--host", "", "--port", "0"], "--host is empty"),
        (["--host", "not an address", "--port", "0"], "cannot listen on not an address:0"),
        (["--websocket", "--port", "65536"], "--port must be in 0-65535"),
    ],
)
def test_serve_refuses_where_it_cannot_listen_as_asked(where: list[str], said: str) -> None:
    """Before anything starts: the socket layer took port 99999 as 34463 and an empty
    host as every interface; a host that does not resolve was uvicorn's log line, exit 3."""
    done = subprocess.run(serve_command(*where), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("given", "socket_from_variable", "said"),
    [
        (["--port", "0"], False, "argument --port: not used with a Unix socket (--uds)"),
        (
            ["--host", "never.example", "--port", "0"],
            False,
            "arguments --host, --port: not used with a Unix socket (--uds)",
        ),
        (
            ["--host=never.example"],
            True,
            "argument --host: not used with a Unix socket (LINCHKIT_PLUGIN_UDS)",
        ),
    ],
    ids=["port", "host-and-port", "socket-from-its-variable"],
)
def test_serve_on_a_unix_socket_refuses_a_host_or_port_on_its_command_line(
    tmp_path: Path, given: list[str], socket_from_variable: bool, said: str
) -> None:
    """A usage error, as ``--http`` with ``--websocket``. Before, it listened on the
    socket and dropped them unsaid: an operator who typed them believed it reachable
    there."""
    path = tmp_path / "plugin.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    if socket_from_variable:
        environment["LINCHKIT_PLUGIN_UDS"] = str(path)
    unix_socket = [] if socket_from_variable else ["--uds", str(path)]
    done = subprocess.run(
        serve_command(*unix_socket, *given),
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )
    assert_a_usage_error(done, said)
    assert "never.example" not in done.stderr
    assert not path.exists()


def test_serve_on_a_unix_socket_leaves_the_host_and_port_variables_alone(tmp_path: Path) -> None:
    """``LINCHKIT_PLUGIN_HOST`` and ``_PORT`` may be set for every run of an image (the
    docker provider sets them or ``_UDS``): with a socket they are not read, nor refused."""
    path = tmp_path / "plugin.sock"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
    environment |= {"LINCHKIT_PLUGIN_HOST": "0.0.0.0", "LINCHKIT_PLUGIN_PORT": "1"}
    process = subprocess.Popen(
        serve_command("--uds", str(path)), env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_socket(path, process)
        assert unix_post(path, None) == 200
    finally:
        process.terminate()
        process.communicate(timeout=10)


@pytest.mark.parametrize(
    ("flags", "environment", "identity"),
    [
        (["--id", "echo", "--version", "2.0.0"], {}, ("echo", "2.0.0")),
        ([], {"LINCHKIT_PLUGIN_ID": "echo", "LINCHKIT_PLUGIN_VERSION": "1.5.0"}, ("echo", "1.5.0")),
        (["--version", "2.0.0"], {"LINCHKIT_PLUGIN_VERSION": "1.5.0"}, ("", "2.0.0")),
    ],
    ids=["flags", "variables", "a flag over its variable"],
)
async def test_serve_over_http_says_the_identity_it_is_given(
    flags: list[str], environment: dict[str, str], identity: tuple[str, str]
) -> None:
    """``--id`` and ``--version`` are the HTTP server's too (``/describe``, the calls'
    spans), as ``LINCHKIT_PLUGIN_ID`` and ``_VERSION`` are, which the docker provider
    sets. Before, the flags were taken and dropped: only the variables counted."""
    async with _served("--port", "0", *flags, env=environment) as (_, line):
        found = re.search(r"listening on (http://[0-9.:]+)", line)
        assert found, line
        async with httpx.AsyncClient() as client:
            described = (await client.get(f"{found[1]}/describe")).json()
    assert (described["id"], described["version"]) == identity


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])
def test_serve_refuses_a_log_level_it_does_not_know(websocket: bool) -> None:
    """A usage error naming the levels it takes, before the plugin is imported. Before:
    uvicorn's ``KeyError`` and its traceback, once the plugin had started (HTTP), or the
    level dropped and the plugin served (--websocket)."""
    flags = ["--websocket"] if websocket else []
    done = run_serve(*flags, "--port", "0", "--log-level", "verbose")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "dispatcher-plugin serve: error: argument --log-level: invalid choice: 'verbose'"
        " (choose from 'critical', 'error', 'warning', 'info', 'debug', 'trace')"
    )
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (
            ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
            {},
            f"arguments --tls-cert, --tls-key: {NOT_OVER_WEBSOCKET}",
        ),
        (["--client-ca", "ca.pem"], {}, f"argument --client-ca: {NOT_OVER_WEBSOCKET}"),
        (["--uds", "/tmp/linchkit-never.sock"], {}, f"argument --uds: {NOT_OVER_WEBSOCKET}"),
        # Its variable with the same value does not make the flag the variable's.
        (
            ["--tls-cert", "c.pem"],
            {"LINCHKIT_PLUGIN_TLS_CERT": "c.pem"},
            f"argument --tls-cert: {NOT_OVER_WEBSOCKET}",
        ),
        (["--ud", "/tmp/linchkit-never.sock"], {}, f"argument --uds: {NOT_OVER_WEBSOCKET}"),
    ],
    ids=["tls-pair", "client-ca", "uds", "flag-as-its-variable", "abbreviated"],
)
def test_serve_websocket_refuses_the_http_server_s_tls_and_socket_flags(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """A usage error, as ``--http`` with ``--websocket``: the flag named, never its value.
    Before: ``serve --websocket`` dropped the TLS files and the Unix socket unsaid, and
    served plain ws:// on --host/--port (an operator who asked for TLS got none); then it
    refused them with status 1, and a flag given the value of its variable was named as
    the variable."""
    done = run_serve("--websocket", "--port", "0", *given, **environment)
    assert_a_usage_error(done, said)
    assert ".pem" not in done.stderr and "never.sock" not in done.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LINCHKIT_PLUGIN_TLS_CERT", "c.pem"), ("LINCHKIT_PLUGIN_UDS", "/tmp/linchkit-never.sock")],
)
def test_serve_websocket_refuses_the_http_server_s_tls_and_socket_variables(
    variable: str, value: str
) -> None:
    """From the environment they are no usage error: one line naming the variable, status
    1, as a WebSocket server told to register by ``LINCHKIT_REGISTER_ETCD`` is refused."""
    done = run_serve("--websocket", "--port", "0", **{variable: value})
    assert_one_error_line(done, f"{variable}: {NOT_OVER_WEBSOCKET}, whose server listens on")


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (["--max-body-bytes", "1000"], {}, "argument --max-body-bytes:"),
        (
            ["--keep-alive-timeout", "5", "--body-timeout", "3"],
            {},
            "arguments --body-timeout, --keep-alive-timeout:",
        ),
        (["--max-header-bytes", "4096"], {}, "argument --max-header-bytes:"),
        # Given at its default it is still given: before, it was taken and dropped.
        (["--max-batch-items", "1000"], {}, "argument --max-batch-items:"),
        (
            ["--max-body-bytes", "1000"],
            {"LINCHKIT_PLUGIN_MAX_BODY_BYTES": "1000"},
            "argument --max-body-bytes:",
        ),
    ],
    ids=["body", "timeouts", "header-bytes", "at-its-default", "flag-as-its-variable"],
)
def test_serve_websocket_refuses_a_limit_flag_it_would_not_apply(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """Before: ``serve --websocket`` took every limit of the HTTP server and applied none,
    unsaid: an operator who set --max-body-bytes believed it in force. Then it refused one
    with status 1 when its value was not the default, named as its variable when the
    variable had the same value."""
    done = run_serve("--websocket", "--port", "0", *given, **environment)
    assert_a_usage_error(done, f"{said} {NOT_OVER_WEBSOCKET}")


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (
            [],
            {"LINCHKIT_PLUGIN_COMPRESS_MIN_BYTES": "100"},
            f"LINCHKIT_PLUGIN_COMPRESS_MIN_BYTES: {NOT_OVER_WEBSOCKET}, which applies only",
        ),
        (["--max-connections", "0"], {}, "--max-connections must be at least 1, not 0"),
        (["--header-timeout", "0"], {}, "--header-timeout must be a positive number"),
        (
            [],
            {"LINCHKIT_PLUGIN_MAX_CONNECTIONS": "0"},
            "LINCHKIT_PLUGIN_MAX_CONNECTIONS must be at least 1, not 0",
        ),
    ],
    ids=["compress-variable", "no-connections", "no-time", "no-connections-variable"],
)
def test_serve_websocket_refuses_a_limit_variable_or_a_limit_it_cannot_apply(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    done = run_serve("--websocket", "--port", "0", *given, **environment)
    assert_one_error_line(done, said)


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (
            ["--register-prefix", "/p"],
            {},
            "dispatcher-plugin serve: error: argument --register-prefix: not used over"
            " WebSocket (LINCHKIT_PLUGIN_WEBSOCKET)",
        ),
        (
            ["--tls-cert", "c.pem"],
            {},
            "dispatcher-plugin serve: error: argument --tls-cert: not used over WebSocket"
            " (LINCHKIT_PLUGIN_WEBSOCKET)",
        ),
        (
            [],
            {"LINCHKIT_PLUGIN_TLS_CERT": "c.pem"},
            "serve: LINCHKIT_PLUGIN_TLS_CERT: not used over WebSocket"
            " (LINCHKIT_PLUGIN_WEBSOCKET), whose server listens on --host/--port",
        ),
        (
            [],
            {"LINCHKIT_PLUGIN_MAX_BODY_BYTES": "100"},
            "serve: LINCHKIT_PLUGIN_MAX_BODY_BYTES: not used over WebSocket"
            " (LINCHKIT_PLUGIN_WEBSOCKET), which applies only",
        ),
    ],
    ids=["registry-flag", "tls-flag", "tls-variable", "limit-variable"],
)
def test_serve_over_websocket_by_its_variable_names_the_variable(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """WebSocket from ``LINCHKIT_PLUGIN_WEBSOCKET``, not the flag: a refusal names the
    variable, and how to serve over HTTP is to unset it. Before, every one said
    "(--websocket)", a flag the operator never typed."""
    done = run_serve("--port", "0", *given, LINCHKIT_PLUGIN_WEBSOCKET="1", **environment)
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(said), done.stderr
    assert "--websocket" not in line, line
    assert done.returncode == (1 if environment else 2), done.stderr
    if environment:
        assert "serve over HTTP (unset LINCHKIT_PLUGIN_WEBSOCKET)" in line, line


def test_serve_over_websocket_by_its_flag_and_its_variable_names_the_flag() -> None:
    """Typed, the flag is what the operator gave, whatever the environment says too."""
    done = run_serve(
        "--port", "0", "--websocket", "--register-prefix", "/p", LINCHKIT_PLUGIN_WEBSOCKET="1"
    )
    assert_a_usage_error(done, f"argument --register-prefix: {NOT_OVER_WEBSOCKET}")


@pytest.mark.parametrize(
    ("variable", "text", "said"),
    [
        ("LINCHKIT_PLUGIN_PORT", "http", "LINCHKIT_PLUGIN_PORT must be a whole number, not 'http'"),
        (
            "LINCHKIT_PLUGIN_BODY_TIMEOUT",
            "soon",
            "LINCHKIT_PLUGIN_BODY_TIMEOUT must be a number, not 'soon'",
        ),
    ],
)
def test_serve_names_a_number_variable_that_is_none(variable: str, text: str, said: str) -> None:
    """Named as the other variables are, in one line that begins with the command. Before:
    ``Error: a LINCHKIT_PLUGIN_* setting is not a number: invalid literal for int() with
    base 10: 'http'``, which named none, and ``connect``, which reads neither, ended so
    too."""
    done = run_serve(**{variable: text})
    assert_one_error_line(done, said)


def test_a_number_variable_that_is_none_is_not_read_past_its_flag_or_by_connect() -> None:
    """Its flag typed wins over it, and ``connect`` reads no such variable: neither ends on it."""
    done = run_serve("--port", "99999", LINCHKIT_PLUGIN_PORT="http")
    assert_one_error_line(done, "--port must be in 0-65535")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "linchkit_plugin.cli", "connect", "echo_plugin:EchoPlugin"),
            *("--path", str(ROOT / "examples" / "python"), "--id", "echo", "--version", "1"),
            *("--url", "ws://127.0.0.1:9/v1/plugins/connect"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LINCHKIT_PLUGIN_PORT": "http", "LINCHKIT_REGISTER_ETCD": "http://e:1"},
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("connect: LINCHKIT_REGISTER_ETCD: "), done.stderr


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (["--max-body-bytes", "0"], {}, "--max-body-bytes must be at least 1, not 0"),
        (["--keep-alive-timeout", "-1"], {}, "--keep-alive-timeout must be a positive number"),
        (
            ["--max-batch-items", "5"],
            {"LINCHKIT_PLUGIN_MAX_BATCH_ITEMS": "5", "LINCHKIT_PLUGIN_BODY_TIMEOUT": "0"},
            "LINCHKIT_PLUGIN_BODY_TIMEOUT must be a positive number",
        ),
    ],
    ids=["flag", "timeout-flag", "variable"],
)
def test_serve_names_a_limit_it_refuses_as_it_was_given(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """The flag when typed, the variable when it came from the environment. Before, the
    ``ServerLimits`` field (``max_body_bytes must be at least 1``), typed nowhere."""
    done = run_serve("--port", "0", *given, **environment)
    assert_one_error_line(done, said)


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (["--port", "99999"], {}, "--port must be in 0-65535 (0: any free port), not 99999"),
        ([], {"LINCHKIT_PLUGIN_PORT": "70000"}, "LINCHKIT_PLUGIN_PORT must be in 0-65535"),
        (["--host", " "], {}, "--host is empty"),
        ([], {"LINCHKIT_PLUGIN_HOST": " "}, "LINCHKIT_PLUGIN_HOST is empty"),
    ],
    ids=["port-flag", "port-variable", "host-flag", "host-variable"],
)
def test_serve_names_where_it_cannot_listen_as_it_was_given(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """Before, ``--port`` and ``--host`` whichever gave them: an operator who set only the
    variable looked for a flag on a command line that had none."""
    done = run_serve(*given, **environment)
    assert_one_error_line(done, said)


#: A config cut short, its secret never to be shown.
CUT_CONFIG = '{"password": "s3cr3t-of-the-config"'


@pytest.mark.parametrize(
    ("given", "environment", "said"),
    [
        (["--config", CUT_CONFIG], {}, "serve: --config is not valid JSON"),
        (["--config", "[1]"], {}, "serve: --config must be a JSON object"),
        ([], {"LINCHKIT_PLUGIN_CONFIG": CUT_CONFIG}, "serve: LINCHKIT_PLUGIN_CONFIG is not valid"),
        (
            ["--websocket", "--config", "null"],
            {"LINCHKIT_PLUGIN_CONFIG": "{}"},
            "serve: --config must be a JSON object",
        ),
    ],
    ids=["flag-not-json", "flag-array", "variable-not-json", "websocket-flag-null"],
)
def test_serve_names_a_config_it_cannot_use_and_shows_none_of_it(
    given: list[str], environment: dict[str, str], said: str
) -> None:
    """The flag when typed, the variable when it came from the environment, never its
    text (a config may hold a secret), as every SDK's example plugin names its --config
    (tests/conformance/test_serve_cli.py). Before: orjson's message alone, naming neither."""
    done = run_serve("--port", "0", *given, **environment)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == said or done.stderr.startswith(said), done.stderr
    assert "s3cr3t" not in done.stderr and done.stdout == ""


async def test_serve_websocket_applies_max_connections_and_header_timeout() -> None:
    """``--max-connections`` is the WebSocket server's cap (an upgrade past it is refused
    503) and ``--header-timeout`` the time a connection has for its head. Before, both were
    dropped: 1,000 connections and 10 s whatever the operator said."""
    flags = ("--websocket", "--port", "0", "--max-connections", "1", "--header-timeout", "1")
    async with _served(*flags) as (_, line):
        found = re.search(r"listening on (ws://\S+)", line)
        assert found, line
        url = found[1]
        async with aiohttp.ClientSession() as client:
            first = await client.ws_connect(url)
            assert orjson.loads((await first.receive()).data)["type"] == "hello"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(url)
            assert refused.value.status == 503
            await first.close()

        host, port = url.removeprefix("ws://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            started = time.monotonic()
            async with asyncio.timeout(8):  # the default 10 s would not be over
                assert await reader.read() == b""
            assert time.monotonic() - started < 8
        finally:
            writer.close()


async def test_serve_websocket_leaves_the_http_variable_to_the_http_server() -> None:
    """``--http`` given with ``--websocket`` is refused (it would do nothing:
    tests/conformance/test_command_line_refusals_show_no_value.py), but not
    ``LINCHKIT_PLUGIN_HTTP``: an image may set it for both modes, and it serves."""
    environment = {"LINCHKIT_PLUGIN_HTTP": "h11", "LINCHKIT_PLUGIN_WEBSOCKET": "1"}
    async with _served("--port", "0", env=environment) as (_, line):
        pass
    assert "over WebSocket, listening on ws://" in line, line


async def _websocket_server_log(*flags: str) -> str:
    """What ``serve --websocket`` writes on stderr while a host sends it a frame it
    logs at INFO (an ``error`` frame: the host could not use one of its frames), then a
    health check, whose answer says the frame before it was read, and goes away."""
    async with _served("--websocket", "--port", "0", *flags) as (process, line):
        async with asyncio.timeout(30):
            found = re.search(r"listening on (ws://\S+)", line)
            assert found, line
            async with aiohttp.ClientSession() as client, client.ws_connect(found[1]) as host:
                assert orjson.loads((await host.receive()).data)["type"] == "hello"
                await host.send_str('{"type": "error", "error": "frame 7 went astray"}')
                await host.send_str('{"type": "health", "id": 1}')
                assert orjson.loads((await host.receive()).data)["type"] == "health"
        process.terminate()
        _, rest = await process.communicate()
    return line + rest.decode()


@pytest.mark.parametrize("level", ["info", "DEBUG"])
async def test_serve_websocket_logs_at_the_level_given(level: str) -> None:
    """``--log-level`` is the WebSocket server's, as it is uvicorn's over HTTP. Before, it
    was dropped: whatever the operator asked, the server's INFO lines never showed."""
    said = await _websocket_server_log("--log-level", level)
    assert "INFO linchkit_plugin.websocket: the host could not use a frame: frame 7" in said


async def test_serve_websocket_logs_warnings_only_by_default() -> None:
    said = await _websocket_server_log()
    assert "listening on ws://" in said
    assert "the host could not use a frame" not in said, said


NOISY_PLUGIN = """
import logging

from linchkit_plugin import Plugin


class Noisy(Plugin):
    async def init(self, config):
        logging.getLogger("noisy_plugin").warning("the config is empty")
"""


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])
async def test_serve_logs_the_plugin_s_lines_with_their_level_and_logger(
    tmp_path: Path, websocket: bool
) -> None:
    """A plugin's own log lines reach stderr as ``LEVEL name: message`` in both modes, so a
    host reading them keeps their level. Before, over HTTP they came through Python's
    last-resort handler, the message alone (uvicorn's set up its own loggers only)."""
    (tmp_path / "noisy_plugin.py").write_text(NOISY_PLUGIN)
    command = [sys.executable, "-m", "linchkit_plugin.cli", "serve", "noisy_plugin:Noisy"]
    process = await asyncio.create_subprocess_exec(
        *command, "--path", str(tmp_path), "--port", "0", *(["--websocket"] if websocket else []),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    said = ""
    try:
        async with asyncio.timeout(30):
            while "listening on" not in said:
                line = (await process.stderr.readline()).decode()
                assert line, said
                said += line
    finally:
        process.terminate()
        _, rest = await process.communicate()
    said += rest.decode()
    assert "WARNING noisy_plugin: the config is empty\n" in said, said


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])
def test_serve_on_a_port_in_use_says_so_in_one_line(websocket: bool) -> None:
    """As every SDK's serve: one line, exit 1 (it was uvicorn's log line and exit 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--websocket"] if websocket else []
        done = subprocess.run(
            serve_command(*flags, "--port", str(port)), capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.strip() == f"serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_serve_on_a_unix_socket_it_cannot_make_says_so_in_one_line(tmp_path: Path) -> None:
    """A folder that is missing, or a file where the folder should be: one line, exit 1.
    It was the event loop's traceback, 74 lines (a container's full socket folder too)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for path, reason in (
        (tmp_path / "missing" / "plugin.sock", "No such file or directory"),
        (blocker / "plugin.sock", "Not a directory"),
    ):
        done = subprocess.run(
            serve_command("--uds", str(path)), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1, done.stderr
        said = f"serve: cannot listen on the Unix socket {path}: {reason}"
        assert done.stderr.strip() == said, done.stderr


def _help_entries(shown: str) -> dict[str, str]:
    """Each option of a ``--help`` (an entry begins two spaces in, with a dash; its help
    may begin on the next line, indented further): its last flag and its help, on one
    line. ``{...}`` ends an entry's help when it lists the option's choices."""
    entries: dict[str, str] = {}
    blocks = re.split(r"\n(?=  -)", shown)
    for block in blocks[1:]:
        block = re.split(r"\n(?=\S)", block)[0]  # up to the next group's title
        invocation, _, text = re.split(r"(\s{2,}|\n\s*)", block.strip(), maxsplit=1)
        flag = re.findall(r"--[\w-]+", invocation)[-1]
        entries[flag] = " ".join(text.split()) + " " + invocation
    return entries


def test_serve_help_names_the_variable_each_option_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option's help names its variable in brackets, or says ``[no variable]``, and
    says true: each ``LINCHKIT_PLUGIN_*`` variable named sets its option as the flag does,
    an option said to read none is not set by one (the registry's ``LINCHKIT_REGISTER_*``
    are read when it registers: tests/test_plugin_registry.py). Before, the help said
    every option but four read ``LINCHKIT_PLUGIN_<OPTION>``, and --log-level and --path
    read none. Read from ``serve --help`` and what the parser makes of a command line,
    not from argparse's private list of actions."""
    for name in list(os.environ):
        if name.startswith(("LINCHKIT_PLUGIN_", "LINCHKIT_REGISTER_")):
            monkeypatch.delenv(name)
    shown = subprocess.run(
        [sys.executable, "-m", "linchkit_plugin.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "1000"},  # argparse wraps none of its lines
        check=True,
    ).stdout
    entries = _help_entries(shown)
    assert {"--host", "--websocket", "--register-etcd", "--compress-min-bytes"} <= set(entries)

    def parsed(*arguments: str, **variables: str) -> dict[str, Any]:
        with monkeypatch.context() as environment:
            for variable, text in variables.items():
                environment.setenv(variable, text)
            options = vars(cli._parsers()[1].parse_args(["module:Class", *arguments]))
        # What the command line gave, and the variables refused: not the settings.
        return {k: v for k, v in options.items() if k not in ("given", "malformed")}

    unset = parsed()
    reading_none = []
    for flag, text in entries.items():
        if flag == "--help":
            continue
        said = re.search(r"\[(LINCHKIT_\w+|no variable)\b", text)
        assert said, f"{flag}'s help names no variable and does not say it reads none"
        variable = said[1]
        if variable == "no variable":
            reading_none.append(flag)
            variable = "LINCHKIT_PLUGIN_" + flag.removeprefix("--").replace("-", "_").upper()
        elif not variable.startswith("LINCHKIT_PLUGIN_"):
            continue
        if choices := re.search(r"\{([^}]*)\}$", text):
            value = choices[1].split(",")[-1]
            typed = parsed(flag, value)
        elif text.endswith(f" {flag}"):  # a switch: no value shown after it
            value = "1"
            typed = parsed(flag)
        else:
            value = "7"
            typed = parsed(flag, value)
        assert typed != unset, (flag, value)
        if flag in reading_none:
            assert parsed(**{variable: value}) == unset, (flag, variable)
        else:
            assert parsed(**{variable: value}) == typed, (flag, variable)
    assert reading_none == ["--path", "--log-level"]
    assert "--path and --log-level read none" in " ".join(shown.split()), shown


def test_serve_help_documents_every_limit_and_its_variable() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "linchkit_plugin.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    for option in (
        "--token-file",
        "LINCHKIT_PLUGIN_TOKEN",
        "--max-body-bytes",
        "LINCHKIT_PLUGIN_MAX_BODY_BYTES",
        "--max-batch-items",
        "LINCHKIT_PLUGIN_MAX_BATCH_ITEMS",
        "--body-timeout",
        "--header-timeout",
        "--keep-alive-timeout",
        "--max-header-bytes",
        "--max-connections",
        "LINCHKIT_PLUGIN_MAX_CONNECTIONS",
    ):
        assert option in shown, option


# 2. nesting


def nested(depth: int) -> bytes:
    """``{"deep": [[…1…]]}`` as JSON text: orjson would refuse to write it, the point."""
    return b'{"deep": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


def deep_envelope(depth: int) -> bytes:
    return b'{"v": 1, "method": "anything", "params": ' + nested(depth) + b"}"


@pytest.mark.parametrize("depth", [300, 2000])
async def test_params_nested_too_deep_are_invalid_params_not_a_500(depth: int) -> None:
    async with plugin_server() as port:
        answer = await call(port, deep_envelope(depth))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["type"] == "invalid_params"
        other = orjson.dumps(envelope("anything"))
        answer = await call(port, b'{"batch": [' + deep_envelope(300) + b", " + other + b"]}")
        first, second = answer.json()["results"]
        assert first["error"]["type"] == "invalid_params"
        assert second == {"ok": True, "result": {}}
        fine = await call(port, deep_envelope(200))
        assert orjson.dumps(fine.json()["result"]) == nested(200).replace(b" ", b"")


async def test_a_result_json_cannot_carry_is_an_error_envelope_not_a_500() -> None:
    async with plugin_server() as port:
        answer = await call(port, envelope("a_set"))
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"]["type"] == "provider_error"
        answer = await call(port, {"batch": [envelope("a_set"), envelope("anything", {"a": 1})]})
        bad, good = answer.json()["results"]
        assert bad["error"]["type"] == "provider_error"
        assert good == {"ok": True, "result": {"a": 1}}


@pytest.mark.parametrize("deadline_ms", [-5, 0, 2**63 - 1])
async def test_a_deadline_that_bounds_nothing_lets_the_call_run(deadline_ms: int) -> None:
    # A negative deadline_ms failed the call at once as deadline_exceeded (HTTP, Lambda,
    # Knative); only a positive one bounds a call, as on every transport (docs/protocol.md).
    async with plugin_server() as port:
        answer = await call(port, envelope("anything", {"a": 1}, deadline_ms=deadline_ms))
        assert answer.json() == {"ok": True, "result": {"a": 1}}


# 3. batch size


async def test_a_batch_over_the_item_limit_is_refused_before_any_item_runs() -> None:
    async with plugin_server() as port:  # the default limit: 1,000 items
        Binding.calls = 0
        answer = await call(port, {"batch": [envelope("echo", {"i": i}) for i in range(1001)]})
        assert answer.status_code == 413
        assert answer.json()["error"]["type"] == "invalid_params"
        assert "1001" in answer.json()["error"]["message"]
        assert Binding.calls == 0
        answer = await call(port, {"batch": [envelope("echo", {"i": i}) for i in range(1000)]})
        assert answer.status_code == 200 and len(answer.json()["results"]) == 1000
    async with plugin_server(max_batch_items=3) as port:
        answer = await call(port, {"batch": [envelope("echo")] * 4})
        assert answer.status_code == 413


# 4. body size, slow and lying clients


@IMPLEMENTATIONS
async def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(
    http: str,
) -> None:
    async with plugin_server(http=http) as port:  # the default limit: 8 MiB
        answer, took = await raw_exchange(port, post_head(10 * 1024 * 1024), timeout=5)
        status, body = status_and_body(answer)
        assert status == 413 and body["error"]["type"] == "invalid_params"
        assert took < 2  # answered at once, and the connection closed: no body to wait for


@IMPLEMENTATIONS
async def test_a_content_length_that_lies_is_answered_within_the_body_timeout(http: str) -> None:
    async with plugin_server(http=http, body_timeout=1) as port:
        answer, took = await raw_exchange(port, post_head(1000) + b'{"v": 1,', timeout=10)
        status, body = status_and_body(answer)
        assert status == 408 and body["error"]["type"] == "deadline_exceeded"
        assert 0.9 < took < 3


@IMPLEMENTATIONS
async def test_a_chunked_body_is_bounded_in_size_and_in_time(http: str) -> None:
    chunked = b"Transfer-Encoding: chunked\r\n"
    head = post_head(0, extra=chunked).replace(b"Content-Length: 0\r\n", b"")
    async with plugin_server(http=http, max_body_bytes=4096, body_timeout=1) as port:
        chunk = b"200\r\n" + b" " * 512 + b"\r\n"
        answer, _ = await raw_exchange(port, head + chunk * 20, timeout=5)
        status, body = status_and_body(answer)
        assert status == 413 and body["error"]["type"] == "invalid_params"

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(head)
        answer = b""
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof() and time.monotonic() - started < 10:
                writer.write(b"1\r\n \r\n")  # a body that never ends
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer += await asyncio.wait_for(reader.read(65536), 0.2)
        writer.close()
        assert status_and_body(answer)[0] == 408
        assert time.monotonic() - started < 3


async def slowloris(port: int, stop: asyncio.Event) -> float:
    """Drip a request head a byte at a time until the server closes; when it did."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /invoke HTTP/1.1\r\nHost: plugin\r\n")
        while not stop.is_set():
            try:
                writer.write(b"X")
                await writer.drain()
                if await asyncio.wait_for(reader.read(4096), 0.25) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
        return time.monotonic()
    finally:
        writer.close()


@IMPLEMENTATIONS
async def test_slowloris_connections_are_closed_and_calls_go_on_meanwhile(http: str) -> None:
    async with plugin_server(http=http, header_timeout=1.5) as port:
        stop = asyncio.Event()
        started = time.monotonic()
        lorises = [asyncio.create_task(slowloris(port, stop)) for _ in range(300)]
        await asyncio.sleep(0.5)
        answer = await call(port, envelope("anything", {"still": "served"}))
        assert answer.json() == {"ok": True, "result": {"still": "served"}}
        done, pending = await asyncio.wait(lorises, timeout=6)
        stop.set()
        await asyncio.gather(*pending)
        assert not pending, f"{len(pending)} of 300 slow connections still open after 6 s"
        assert max(task.result() for task in done) - started < 1.5 + 3


@IMPLEMENTATIONS
async def test_idle_connections_are_closed_and_the_connection_count_is_capped(http: str) -> None:
    async with plugin_server(
        http=http, header_timeout=1, keep_alive_timeout=1, max_connections=20
    ) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):  # the 21st is closed as it is accepted
            assert await asyncio.wait_for(reader.read(), 1) == b""
        writer.close()
        started = time.monotonic()
        for idle_reader, _ in idle:  # a new connection that says nothing is not kept
            assert await asyncio.wait_for(idle_reader.read(), 4) == b""
        assert time.monotonic() - started < 3
        for _, idle_writer in idle:
            idle_writer.close()
        answer = await call(port, envelope("anything", {"a": 1}))
        assert answer.status_code == 200


@IMPLEMENTATIONS
async def test_a_connection_idle_between_calls_is_kept_past_the_head_timeout(
    http: str,
) -> None:
    """Only the keep-alive timeout ends an idle connection. The head timer also closed one
    idle past ``header_timeout`` (10 s), well before the dispatcher stops reusing it (30 s):
    a call sent on it just as it closed was dropped with its request written."""
    body = orjson.dumps(envelope("anything", {"a": 1}))
    request = post_head(len(body)) + body
    async with plugin_server(http=http, header_timeout=0.3, keep_alive_timeout=3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await asyncio.wait_for(reader.readexactly(length), 5)
                await asyncio.sleep(1.0)  # idle past the head timeout, within keep-alive
        finally:
            writer.close()


def test_the_plugin_server_keeps_an_idle_connection_longer_than_the_dispatcher_does() -> None:
    """So the host, not the server, closes an idle pooled connection: no call is ever sent
    on a connection the server is closing."""
    from linchkit_plugin.limits import ServerLimits
    from providers._http_client import HttpPool

    assert ServerLimits().keep_alive_timeout > HttpPool().idle_timeout_s


@IMPLEMENTATIONS
async def test_a_request_head_over_the_header_limit_is_refused(http: str) -> None:
    async with plugin_server(http=http, max_header_bytes=8192) as port:
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"x" * 100) for i in range(2000))
        answer, took = await raw_exchange(port, post_head(2, extra=padding) + b"{}", timeout=5)
        assert answer == b"" or int(answer.split(b" ", 2)[1]) in {400, 431}  # or reset
        assert took < 2


# 5. content type, params that do not bind


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_a_body_that_is_not_json_by_its_content_type_is_refused(content_type: str) -> None:
    async with plugin_server() as port:
        answer = await call(port, envelope("anything"), content_type=content_type)
        assert answer.status_code == 415
        assert answer.json()["error"]["type"] == "invalid_params"
        with_charset = "application/json; charset=utf-8"
        answer = await call(port, envelope("anything"), content_type=with_charset)
        assert answer.status_code == 200


@pytest.mark.parametrize(
    ("method", "params", "says"),
    [
        ("anything", {"self": 1}, "self"),
        ("echo", {"self": {"x": 1}, "other": 2}, "self"),
        ("only_positional", {"value": 1}, "value"),
        ("only_positional", {"nope": 1}, "missing"),
        ("only_positional", {"nope": 1}, "it takes no 'nope'"),  # the misspelt name too
        ("named", {"a": 1, "nope": 2}, "nope"),
        ("only_positional", [1, 2], "positional"),
    ],
)
async def test_params_that_cannot_bind_are_invalid_params(
    method: str, params: Any, says: str
) -> None:
    async with plugin_server() as port:
        answer = await call(port, envelope(method, params))
        error = answer.json()["error"]
        assert error["type"] == "invalid_params", error
        assert says in error["message"]
        assert method in error["message"]


async def test_a_type_error_of_the_plugin_s_own_stays_a_plugin_error() -> None:
    async with plugin_server() as port:
        answer = await call(port, envelope("broken", {"a": 1}))
        assert answer.json()["error"]["type"] == "TypeError"


def test_the_unix_socket_check_never_makes_the_served_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that the folder takes a socket made its probe at the served path, then
    removed it: a host pinning the first socket it found there (the Docker provider) saw
    it removed, read the plugin as tampering with its socket, and refused every call of
    the container (a full run of the suite caught it). The probe goes beside it now."""
    bound: list[str] = []
    bind = socket.socket.bind

    def recording(self: socket.socket, address: Any) -> None:
        bound.append(str(address))
        bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", recording)
    path = tmp_path / "plugin.sock"
    cli._try_unix_socket(str(path))
    assert bound and str(path) not in bound, bound
    assert list(tmp_path.iterdir()) == []  # the probe is gone too
