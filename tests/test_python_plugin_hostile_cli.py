"""``dispatcher-plugin`` and the executables built on ``linchkit_plugin.ws_server`` against
a hostile sweep of their command lines, settings and peers.

* ``connect`` imported the plugin's module before it checked ``--url``, whose refusal
  then came after whatever the module's import ran; and a URL holding a character that
  does not print was dialled, each dial's line writing it to the terminal. ``--url`` is
  checked first now, and such a URL refused in one line, masked. (``http://`` and
  ``https://`` stay taken, dialled as ``ws://`` and ``wss://``, as in every SDK.)
* ``serve --websocket`` that could not listen once the plugin's hooks had run (the port
  taken meanwhile) was the event loop's traceback, and the hooks never stopped; the
  executables' ``serve --websocket`` showed a failing ``init`` as a traceback. One
  ``serve:`` line and exit 1 now, the hooks stopped first.
* The etcd registry's TLS files were handed to OpenSSL unread: a FIFO held the start
  for ever. Each is refused now, as the server's own TLS files are, naming its setting.
* A plugin module calling ``sys.exit(…)`` as it was imported ended the process with its
  own status and words. One ``cannot load plugin`` line and exit 1 now; Ctrl-C (a
  ``KeyboardInterrupt``) during the import stays an interruption.
* A WebSocket handshake to the HTTP server was uvicorn's plain-text 500 and an error in
  its log: the app ignored the ``websocket`` scope. It is refused before it upgrades, as
  a request no route takes (405 on a route's path, 404 elsewhere), with an envelope.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from linchkit_plugin import PluginApp, PluginHost
from linchkit_plugin._etcd_gateway import EtcdAccess
from linchkit_plugin._ws_dial import checked_gateway_url
from linchkit_plugin.errors import ProviderError
from tests.conftest import ROOT
from tests.test_python_plugin_server import (
    IMPLEMENTATIONS,
    assert_one_error_line,
    call,
    envelope,
    plugin_server,
    raw_exchange,
    status_and_body,
)

PLUGIN_CLI = [sys.executable, "-m", "linchkit_plugin.cli"]
#: The executable built on ``ws_server.main`` that every SDK's conformance suite runs.
EXAMPLE_PLUGIN = ROOT / "sdk" / "python" / "examples" / "example_plugin.py"
#: Bounds a run: the bugs here kept some running for ever (a FIFO read by OpenSSL).
RUN_TIMEOUT = 30
TOKEN = "tok-3c9f1e-never-shown"

PLUGINS = """
import pathlib
import socket

from linchkit_plugin import Plugin

#: What each hook of a plugin here writes as it runs: the test reads which ran.
HOOKS = pathlib.Path(__file__).with_name("hooks-ran")
pathlib.Path(__file__).with_name("imported").write_text("yes")


def ran(hook):
    with HOOKS.open("a") as hooks:
        hooks.write(hook + "\\n")


class Fine(Plugin):
    async def echo(self, **params):
        return params


class InitRaises(Plugin):
    async def init(self, config):
        raise RuntimeError("init boom")


class TakesThePort(Plugin):
    \"\"\"Its init takes the port the server listens on next: the listening fails after it.\"\"\"

    async def init(self, config):
        ran("init")
        self.held = socket.socket()
        self.held.bind(("127.0.0.1", config["port"]))
        self.held.listen()

    async def stop(self):
        ran("stop")

    async def destroy(self):
        ran("destroy")
        self.held.close()
"""

#: A plugin executable built on ``ws_server.main``, serving the class its first argument names.
EXECUTABLE = """
import sys

import plugins
from linchkit_plugin.ws_server import main

plugin_class = getattr(plugins, sys.argv[1])
sys.exit(main(plugin_class, sys.argv[2:], plugin_id="hostile", version="1.0.0"))
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "plugins.py").write_text(PLUGINS)
    (tmp_path / "executable.py").write_text(EXECUTABLE)
    return tmp_path


def _environment(**added: str) -> dict[str, str]:
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LINCHKIT_PLUGIN", "LINCHKIT_REGISTER", "OTEL_"))
    }
    return {**inherited, **added}


def run(command: list[str], **environment: str) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end, without this process's plugin and registry variables,
    ``environment`` added."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=_environment(**environment),
    )


def plugin_cli(folder: Path, command: str, entrypoint: str, *options: str) -> list[str]:
    return [*PLUGIN_CLI, command, entrypoint, "--path", str(folder), *options]


def executable(folder: Path, plugin_class: str, *arguments: str) -> list[str]:
    return [sys.executable, str(folder / "executable.py"), plugin_class, *arguments]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def one_line(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The one line a refusal is: ``status``, nothing on stdout, no traceback, nothing
    that does not print."""
    assert done.returncode == status, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.rstrip("\n")
    assert line.isprintable(), repr(line)
    return line


# 1. connect checks --url first


URLS_THAT_ARE_NO_GATEWAY = [
    pytest.param(f"ftp://{TOKEN}@gw.example/?token={TOKEN}", id="ftp with a token"),
    pytest.param("ws:///v1/plugins/connect", id="no host"),
    pytest.param("wss://", id="nothing but the scheme"),
    pytest.param(f"http://me:{TOKEN}@/v1/plugins/connect", id="http without a host"),
    pytest.param("ws://gw.example\x1b[2J/x", id="a control character"),
    pytest.param("ws://gw\x1b.example/x", id="a control character in the host"),
    pytest.param("ws://gw.example/\u202ex", id="a bidi control in the path"),
]


@pytest.mark.parametrize("url", URLS_THAT_ARE_NO_GATEWAY)
def test_connect_refuses_a_url_that_names_no_gateway_before_importing_the_plugin(
    folder: Path, url: str
) -> None:
    done = run(
        plugin_cli(folder, "connect", "plugins:Fine", "--url", url, "--id", "p", "--version", "1")
    )
    line = one_line(done, 2)  # connect's status for a --url it cannot use, as before
    assert line.startswith("connect: --url must be a ws:// or wss:// URL"), line
    assert TOKEN not in done.stderr
    assert not (folder / "imported").exists(), "the plugin was imported for nothing"


def test_an_executable_s_connect_refuses_a_url_that_does_not_print_too() -> None:
    done = run([sys.executable, str(EXAMPLE_PLUGIN), "connect", "--url", "ws://gw\x1b.example/"])
    line = one_line(done, 1)  # every SDK executable's status for a refusal
    assert line.startswith("connect: --url must be a ws:// or wss:// URL"), line


def test_dial_takes_websocket_and_http_urls_naming_a_host() -> None:
    for url in ("ws://gw.example/v1/plugins/connect", "WSS://gw.example:8443/x"):
        assert checked_gateway_url(url) == url
    for url in ("http://gw.example/", "https://gw.example/"):  # dialled as ws(s), every SDK
        assert checked_gateway_url(url) == url
    for url in ("ftp://gw.example/", "ws://:80/", "ws://gw.example/\n"):
        with pytest.raises(ValueError, match="must be a ws:// or wss:// URL"):
            checked_gateway_url(url)


# 2. serve --websocket: a failed start is one line


def test_serve_websocket_that_cannot_listen_once_the_hooks_ran_stops_them_in_one_line(
    folder: Path,
) -> None:
    port = free_port()
    done = run(
        plugin_cli(
            folder,
            "serve",
            "plugins:TakesThePort",
            "--websocket",
            "--port",
            str(port),
            "--config",
            json.dumps({"port": port}),
        )
    )
    line = one_line(done, 1)
    assert line == f"serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert (folder / "hooks-ran").read_text().split() == ["init", "stop", "destroy"]


@pytest.mark.parametrize("plugin", ["InitRaises", "TakesThePort"])
def test_an_executable_s_serve_websocket_says_a_failed_start_in_one_line(
    folder: Path, plugin: str
) -> None:
    port = free_port()
    done = run(
        executable(
            folder,
            plugin,
            "serve",
            "--websocket",
            "--address",
            f"127.0.0.1:{port}",
            "--config",
            json.dumps({"port": port}),
        )
    )
    line = one_line(done, 1)
    if plugin == "InitRaises":
        assert line == "serve: the plugin's init hook failed: RuntimeError: init boom"
    else:
        assert line == f"serve: cannot listen on 127.0.0.1:{port}: Address already in use"
        assert (folder / "hooks-ran").read_text().split() == ["init", "stop", "destroy"]


# 3. the etcd registry's TLS files: read as the server's own are


ETCD_SETTINGS = {
    "ca_file": ("--register-etcd-ca-file", "LINCHKIT_REGISTER_ETCD_CA_FILE"),
    "cert_file": ("--register-etcd-cert-file", "LINCHKIT_REGISTER_ETCD_CERT_FILE"),
    "key_file": ("--register-etcd-key-file", "LINCHKIT_REGISTER_ETCD_KEY_FILE"),
}
REGISTRY = {
    "LINCHKIT_REGISTER_ETCD": "https://127.0.0.1:9",
    "LINCHKIT_REGISTER_PREFIX": "/linchkit/plugins/hostile",
}


def _unusable_file(folder: Path, kind: str) -> tuple[str, str]:
    """A path OpenSSL must not be given, and why it is refused."""
    if kind == "fifo":
        os.mkfifo(folder / "fifo.pem")
        return str(folder / "fifo.pem"), "not a regular file (a fifo)"
    if kind == "device":
        return "/dev/zero", "not a regular file (a character device)"
    oversized = folder / "bundle.pem"
    with oversized.open("wb") as bundle:
        bundle.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    return str(oversized), "larger than 4194304 bytes"


def _etcd_files(
    folder: Path, setting: str, unusable: str, source: str
) -> tuple[list[str], dict[str, str]]:
    """Flags and variables that name ``unusable`` as ``setting`` (its partner, for a client
    certificate or its key, a readable file), ``source`` telling which way."""
    partner = folder / "partner.pem"
    partner.write_text("-----BEGIN CERTIFICATE-----\n")
    files = {setting: unusable}
    if setting == "cert_file":
        files["key_file"] = str(partner)
    elif setting == "key_file":
        files["cert_file"] = str(partner)
    if source == "flag":
        flags = ["--register-etcd", REGISTRY["LINCHKIT_REGISTER_ETCD"]]
        flags += ["--register-prefix", REGISTRY["LINCHKIT_REGISTER_PREFIX"]]
        for name, path in files.items():
            flags += [ETCD_SETTINGS[name][0], path]
        return flags, {}
    return [], {**REGISTRY, **{ETCD_SETTINGS[name][1]: path for name, path in files.items()}}


@pytest.mark.parametrize(
    ("setting", "kind", "source"),
    [
        ("ca_file", "fifo", "flag"),
        ("ca_file", "device", "variable"),
        ("ca_file", "oversized", "variable"),
        ("cert_file", "fifo", "variable"),
        ("key_file", "device", "flag"),
        ("key_file", "fifo", "variable"),
    ],
)
def test_serve_refuses_an_etcd_tls_file_that_is_no_regular_file_of_pem_size(
    folder: Path, setting: str, kind: str, source: str
) -> None:
    path, why = _unusable_file(folder, kind)
    flags, environment = _etcd_files(folder, setting, path, source)
    done = run(plugin_cli(folder, "serve", "plugins:Fine", "--port", "0", *flags), **environment)
    named = ETCD_SETTINGS[setting][0 if source == "flag" else 1]
    assert_one_error_line(done, f"{named}: cannot read {path}: {why}")


@pytest.mark.parametrize(("setting", "kind"), [("ca_file", "fifo"), ("key_file", "device")])
def test_the_grpc_executable_refuses_an_etcd_tls_file_that_is_no_regular_file(
    folder: Path, setting: str, kind: str
) -> None:
    path, why = _unusable_file(folder, kind)
    _, environment = _etcd_files(folder, setting, path, "variable")
    done = run(
        [sys.executable, str(EXAMPLE_PLUGIN), "serve", "--address", "127.0.0.1:0"], **environment
    )
    line = one_line(done, 1)
    assert line == f"serve: {ETCD_SETTINGS[setting][1]}: cannot read {path}: {why}"


def test_an_etcd_tls_setting_that_is_no_path_is_never_shown(tmp_path: Path) -> None:
    """PEM text pasted where the key's path goes, a path that would write control
    characters: refused, naming the setting, neither repeated."""
    pasted = f"-----BEGIN PRIVATE KEY-----\n{TOKEN}\n-----END PRIVATE KEY-----\n"
    certificate = tmp_path / "client.pem"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    for key in (pasted, str(tmp_path / "\x1b[2Jkey.pem")):
        access = EtcdAccess(cert_file=str(certificate), key_file=key)
        with pytest.raises(
            ValueError, match="LINCHKIT_REGISTER_ETCD_KEY_FILE: cannot read its"
        ) as refused:
            access.tls_context("https://127.0.0.1:2379")
        assert TOKEN not in str(refused.value) and "\x1b" not in str(refused.value)


# 4. sys.exit() in a plugin module as it is imported


EXITS = [
    pytest.param('sys.exit("some message")', "sys.exit('some message')", id="a message"),
    pytest.param("sys.exit(3)", "sys.exit(3)", id="a status"),
    pytest.param("sys.exit(0)", "sys.exit(0)", id="success"),
    pytest.param("sys.exit()", "sys.exit()", id="nothing"),
    pytest.param(r'sys.exit("\x1b[2J\nforged")', r"sys.exit('\x1b[2J\nforged')", id="control"),
]
COMMANDS = {
    "serve": ["serve", "--port", "0"],
    "serve --websocket": ["serve", "--port", "0", "--websocket"],
    "connect": ["connect", "--url", "ws://127.0.0.1:9/x", "--id", "p", "--version", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("statement", "shown"), EXITS)
def test_a_module_that_calls_sys_exit_as_it_is_imported_is_one_line(
    tmp_path: Path, statement: str, shown: str, command: str
) -> None:
    (tmp_path / "exits.py").write_text(f"import sys\n\n{statement}\n")
    name, *options = COMMANDS[command]
    done = run(plugin_cli(tmp_path, name, "exits:Plugin", *options))
    line = one_line(done, 1)
    assert line == f"{name}: cannot load plugin 'exits:Plugin': its module called {shown}"


def test_ctrl_c_while_the_module_is_imported_stays_an_interruption(tmp_path: Path) -> None:
    (tmp_path / "interrupted.py").write_text("raise KeyboardInterrupt\n")
    done = run(plugin_cli(tmp_path, "serve", "interrupted:Plugin", "--port", "0"))
    # Python's own end for an uncaught Ctrl-C: killed by SIGINT, as a shell sees it (130).
    assert done.returncode == -signal.SIGINT, (done.returncode, done.stderr)
    assert "cannot load plugin" not in done.stderr


def test_a_host_loading_such_a_plugin_in_process_lives_on(tmp_path: Path) -> None:
    """The local provider loads plugins into the dispatcher's own process: a module's
    ``sys.exit`` ended the dispatcher."""
    (tmp_path / "exits_in_process.py").write_text("import sys\n\nsys.exit(7)\n")
    with pytest.raises(ProviderError, match=r"its module called sys\.exit\(7\)"):
        PluginHost.load("exits_in_process:Plugin", tmp_path)


# 5. A WebSocket handshake to the HTTP server


def _upgrade(path: str, *, extra: bytes = b"") -> bytes:
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: plugin\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


@IMPLEMENTATIONS
async def test_a_websocket_handshake_to_the_http_server_is_refused_as_no_route_takes_it(
    http: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with plugin_server(http=http, token=TOKEN) as port:
        for path, status in (("/invoke", 405), ("/health", 405), ("/describe", 405), ("/x", 404)):
            answer, _ = await raw_exchange(port, _upgrade(path))
            assert status_and_body(answer)[0] == status, answer[:300]
            body = status_and_body(answer)[1]
            assert body["ok"] is False and body["error"]["type"] == "provider_error"
            assert "dispatcher-plugin serve --websocket" in body["error"]["message"]
            assert TOKEN not in answer.decode("latin-1")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"http://127.0.0.1:{port}/invoke")
        assert refused.value.status == 405
        # It goes on serving.
        served = await call(port, envelope("echo", {"n": 1}), token=TOKEN)
        assert served.status_code == 200 and served.json()["result"] == {"n": 1}
    assert "without completing handshake" not in caplog.text


async def test_an_asgi_server_that_cannot_answer_a_handshake_is_told_to_close() -> None:
    """No server here lacks the ``websocket.http.response`` extension (uvicorn has it with
    both its WebSocket implementations): this one is faked, as the ASGI messages alone."""
    app = PluginApp(PluginHost(_Plain()))
    scope = {"type": "websocket", "path": "/invoke", "headers": [], "extensions": {}}
    connect: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await connect.put({"type": "websocket.connect"})
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, connect.get, send)
    assert [message["type"] for message in sent] == ["websocket.close"]


class _Plain:
    async def echo(self, **params: Any) -> Any:
        return params
