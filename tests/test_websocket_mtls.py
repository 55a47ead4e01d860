"""WebSocket plugins over TLS with client certificates, both directions, for real:
certificates made here (trustme), the gateway requiring client certificates, the SDK
dialling in with one, and the dispatcher dialling an SDK server over ``wss://``.

Reverse mode (``docs/protocol.md``, "WebSocket binding"): a plugin whose certificate
names the target's ``principal`` is admitted; no certificate, one of another CA, an
expired one, one whose identity is another plugin's or no one's are refused, at the TLS
handshake (the gateway requires a verified certificate) or with the documented status
before the upgrade (401 no known principal, 403 another principal).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from socket_plugin import SocketPlugin

from dispatcher import Dispatcher, TargetUnavailable
from dispatcher.config import ManifestError, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from linchkit_plugin.host import PluginHost
from linchkit_plugin.ws_protocol import PLUGIN_ID_HEADER, PLUGIN_VERSION_HEADER
from linchkit_plugin.ws_server import Refused, WebSocketPluginServer, dial
from tests.conftest import ROOT

SOCK_SAN = "sock.plugins.test.example"
OTHER_SAN = "other.plugins.test.example"
NOBODY_SAN = "nobody.plugins.test.example"


def write(folder: Path, name: str, blob: bytes) -> Path:
    path = folder / name
    path.write_bytes(blob)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The server's CA and pair, the CA of plugins' client certificates and a stranger CA."""
    folder = tmp_path_factory.mktemp("ws-pki")
    server_ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    return {
        "folder": folder,
        "server_ca": server_ca,
        "client_ca": client_ca,
        "server_ca_path": write(folder, "server-ca.pem", server_ca.cert_pem.bytes()),
        "client_ca_path": write(folder, "client-ca.pem", client_ca.cert_pem.bytes()),
        "server_cert": write(folder, "server.pem", server.cert_chain_pems[0].bytes()),
        "server_key": write(folder, "server.key", server.private_key_pem.bytes()),
        "sock": client_ca.issue_cert(SOCK_SAN, common_name="sock"),
        "other": client_ca.issue_cert(OTHER_SAN, common_name="other"),
        "nobody": client_ca.issue_cert(NOBODY_SAN, common_name="nobody"),
        "stranger": stranger.issue_cert(SOCK_SAN, common_name="sock"),
        "expired": client_ca.issue_cert(
            SOCK_SAN,
            common_name="sock",
            not_before=past - datetime.timedelta(days=1),
            not_after=past,
        ),
    }


def client_context(pki: dict[str, Any], cert: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki["server_ca"].configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    return context


def inbound_manifest(**sock_target: Any) -> Any:
    def entry(plugin_id: str, principal: str) -> dict[str, Any]:
        return {
            "id": plugin_id,
            "version": "1.0.0",
            "target": {"provider": "websocket", "mode": "inbound", "principal": principal},
            "defaults": {"timeout_ms": 5_000},
            "methods": {"echo": {}},
        }

    sock = entry("sock", "sock-plugin")
    sock["target"].update(sock_target)
    return parse_manifest(
        {
            "version": 1,
            "plugins": [sock, entry("other", "other-plugin")],
            "auth": {
                "mtls": [
                    {"san": f"DNS:{SOCK_SAN}", "principal": "sock-plugin"},
                    {"san": f"DNS:{OTHER_SAN}", "principal": "other-plugin"},
                ]
            },
        },
        base_dir=ROOT,
    )


@contextlib.asynccontextmanager
async def tls_gateway(
    pki: dict[str, Any], client_cert: str = "required", **sock_target: Any
) -> AsyncIterator[tuple[Dispatcher, str]]:
    settings = GatewaySettings(
        port=0,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        client_ca=pki["client_ca_path"],
        client_cert=client_cert,  # type: ignore[arg-type]
        header_timeout=5.0,
    )
    async with (
        Dispatcher(inbound_manifest(**sock_target)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
    ):
        url = server.url.replace("https://127.0.0.1", "wss://localhost")
        yield dispatcher, f"{url}/v1/plugins/connect"


def connected(dispatcher: Dispatcher, plugin_id: str = "sock") -> int:
    provider: Any = dispatcher.providers["websocket"]
    return len([c for c in provider.inbound.all() if c.plugin_id == plugin_id])


async def until(condition: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state of other objects, polled
            await asyncio.sleep(0.02)


async def upgrade_status(url: str, context: ssl.SSLContext, plugin_id: str = "sock") -> int:
    """The gateway's answer to one upgrade: its HTTP status (101 when upgraded)."""
    headers = {PLUGIN_ID_HEADER: plugin_id, PLUGIN_VERSION_HEADER: "1.0.0"}
    async with aiohttp.ClientSession() as session:
        try:
            socket = await session.ws_connect(url, headers=headers, ssl=context)
        except aiohttp.WSServerHandshakeError as error:
            return error.status
        await socket.close()
        return 101


async def handshake_refused(url: str, context: ssl.SSLContext) -> None:
    """The TLS layer refuses the connection: no HTTP request is ever answered."""
    with pytest.raises(aiohttp.ClientError) as raised:
        await upgrade_status(url, context)
    assert not isinstance(raised.value, aiohttp.WSServerHandshakeError)


async def test_a_plugin_with_its_certificate_dials_in_and_takes_calls(
    pki: dict[str, Any],
) -> None:
    async with tls_gateway(pki) as (dispatcher, url):
        dialling = asyncio.ensure_future(
            dial(
                PluginHost(SocketPlugin()),
                url,
                plugin_id="sock",
                version="1.0.0",
                ssl=client_context(pki, pki["sock"]),
                initial_backoff=0.02,
                max_backoff=0.2,
            )
        )
        try:
            await until(lambda: connected(dispatcher) == 1)
            target = dispatcher.manifest.plugins[0].target
            assert dispatcher.fleets is not None and target is not None
            fleet = dispatcher.fleets.fleets[target.key]
            await until(lambda: any(not each.leaving for each in fleet.instances))
            assert await dispatcher.call("sock", "echo", {"value": "over mTLS"}) == "over mTLS"
        finally:
            dialling.cancel()
            await asyncio.gather(dialling, return_exceptions=True)


@pytest.mark.parametrize("cert", [None, "stranger", "expired"])
async def test_without_a_certificate_the_gateway_trusts_the_handshake_fails(
    pki: dict[str, Any], cert: str | None
) -> None:
    async with tls_gateway(pki) as (dispatcher, url):
        await handshake_refused(url, client_context(pki, pki[cert] if cert else None))
        assert connected(dispatcher) == 0


@pytest.mark.parametrize("cert", ["stranger", "expired"])
async def test_an_untrusted_certificate_is_refused_even_when_certificates_are_optional(
    pki: dict[str, Any], cert: str
) -> None:
    async with tls_gateway(pki, client_cert="optional") as (dispatcher, url):
        await handshake_refused(url, client_context(pki, pki[cert]))
        # Without one, the plugin is asked for a credential before the upgrade.
        assert await upgrade_status(url, client_context(pki, None)) == 401
        assert connected(dispatcher) == 0


async def test_a_certificate_of_another_plugin_or_of_no_one_is_refused_before_the_upgrade(
    pki: dict[str, Any],
) -> None:
    async with tls_gateway(pki) as (dispatcher, url):
        # other-plugin is a principal of auth, but not the principal of sock's target.
        assert await upgrade_status(url, client_context(pki, pki["other"])) == 403
        # Verified by the CA, but no mtls entry of auth names it: no principal at all.
        assert await upgrade_status(url, client_context(pki, pki["nobody"])) == 401
        # Its own certificate connects as itself, not as another plugin.
        assert await upgrade_status(url, client_context(pki, pki["sock"]), "other") == 403
        assert await upgrade_status(url, client_context(pki, pki["other"]), "other") == 101
        assert connected(dispatcher) == 0


async def test_the_sdk_stops_dialling_when_its_certificate_names_another_plugin(
    pki: dict[str, Any],
) -> None:
    async with tls_gateway(pki) as (_, url):
        with pytest.raises(Refused) as raised:
            async with asyncio.timeout(15):
                await dial(
                    PluginHost(SocketPlugin()),
                    url,
                    plugin_id="sock",
                    version="1.0.0",
                    ssl=client_context(pki, pki["other"]),
                )
        assert raised.value.status == 403


# -- dial mode: the dispatcher dials an SDK server over wss:// with a client certificate ----


@contextlib.asynccontextmanager
async def wss_plugin(pki: dict[str, Any]) -> AsyncIterator[str]:
    """The SDK's WebSocket plugin server behind TLS that requires a client certificate
    of the client CA (the dispatcher's own, here issued by the same CA as plugins')."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    context.load_verify_locations(cafile=str(pki["client_ca_path"]))
    context.verify_mode = ssl.CERT_REQUIRED
    server = WebSocketPluginServer(PluginHost(SocketPlugin()), plugin_id="sock", version="1.0.0")
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        yield f"wss://localhost:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


def dial_manifest(url: str, **tls: Any) -> Any:
    return parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "sock",
                    "version": "1.0.0",
                    "target": {
                        "provider": "websocket",
                        "url": url,
                        "connect_timeout_ms": 2_000,
                        "reconnect_backoff_ms": 20,
                        "reconnect_backoff_max_ms": 200,
                        **tls,
                    },
                    "methods": {"echo": {}},
                }
            ],
        },
        base_dir=ROOT,
    )


@pytest.fixture(scope="module")
def dispatcher_pair(pki: dict[str, Any]) -> dict[str, str]:
    """The dispatcher's own client pair (issued by the client CA) and a stranger's."""
    folder: Path = pki["folder"]
    ours = pki["client_ca"].issue_cert("dispatcher.test.example", common_name="dispatcher")
    theirs = trustme.CA().issue_cert("dispatcher.test.example", common_name="dispatcher")
    return {
        "ca_file": str(pki["server_ca_path"]),
        "cert_file": str(write(folder, "dispatcher.pem", ours.cert_chain_pems[0].bytes())),
        "key_file": str(write(folder, "dispatcher.key", ours.private_key_pem.bytes())),
        "stranger_cert": str(write(folder, "stranger.pem", theirs.cert_chain_pems[0].bytes())),
        "stranger_key": str(write(folder, "stranger.key", theirs.private_key_pem.bytes())),
    }


async def test_the_dispatcher_dials_wss_with_its_client_certificate(
    pki: dict[str, Any], dispatcher_pair: dict[str, str]
) -> None:
    async with wss_plugin(pki) as url:
        tls = {key: dispatcher_pair[key] for key in ("ca_file", "cert_file", "key_file")}
        async with Dispatcher(dial_manifest(url, **tls)) as dispatcher:
            assert await dispatcher.call("sock", "echo", {"value": "wss"}) == "wss"


@pytest.mark.parametrize("which", ["none", "stranger"])
async def test_without_a_certificate_the_plugin_trusts_a_wss_call_fails_typed(
    pki: dict[str, Any], dispatcher_pair: dict[str, str], which: str
) -> None:
    tls: dict[str, str] = {"ca_file": dispatcher_pair["ca_file"]}
    if which == "stranger":
        tls |= {
            "cert_file": dispatcher_pair["stranger_cert"],
            "key_file": dispatcher_pair["stranger_key"],
        }
    async with wss_plugin(pki) as url, Dispatcher(dial_manifest(url, **tls)) as dispatcher:
        with pytest.raises(TargetUnavailable) as raised:
            await dispatcher.call("sock", "echo", {"value": "no"})
        assert "BEGIN" not in raised.value.message  # no key material in the error


async def test_a_plugin_server_of_a_ca_the_dispatcher_does_not_trust_fails_typed(
    pki: dict[str, Any], dispatcher_pair: dict[str, str]
) -> None:
    tls = {key: dispatcher_pair[key] for key in ("cert_file", "key_file")}
    tls["ca_file"] = str(pki["client_ca_path"])  # not the server's CA
    async with wss_plugin(pki) as url, Dispatcher(dial_manifest(url, **tls)) as dispatcher:
        with pytest.raises(TargetUnavailable) as raised:
            await dispatcher.call("sock", "echo", {"value": "no"})
        assert "certificate" in raised.value.message.lower() or "SSL" in raised.value.message


@pytest.mark.parametrize(
    "target",
    [
        {"url": "ws://127.0.0.1:9/", "cert_file": "a.pem", "key_file": "a.key"},
        {"url": "ws://127.0.0.1:9/", "ca_file": "ca.pem"},
        {"mode": "inbound", "principal": "p", "cert_file": "a.pem", "key_file": "a.key"},
    ],
)
def test_tls_files_where_no_tls_is_dialled_are_refused_at_load(target: dict[str, Any]) -> None:
    """A client certificate on a ws:// URL would be silently not sent: the connection
    would go in clear text while the manifest reads as mutual TLS."""
    with pytest.raises(ManifestError) as raised:
        parse_manifest(
            {
                "version": 1,
                "plugins": [
                    {
                        "id": "sock",
                        "version": "1.0.0",
                        "target": {"provider": "websocket", **target},
                        "methods": {"echo": {}},
                    }
                ],
            },
            base_dir=ROOT,
        )
    assert "wss://" in str(raised.value)


async def test_the_sdk_command_line_logs_in_with_its_client_certificate(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    """``dispatcher-plugin connect --cert-file --key-file --ca-file``, as a process."""
    plugins_dir = str(ROOT / "tests" / "plugins")
    cert = write(tmp_path, "sock.pem", pki["sock"].cert_chain_pems[0].bytes())
    key = write(tmp_path, "sock.key", pki["sock"].private_key_pem.bytes())

    async def connect(*tls: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
            "--url", url, "--id", "sock", "--version", "1.0.0", "--path", plugins_dir, *tls,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async with tls_gateway(pki) as (dispatcher, url):
        process = await connect(
            "--ca-file",
            str(pki["server_ca_path"]),
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        )
        try:
            await until(lambda: connected(dispatcher) == 1, timeout=30)
        finally:
            process.terminate()
            await process.wait()
        # Half a pair, or a pair on a ws:// URL, is refused at once, quoting no file.
        for tls in (("--cert-file", str(cert)), ("--ca-file", str(pki["server_ca_path"]))):
            if tls[0] == "--ca-file":
                url = url.replace("wss://", "ws://")
            refused = await connect(*tls)
            _, stderr = await asyncio.wait_for(refused.communicate(), 30)
            assert refused.returncode == 2, stderr
            assert b"BEGIN" not in stderr and b"Traceback" not in stderr


def test_the_sdk_command_line_names_a_key_it_cannot_use_and_shows_none_of_it(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    """``dispatcher-plugin connect`` reads its files before it dials: a key that is no key
    names the option (or the variable) and the file, never a byte of it. Before, it said
    ``[SSL] PEM lib (_ssl.c:3905)`` or ``[Errno 2] No such file or directory``."""
    plugins_dir = str(ROOT / "tests" / "plugins")
    cert = write(tmp_path, "sock.pem", pki["sock"].cert_chain_pems[0].bytes())
    key_text = pki["sock"].private_key_pem.bytes()
    broken = write(tmp_path, "broken.key", key_text.replace(b"\n", b"\n#", 2))
    url = "wss://127.0.0.1:9/v1/plugins/connect"

    def connect(*tls: str, **variables: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "linchkit_plugin.cli", "connect", "socket_plugin:SocketPlugin",
             "--url", url, "--id", "sock", "--version", "1.0.0", "--path", plugins_dir, *tls],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, **variables},
        )  # fmt: skip
        said = done.stdout + done.stderr
        assert "BEGIN" not in said and "Traceback" not in said, said
        assert not any(line in said for line in key_text.decode().splitlines()[1:-1]), said
        return done.returncode, said.strip()

    assert connect("--cert-file", str(cert), "--key-file", str(broken)) == (
        2,
        f"connect: --key-file: {broken} holds no unencrypted PEM private key",
    )
    assert connect("--cert-file", str(cert), "--key-file", str(tmp_path / "none.key")) == (
        2,
        f"connect: --key-file: cannot read {tmp_path / 'none.key'}: no such file or directory",
    )
    assert connect("--cert-file", str(cert), LINCHKIT_PLUGIN_CLIENT_KEY=key_text.decode()) == (
        2,
        "connect: LINCHKIT_PLUGIN_CLIENT_KEY: the value is PEM text, not a file's path: write it"
        " to a file and give that file's path",
    )
