"""``connect`` with a client certificate (mutual TLS) in every SDK that dials the gateway,
against a real gateway that requires one (``gateway.tls.client_cert: required``) and
certificates made here (trustme).

Every SDK takes the same options, as ``dispatcher-plugin connect`` does: ``--ca-file``
(``LINCHKIT_PLUGIN_GATEWAY_CA``: PEM roots that verify the gateway instead of the
system's), ``--cert-file`` (``LINCHKIT_PLUGIN_CLIENT_CERT``) and ``--key-file``
(``LINCHKIT_PLUGIN_CLIENT_KEY``).

* With a certificate of the CA the gateway trusts, whose name ``auth.mtls`` maps to the
  inbound target's ``principal``, the plugin is admitted and answers a call, the files
  named by flags or by the variables.
* Without one, with one of another CA, or with an expired one, the gateway refuses the
  TLS handshake with the alert that says why (``dispatcher.gateway.tls_alerts``). The
  plugin says so in one line naming the gateway (the URL masked, no token, no stack
  trace, nothing of its key) and dials again with backoff, as for any gateway it cannot
  reach.
* Files it cannot use end it before it dials: half a pair, files on a ``ws://`` URL, a
  file missing, unreadable or a directory, a key that is no key, is encrypted, is another
  certificate's or is PEM text given where a path goes. One line naming the option (or the variable)
  and the file, never a byte of the key.

Before, the Go, Rust and TypeScript SDKs (and the Python example plugin's ``connect``)
refused these options as unknown; Python's ``dispatcher-plugin connect`` said
``[Errno 2] No such file or directory`` or ``[SSL] PEM lib (_ssl.c:3905)`` naming no file.
The Java SDK's ``connect`` (since 2026-12-06) takes them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from dispatcher import Dispatcher, parse_manifest
from dispatcher.gateway import GatewayServer, GatewaySettings
from tests.conformance.conftest import (
    CONFIG,
    LANGUAGES,
    METHODS,
    START_TIMEOUT,
    WEBSOCKET_MODES,
    _stop_service,
    executable,
)
from tests.conformance.test_connect_over_wss import written
from tests.conformance.test_connect_url_never_shows_a_token import connecting
from tests.conformance.test_serve_cli import CRASHES, one_clear_line
from tests.conftest import ROOT
from tests.services import CLEAN_ENVIRONMENT

DIALLING = [language for language in LANGUAGES if "inbound" in WEBSOCKET_MODES.get(language, ())]
PATH = "/v1/plugins/connect"
PLUGIN_SAN = "example.plugins.test"
PRINCIPAL = "example-plugin"
#: What of the outer environment would decide trust or identity instead of the test.
LEFT_OUT = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
    "LINCHKIT_PLUGIN_TOKEN",
    "LINCHKIT_PLUGIN_TOKEN_FILE",
    "LINCHKIT_PLUGIN_GATEWAY_CA",
    "LINCHKIT_PLUGIN_CLIENT_CERT",
    "LINCHKIT_PLUGIN_CLIENT_KEY",
)
ENVIRONMENT = {k: v for k, v in CLEAN_ENVIRONMENT.items() if k not in LEFT_OUT}
#: A credential in the URL's query: no line may show it.
URL_SECRET = "q" + secrets.token_hex(12)
#: What each SDK's line says of a certificate the gateway refused, in the same words.
REFUSALS = {
    "none": r"the gateway requires a client certificate",
    "another CA": r"the gateway does not trust this plugin's client certificate",
    "expired": r"this plugin's client certificate has expired",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The gateway's CA (its file, for ``--ca-file``) and pair, the client CA's file, the
    plugin's pair and those the gateway refuses."""
    folder = tmp_path_factory.mktemp("mtls-pki")
    server_ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    (folder / "gateway-ca.pem").write_bytes(server_ca.cert_pem.bytes())
    (folder / "client-ca.pem").write_bytes(client_ca.cert_pem.bytes())
    return {
        "folder": folder,
        "gateway_ca": folder / "gateway-ca.pem",
        "client_ca": folder / "client-ca.pem",
        "gateway": written(folder, "gateway", server_ca.issue_cert("localhost", "127.0.0.1")),
        "good": written(folder, "good", client_ca.issue_cert(PLUGIN_SAN)),
        "another CA": written(folder, "stranger", stranger.issue_cert(PLUGIN_SAN)),
        "expired": written(
            folder,
            "expired",
            client_ca.issue_cert(
                PLUGIN_SAN, not_before=past - datetime.timedelta(days=1), not_after=past
            ),
        ),
    }


def _key_lines(key: Path) -> list[str]:
    """The base64 lines of a PEM key: none may show in anything the plugin prints."""
    return [line for line in key.read_text().splitlines() if line and "-----" not in line]


def _assert_no_key_material(text: str, *keys: Path) -> None:
    assert "PRIVATE KEY" not in text and "BEGIN" not in text, text
    for key in keys:
        for line in _key_lines(key):
            assert line[:24] not in text, f"a line of {key.name} shows:\n{text}"


@contextlib.asynccontextmanager
async def mtls_gateway(pki: dict[str, Any]) -> AsyncIterator[tuple[Dispatcher, int]]:
    """A gateway on 127.0.0.1 that requires a client certificate of the client CA; the
    example plugin's inbound target admits the principal its certificate maps to."""
    manifest = parse_manifest(
        {
            "version": 1,
            "plugins": [
                {
                    "id": "example",
                    "version": "1.0.0",
                    "config": CONFIG,
                    "target": {"provider": "websocket", "mode": "inbound", "principal": PRINCIPAL},
                    "lifecycle": {"init_timeout_ms": int(START_TIMEOUT * 1000)},
                    "defaults": {"timeout_ms": 10_000},
                    "methods": {name: {} for name in METHODS},
                }
            ],
            "auth": {"mtls": [{"san": f"DNS:{PLUGIN_SAN}", "principal": PRINCIPAL}]},
        },
        base_dir=ROOT,
    )
    cert, key = pki["gateway"]
    settings = GatewaySettings(
        port=0,
        tls_cert=cert,
        tls_key=key,
        client_ca=pki["client_ca"],
        client_cert="required",
        header_timeout=5.0,
    )
    async with Dispatcher(manifest) as dispatcher, GatewayServer(dispatcher, settings) as server:
        yield dispatcher, int(server.url.rsplit(":", 1)[1])


def _tls_settings(how: str, ca: Path, cert: Path, key: Path) -> tuple[list[str], dict[str, str]]:
    """The three files as flags, or as the variables."""
    if how == "flags":
        return ["--ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key)], {}
    return [], {
        "LINCHKIT_PLUGIN_GATEWAY_CA": str(ca),
        "LINCHKIT_PLUGIN_CLIENT_CERT": str(cert),
        "LINCHKIT_PLUGIN_CLIENT_KEY": str(key),
    }


@pytest.mark.parametrize("how", ["flags", "environment"])
@pytest.mark.parametrize("language", DIALLING)
async def test_with_a_certificate_the_gateway_trusts_it_is_admitted_and_answers(
    language: str, how: str, pki: dict[str, Any]
) -> None:
    arguments, variables = _tls_settings(how, pki["gateway_ca"], *pki["good"])
    async with mtls_gateway(pki) as (dispatcher, port):
        url = f"wss://localhost:{port}{PATH}"
        environment = {**ENVIRONMENT, **variables}
        config = ("--config", orjson.dumps(CONFIG).decode())  # the plugin runs its own init
        async with connecting(language, url, *arguments, *config, env=environment) as running:
            target: Any = dispatcher.manifest.plugins[0].target
            assert dispatcher.fleets is not None
            fleet = dispatcher.fleets.fleets[target.key]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(START_TIMEOUT):
                    while not [each for each in fleet.instances if not each.leaving]:
                        if running.process.returncode is not None:
                            break
                        await asyncio.sleep(0.05)
            joined = [each for each in fleet.instances if not each.leaving]
            assert joined, f"connect was not admitted with its certificate:\n{running.said()}"
            params = {"text": "over mutual TLS", "n": [1, 2, 3]}
            assert await dispatcher.call("example", "echo", params) == params
            assert await dispatcher.call("example", "config", {}) == CONFIG
            await _stop_service(running.process)
    _assert_no_key_material(running.said(), pki["good"][1])


@pytest.mark.parametrize("certificate", list(REFUSALS))
@pytest.mark.parametrize("language", DIALLING)
async def test_a_certificate_the_gateway_refuses_is_said_in_one_line_and_dialled_again(
    language: str, certificate: str, pki: dict[str, Any]
) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    reason = re.compile(REFUSALS[certificate])
    arguments = ["--ca-file", str(pki["gateway_ca"])]
    keys: list[Path] = []
    if certificate != "none":
        cert, key = pki[certificate]
        arguments += ["--cert-file", str(cert), "--key-file", str(key)]
        keys.append(key)
    async with mtls_gateway(pki) as (dispatcher, port):
        url = f"wss://localhost:{port}{PATH}?token={URL_SECRET}"
        environment = {**ENVIRONMENT, "LINCHKIT_PLUGIN_TOKEN": token}
        async with connecting(language, url, *arguments, env=environment) as running:

            def said_twice() -> bool:
                lines = [line for line in running.stderr if reason.search(line)]
                return len(lines) >= 2 or running.closed == 2

            # Bounded: a slow start on a busy machine, then a second dial (backoff).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(START_TIMEOUT):
                    while not said_twice():  # noqa: ASYNC110 - the process's lines
                        await asyncio.sleep(0.05)
            ended = running.process.returncode
            provider: Any = dispatcher.providers["websocket"]
            assert not list(provider.inbound.all())
    text = running.said()
    assert ended is None, f"connect ended ({ended}) instead of dialling again:\n{text}"
    assert token not in text and URL_SECRET not in text, text
    assert not any(crash in text for crash in CRASHES), text
    _assert_no_key_material(text, *keys)
    assert running.stdout == [], text
    lines = [line.strip() for line in running.stderr if reason.search(line)]
    assert len(lines) >= 2, f"no two lines say why the gateway refused it:\n{text}"
    assert f"localhost:{port}" in lines[0], f"the line does not name the gateway: {lines[0]}"


def _encrypted_key(key: Path) -> bytes:
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )


#: Where ``FILE_CASES`` name a file this process may not read (``unreadable``).
UNREADABLE = "<unreadable>"
#: A key file whose base64 is not a key: none of it may show.
BROKEN_KEY_MARKER = "BrokenKeyMaterial" + secrets.token_hex(8)

#: (files: the name of each option's file in the folder, or None; the variables'
#: values, "{name}" for a file's path; the words the line must hold; the file it names).
FILE_CASES: dict[str, tuple[dict[str, str], dict[str, str], str, str | None]] = {
    "a certificate without its key": (
        {"--cert-file": "good.pem"},
        {},
        r"--cert-file and --key-file go together",
        None,
    ),
    "a key without its certificate": (
        {},
        {"LINCHKIT_PLUGIN_CLIENT_KEY": "{good.key}"},
        r"--cert-file and --key-file go together",
        None,
    ),
    "a CA file that is missing": (
        {"--ca-file": "missing-ca.pem"},
        {},
        r"--ca-file: cannot read .*: no such file or directory",
        "missing-ca.pem",
    ),
    "a CA file of no certificate": (
        {"--ca-file": "not-pem.txt"},
        {},
        r"--ca-file: .* holds no PEM certificate",
        "not-pem.txt",
    ),
    "a CA file named by the variable, missing": (
        {},
        {"LINCHKIT_PLUGIN_GATEWAY_CA": "{missing-ca.pem}"},
        r"LINCHKIT_PLUGIN_GATEWAY_CA: cannot read .*: no such file or directory",
        "missing-ca.pem",
    ),
    "a certificate file of no certificate": (
        {"--cert-file": "not-pem.txt", "--key-file": "good.key"},
        {},
        r"--cert-file: .* holds no PEM certificate",
        "not-pem.txt",
    ),
    "a key file that is missing": (
        {"--cert-file": "good.pem", "--key-file": "missing.key"},
        {},
        r"--key-file: cannot read .*: no such file or directory",
        "missing.key",
    ),
    "a key file that is a directory": (
        {"--cert-file": "good.pem", "--key-file": "a-folder"},
        {},
        r"--key-file: cannot read .*: is a directory",
        "a-folder",
    ),
    "a key file it may not read": (
        {"--cert-file": "good.pem", "--key-file": UNREADABLE},
        {},
        r"--key-file: cannot read .*: permission denied",
        UNREADABLE,
    ),
    "a key file of broken base64": (
        {"--cert-file": "good.pem", "--key-file": "broken.key"},
        {},
        r"--key-file: .* holds no unencrypted PEM private key",
        "broken.key",
    ),
    "a key file that holds a certificate": (
        {"--cert-file": "good.pem", "--key-file": "good.pem"},
        {},
        r"--key-file: .* holds no unencrypted PEM private key",
        "good.pem",
    ),
    "an encrypted key": (
        {"--cert-file": "good.pem", "--key-file": "encrypted.key"},
        {},
        r"--key-file: .* holds no unencrypted PEM private key",
        "encrypted.key",
    ),
    "the key of another certificate": (
        {"--cert-file": "good.pem", "--key-file": "stranger.key"},
        {},
        r"--key-file: .* is not the private key of the certificate in --cert-file",
        "stranger.key",
    ),
    "a key variable of the key's PEM text": (
        {"--cert-file": "good.pem"},
        {"LINCHKIT_PLUGIN_CLIENT_KEY": "<good.key's text>"},
        r"LINCHKIT_PLUGIN_CLIENT_KEY: .*PEM text, not a file's path",
        None,
    ),
}


@pytest.fixture(scope="module")
def bad_files(pki: dict[str, Any]) -> Path:
    """The folder of the files ``FILE_CASES`` name (the good pair's among them)."""
    folder: Path = pki["folder"]
    (folder / "not-pem.txt").write_text("this is not PEM\n")
    (folder / "a-folder").mkdir(exist_ok=True)
    (folder / "broken.key").write_text(
        f"-----BEGIN PRIVATE KEY-----\n{BROKEN_KEY_MARKER}AAAA\n-----END PRIVATE KEY-----\n"
    )
    (folder / "encrypted.key").write_bytes(_encrypted_key(pki["good"][1]))
    return folder


def _unreadable(folder: Path) -> Path:
    """A file the plugin may not read: one of mode 000, or as root (whom file modes do
    not stop) a write-only sysctl, which the kernel refuses to read even to root."""
    if os.geteuid() != 0:
        path = folder / "unreadable.key"
        path.write_text("not for anyone\n")
        path.chmod(0)
        return path
    path = Path("/proc/sys/vm/compact_memory")
    try:
        path.read_bytes()
    except PermissionError:
        return path
    except OSError:
        pass
    pytest.skip("no file here that root may not read")


@pytest.mark.parametrize("case", list(FILE_CASES))
@pytest.mark.parametrize("language", DIALLING)
def test_tls_files_it_cannot_use_end_it_in_one_line_naming_the_file(
    language: str, case: str, bad_files: Path
) -> None:
    flags, variables, words, named = FILE_CASES[case]
    key_text = (bad_files / "good.key").read_text()

    def path_of(name: str) -> Path:
        return _unreadable(bad_files) if name == UNREADABLE else bad_files / name

    arguments = [item for flag, name in flags.items() for item in (flag, str(path_of(name)))]
    environment = dict(ENVIRONMENT)
    for variable, value in variables.items():
        environment[variable] = (
            key_text if value.startswith("<") else str(bad_files / value.strip("{}"))
        )
    # Nothing listens there: a plugin that dialled would go on dialling (and time out).
    url = "wss://127.0.0.1:9" + PATH
    done = subprocess.run(
        [str(executable(language)), "connect", "--url", url, *arguments],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=environment,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    text = done.stdout + done.stderr
    _assert_no_key_material(text, bad_files / "good.key", bad_files / "stranger.key")
    assert BROKEN_KEY_MARKER not in text, text
    line = one_clear_line(done)
    assert re.search(words, line), f"{case}: {line}"
    if named is not None:
        assert str(path_of(named)) in line, f"{case}: the line names no file: {line}"


@pytest.mark.parametrize("language", DIALLING)
def test_tls_files_on_a_ws_url_end_it_in_one_line(language: str, pki: dict[str, Any]) -> None:
    """A client certificate on ``ws://`` would not be sent: the plugin would believe it
    logged in with one over a connection in clear text."""
    cert, key = pki["good"]
    done = subprocess.run(
        [str(executable(language)), "connect", "--url", "ws://127.0.0.1:9" + PATH,
         "--cert-file", str(cert), "--key-file", str(key)],
        capture_output=True, text=True, timeout=START_TIMEOUT, env=ENVIRONMENT,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    line = one_clear_line(done)
    assert "--ca-file, --cert-file and --key-file need a wss:// --url" in line, line
