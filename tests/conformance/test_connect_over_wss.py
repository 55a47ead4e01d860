"""``connect`` over ``wss://`` in every SDK that dials the gateway, against certificates
made here (trustme, and a self-signed one): the plugin trusts a private CA the way its
runtime reads extra roots, and refuses every gateway it cannot verify before it sends
anything.

Each runtime is given the test CA through the standard variable it honours
(``EXTRA_ROOTS``): ``SSL_CERT_FILE`` for OpenSSL (Python's ``ssl``, which aiohttp's default
context uses), for Go's ``crypto/x509`` on Linux and for ``rustls-native-certs`` (each
reads that file in place of the system's bundle; ``SSL_CERT_DIR`` names directories
alike), and ``NODE_EXTRA_CA_CERTS`` for Node (added to Node's own bundled roots; Node
reads no ``SSL_CERT_FILE`` unless started with ``--use-openssl-ca``).

* Trusting the CA, the plugin dials a real gateway (``GatewayServer`` with TLS on
  127.0.0.1) at ``wss://localhost:PORT`` and answers a call made through the dispatcher;
  stopped, it goes away and the gateway lets it go without an error.
* A gateway whose certificate it cannot verify (self-signed, of another CA, for another
  host name, expired) is a TLS server recording each connection: its handshake never
  completes (the plugin aborts it), so no byte of the upgrade, and so no token, reaches
  it. The plugin prints a line saying which certificate check failed and where (the URL
  masked, no token, no stack trace) and dials again with backoff, as for any gateway it
  cannot reach (docs/protocol.md, "WebSocket binding").

Before, the Python SDK's line named only the exception's class
(``ClientConnectorCertificateError``), never why the certificate was refused; the Rust
SDK's named rustls's variant (``invalid peer certificate: UnknownIssuer``); and the
gateway's closing task failed (``AttributeError`` in ``providers.websocket.closing``, a
traceback in its log) as a plugin that answers a close at once (Go's, Rust's) left.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import re
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dispatcher import Dispatcher
from dispatcher.gateway import GatewayServer, GatewaySettings
from tests.conformance.conftest import (
    INBOUND_TOKEN,
    LANGUAGES,
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _manifest,
    _stop_service,
)
from tests.conformance.test_connect_url_never_shows_a_token import connecting
from tests.conformance.test_serve_cli import CRASHES
from tests.services import CLEAN_ENVIRONMENT

DIALLING = [language for language in LANGUAGES if "inbound" in WEBSOCKET_MODES.get(language, ())]
#: The standard variable through which each SDK's runtime takes roots beyond its own.
EXTRA_ROOTS = {
    "python": "SSL_CERT_FILE",
    "go": "SSL_CERT_FILE",
    "rust": "SSL_CERT_FILE",
    "java": "SSL_CERT_FILE",  # read by the SDK itself (ConnectTls): the JDK does not
    "typescript": "NODE_EXTRA_CA_CERTS",
}
#: What of the outer environment would decide trust instead of the test (this machine sets
#: SSL_CERT_FILE and NODE_EXTRA_CA_CERTS to the system's bundle), or carry a token.
LEFT_OUT = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
    "LINCHKIT_PLUGIN_TOKEN",
    "LINCHKIT_PLUGIN_TOKEN_FILE",
)
PATH = "/v1/plugins/connect"
#: A credential in the URL's query: no line may show it (the token header neither).
URL_SECRET = "q" + secrets.token_hex(12)
#: How each SDK's line says why the certificate was refused, in its runtime's words
#: (OpenSSL, Go's crypto/x509, rustls, Node): the line must say which check failed.
#: Words, not an enum's name (rustls's ``UnknownIssuer``).
REASONS = {
    "self-signed": r"self[- ]signed|unknown (authority|issuer)|unable to get local issuer",
    "another CA": r"unknown (authority|issuer)|unable to get local issuer|unable to verify",
    "another host name": r"hostname|host name|valid for|NotValidForName|altnames|doesn't match",
    "expired": r"expired",
}


def _environment(language: str, ca_file: Path, token: str) -> dict[str, str]:
    clean = {k: v for k, v in CLEAN_ENVIRONMENT.items() if k not in LEFT_OUT}
    return {**clean, EXTRA_ROOTS[language]: str(ca_file), "LINCHKIT_PLUGIN_TOKEN": token}


def _self_signed(folder: Path, host: str) -> tuple[Path, Path]:
    """A certificate for ``host`` signed by its own key (no CA anyone trusts)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "self-signed.pem", folder / "self-signed.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def written(folder: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    """``leaf``'s certificate chain and key, as PEM files ``name``.pem and ``name``.key."""
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_path.write_bytes(leaf.private_key_pem.bytes())
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The CA the plugins trust (its file), the gateway's good pair and the bad ones."""
    folder = tmp_path_factory.mktemp("wss-pki")
    trusted, stranger = trustme.CA(), trustme.CA()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(trusted.cert_pem.bytes())
    return {
        "ca_file": ca_file,
        "good": written(folder, "good", trusted.issue_cert("localhost", "127.0.0.1")),
        "self-signed": _self_signed(folder, "localhost"),
        "another CA": written(folder, "stranger", stranger.issue_cert("localhost")),
        "another host name": written(
            folder, "elsewhere", trusted.issue_cert("gateway.elsewhere.example")
        ),
        "expired": written(
            folder,
            "expired",
            trusted.issue_cert(
                "localhost", not_before=past - datetime.timedelta(days=1), not_after=past
            ),
        ),
    }


@pytest.mark.parametrize("language", DIALLING)
async def test_trusting_the_ca_it_connects_over_wss_and_answers_a_call(
    language: str, pki: dict[str, Any]
) -> None:
    cert, key = pki["good"]
    settings = GatewaySettings(port=0, tls_cert=cert, tls_key=key, header_timeout=5.0)
    target = {"provider": "websocket", "mode": "inbound", "token": INBOUND_TOKEN}
    async with (
        Dispatcher(_manifest(target)) as dispatcher,
        GatewayServer(dispatcher, settings) as server,
    ):
        port = server.url.rsplit(":", 1)[1]
        url = f"wss://localhost:{port}{PATH}"
        config = orjson.dumps({"region": "eu"}).decode()
        environment = _environment(language, pki["ca_file"], INBOUND_TOKEN)
        async with connecting(language, url, "--config", config, env=environment) as running:
            manifest_target: Any = dispatcher.manifest.plugins[0].target
            assert dispatcher.fleets is not None
            fleet = dispatcher.fleets.fleets[manifest_target.key]
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    while not [each for each in fleet.instances if not each.leaving]:
                        if running.process.returncode is not None:
                            break
                        await asyncio.sleep(0.05)
            except TimeoutError:
                pass
            joined = [each for each in fleet.instances if not each.leaving]
            assert joined, f"connect did not join over wss://:\n{running.said()}"
            params = {"text": "over wss", "n": [1, 2, 3]}
            assert await dispatcher.call("example", "echo", params) == params
            assert await dispatcher.call("example", "config", {}) == {"region": "eu"}
            loop = asyncio.get_running_loop()
            errors: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _, context: errors.append(context))
            try:
                await _stop_service(running.process)  # goaway, then the gateway closes
                provider: Any = dispatcher.providers["websocket"]
                async with asyncio.timeout(START_TIMEOUT):
                    while list(provider.inbound.all()):  # noqa: ASYNC110 - the provider's
                        await asyncio.sleep(0.05)
                gc.collect()  # a task that failed unawaited is reported as it is collected
                await asyncio.sleep(0)
            finally:
                loop.set_exception_handler(None)
            assert not errors, [str(each.get("exception") or each) for each in errors]


@dataclass
class Dial:
    """One connection the recording server accepted."""

    #: "completed", or why the server's side of the handshake failed.
    handshake: str = ""
    #: What arrived after a completed handshake (the upgrade request, its token).
    sent: bytes = b""


@dataclass
class RecordingTlsServer:
    """A TLS server on 127.0.0.1 presenting ``cert``: it answers nothing, and records for
    each connection whether the TLS handshake completed and what came after it."""

    cert: Path
    key: Path
    dials: list[Dial] = field(default_factory=list)
    #: The connections being served, each ended on the way out.
    serving: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, client: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        task.add_done_callback(self.serving.discard)
        dial = Dial()
        self.dials.append(dial)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        try:
            await writer.start_tls(context, ssl_handshake_timeout=START_TIMEOUT)
            dial.handshake = "completed"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while chunk := await client.read(65536):
                        dial.sent += chunk
        except (OSError, TimeoutError) as error:  # ssl.SSLError is an OSError
            dial.handshake = dial.handshake or f"{type(error).__name__}: {error}"
        finally:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def _recording_gateway(
    cert: Path, key: Path
) -> AsyncIterator[tuple[int, RecordingTlsServer]]:
    recorder = RecordingTlsServer(cert, key)
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], recorder
    finally:
        server.close()
        for task in list(recorder.serving):
            task.cancel()
        await asyncio.gather(*recorder.serving, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await server.wait_closed()


@pytest.mark.parametrize("certificate", list(REASONS))
@pytest.mark.parametrize("language", DIALLING)
async def test_a_gateway_it_cannot_verify_never_gets_its_token(
    language: str, certificate: str, pki: dict[str, Any]
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    reason = re.compile(REASONS[certificate], re.IGNORECASE)
    async with _recording_gateway(*pki[certificate]) as (port, recorder):
        host = f"localhost:{port}"
        url = f"wss://{host}{PATH}?token={URL_SECRET}"
        environment = _environment(language, pki["ca_file"], token)
        async with connecting(language, url, "--config", "{}", env=environment) as running:

            def refused_twice() -> bool:
                said = any("certificate" in line.lower() for line in running.stderr)
                return (len(recorder.dials) >= 2 and said) or running.closed == 2

            # Bounded: a slow start on a busy machine, then a second dial (backoff).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(START_TIMEOUT):
                    while not refused_twice():  # noqa: ASYNC110 - the recorder's and the process's
                        await asyncio.sleep(0.05)
            ended = running.process.returncode
    text = running.said()
    completed = [dial for dial in recorder.dials if dial.handshake == "completed"]
    assert not completed, f"a handshake completed with a {certificate} certificate:\n{text}"
    assert not any(dial.sent for dial in recorder.dials), recorder.dials
    assert len(recorder.dials) >= 2, f"dialled {len(recorder.dials)} time(s):\n{text}"
    assert ended is None, f"connect ended ({ended}) instead of dialling again:\n{text}"
    assert token not in text and URL_SECRET not in text, text
    assert not any(crash in text for crash in CRASHES), text
    assert running.stdout == [], text
    lines = [line.strip() for line in running.stderr if reason.search(line)]
    assert lines, f"no line says why the {certificate} certificate was refused:\n{text}"
    assert "certificate" in lines[0].lower(), lines[0]
    assert f":{port}" in lines[0], f"the line does not name the gateway: {lines[0]}"
