"""mTLS towards HTTP targets, end to end: the example plugin behind the real
``dispatcher-plugin serve --tls-cert --tls-key --client-ca`` in its own process, the
dispatcher's ``http`` target with ``tls: {ca_file, cert_file, key_file}`` (paths relative
to the manifest), certificates made here by trustme.

What must hold: with its client certificate the call succeeds; without it, with one from
another CA, against an expired server certificate or one of a CA we do not trust, the
call fails as a typed ``TargetUnavailable`` whose message says what TLS refused; a client
certificate rotated on disk is used by new connections without a restart; the key's
contents never show."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from dispatcher import (
    Dispatcher,
    ManifestError,
    ProviderError,
    TargetUnavailable,
    parse_manifest,
)
from providers.tls import ClientTls, ClientTlsContext
from tests.conftest import ROOT


def write(folder: Path, name: str, blob: bytes) -> Path:
    """Written aside, then renamed: how a secret mount or cert-manager swaps files."""
    path = folder / name
    spare = folder / f".{name}.new"
    spare.write_bytes(blob)
    spare.replace(path)
    return path


def write_leaf(folder: Path, stem: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert = write(folder, f"{stem}.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key = write(folder, f"{stem}.key", leaf.private_key_pem.bytes())
    return cert, key


class PluginServer:
    """``dispatcher-plugin serve`` over HTTPS requiring client certificates (port 0)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN")}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "linchkit_plugin.cli",
                "serve",
                "echo_plugin:EchoPlugin",
                "--path",
                str(ROOT / "examples" / "python"),
                "--port",
                "0",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--client-ca",
                str(client_ca),
            ],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        self.url = ""
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            found = re.search(r"listening on (https://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.stop()
            pytest.fail("dispatcher-plugin serve --tls-cert did not come up")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A server CA, a client CA, a stranger CA; the server's pair; our client pair."""
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    server_cert, server_key = write_leaf(folder, "server", server_ca.issue_cert("127.0.0.1"))
    client_ca_path = write(folder, "client-ca.pem", client_ca.cert_pem.bytes())
    return {
        "folder": folder,
        "server_ca": server_ca,
        "client_ca": client_ca,
        "stranger": stranger,
        "server_ca_path": write(folder, "server-ca.pem", server_ca.cert_pem.bytes()),
        "server": (server_cert, server_key),
        "client_ca_path": client_ca_path,
    }


@pytest.fixture(scope="module")
def plugin_server(pki: dict[str, Any]) -> Iterator[PluginServer]:
    server = PluginServer(*pki["server"], pki["client_ca_path"])
    try:
        yield server
    finally:
        server.stop()


def http_manifest(url: str, tls: dict[str, Any] | None, base_dir: Path) -> Any:
    target: dict[str, Any] = {"provider": "http", "url": url, "batch": False}
    if tls is not None:
        target["tls"] = tls
    plugin = {"id": "echo", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    return parse_manifest({"version": 1, "plugins": [plugin]}, base_dir=base_dir)


async def say(manifest: Any) -> Any:
    async with Dispatcher(manifest) as dispatcher:
        return await dispatcher.call("echo", "say", {"text": "hi"}, timeout=10)


async def test_with_its_client_certificate_the_call_succeeds_paths_from_the_manifest(
    pki: dict[str, Any], plugin_server: PluginServer, tmp_path: Path
) -> None:
    write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("dispatcher.example"))
    write(tmp_path, "ca.pem", pki["server_ca"].cert_pem.bytes())
    tls = {"ca_file": "ca.pem", "cert_file": "me.pem", "key_file": "me.key"}
    result = await say(http_manifest(plugin_server.url, tls, tmp_path))
    assert result["text"] == "hi"


async def test_without_a_client_certificate_the_call_fails_typed(
    pki: dict[str, Any], plugin_server: PluginServer
) -> None:
    manifest = http_manifest(
        plugin_server.url, {"ca_file": str(pki["server_ca_path"])}, pki["folder"]
    )
    with pytest.raises(TargetUnavailable) as raised:
        await say(manifest)
    # TLS 1.3: the server judges the certificate after our handshake is done and an
    # asyncio server then hangs up without an alert; the message says what that means.
    assert "we presented none" in raised.value.message
    assert raised.value.details.get("tls") in (
        "closed_without_answer",
        "client_certificate_refused",
    )


async def test_a_client_certificate_of_another_ca_fails_typed(
    pki: dict[str, Any], plugin_server: PluginServer, tmp_path: Path
) -> None:
    cert, key = write_leaf(tmp_path, "stranger", pki["stranger"].issue_cert("intruder.example"))
    tls = {"ca_file": str(pki["server_ca_path"]), "cert_file": str(cert), "key_file": str(key)}
    with pytest.raises(TargetUnavailable) as raised:
        await say(http_manifest(plugin_server.url, tls, tmp_path))
    assert raised.value.details.get("tls") in (
        "closed_without_answer",
        "client_certificate_refused",
    )
    assert "tls.cert_file" in raised.value.message


async def test_a_server_certificate_of_a_ca_we_do_not_trust_fails_before_anything_is_sent(
    pki: dict[str, Any], plugin_server: PluginServer, tmp_path: Path
) -> None:
    cert, key = write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("dispatcher.example"))
    stranger_ca = write(tmp_path, "stranger-ca.pem", pki["stranger"].cert_pem.bytes())
    tls = {"ca_file": str(stranger_ca), "cert_file": str(cert), "key_file": str(key)}
    with pytest.raises(TargetUnavailable) as raised:
        await say(http_manifest(plugin_server.url, tls, tmp_path))
    error = raised.value
    assert error.details.get("stage") == "connect"  # a fleet may try another instance
    assert error.details.get("tls") == "server_certificate"
    assert "does not verify" in error.message and "ca_file" in error.message


async def test_an_expired_server_certificate_fails_typed(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    expired = pki["server_ca"].issue_cert(
        "127.0.0.1", not_before=past - datetime.timedelta(days=1), not_after=past
    )
    server = PluginServer(*write_leaf(tmp_path, "expired", expired), pki["client_ca_path"])
    try:
        cert, key = write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("dispatcher.example"))
        tls = {"ca_file": str(pki["server_ca_path"]), "cert_file": str(cert), "key_file": str(key)}
        with pytest.raises(TargetUnavailable) as raised:
            await say(http_manifest(server.url, tls, tmp_path))
    finally:
        server.stop()
    assert raised.value.details.get("tls") == "server_certificate"
    assert "expired" in raised.value.message


async def test_a_client_certificate_rotated_on_disk_is_used_without_a_restart(
    pki: dict[str, Any], plugin_server: PluginServer, tmp_path: Path
) -> None:
    # First the files hold a certificate the server refuses; the operator rotates them to
    # a good one while the dispatcher runs: new connections present it.
    write_leaf(tmp_path, "me", pki["stranger"].issue_cert("dispatcher.example"))
    tls = {"ca_file": str(pki["server_ca_path"]), "cert_file": "me.pem", "key_file": "me.key"}
    async with Dispatcher(http_manifest(plugin_server.url, tls, tmp_path)) as dispatcher:
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("echo", "say", {"text": "before"}, timeout=10)
        write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("dispatcher.example"))
        deadline = time.monotonic() + 20
        while True:
            try:
                result = await dispatcher.call("echo", "say", {"text": "after"}, timeout=10)
            except TargetUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            else:
                break
    assert result["text"] == "after"


def test_rotation_is_checked_at_most_every_interval_and_a_half_written_pair_is_not_used(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    now = [0.0]
    write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("one.example"))
    tls = ClientTls(cert_file=tmp_path / "me.pem", key_file=tmp_path / "me.key")
    contexts = ClientTlsContext(tls, check_interval=2.0, clock=lambda: now[0])
    first = contexts.current()
    write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("two.example"))
    assert contexts.current() is first  # not looked at before the interval passed
    now[0] = 2.0
    second = contexts.current()
    assert second is not first and contexts.reloads == 1
    # A key written before its certificate: the pair does not match, the old one stays.
    write(tmp_path, "me.key", pki["client_ca"].issue_cert("three.example").private_key_pem.bytes())
    now[0] = 4.0
    assert contexts.current() is second and contexts.reloads == 1
    assert "me.pem" in repr(contexts)


def test_tls_needs_https_both_halves_of_the_pair_and_never_prints_the_key(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ManifestError, match="not https"):
        http_manifest("http://127.0.0.1:1", {"ca_file": "ca.pem"}, tmp_path)
    with pytest.raises(ManifestError, match="go together"):
        http_manifest("https://127.0.0.1:1", {"cert_file": "me.pem"}, tmp_path)
    leaf = pki["client_ca"].issue_cert("secret.example")
    cert, _ = write_leaf(tmp_path, "me", leaf)
    # A key file that is not a key: the error names the file, never what it holds.
    broken = write(tmp_path, "broken.key", b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n")
    manifest = http_manifest(
        "https://127.0.0.1:1", {"cert_file": "me.pem", "key_file": "broken.key"}, tmp_path
    )
    target = manifest.plugins[0].target
    assert str(tmp_path / "broken.key") in repr(target)
    with pytest.raises(ProviderError) as raised:
        ClientTlsContext(target.tls)
    assert "broken.key" in str(raised.value) and "c2VjcmV0" not in str(raised.value)
    assert broken.exists() and cert.exists()


async def test_a_knative_target_presents_its_client_certificate_to_an_https_ingress(
    pki: dict[str, Any], plugin_server: PluginServer, tmp_path: Path
) -> None:
    # The SDK's server stands in for the ingress and the function at once (envelope mode).
    write_leaf(tmp_path, "me", pki["client_ca"].issue_cert("dispatcher.example"))
    write(tmp_path, "ca.pem", pki["server_ca"].cert_pem.bytes())
    target = {
        "provider": "knative",
        "service": "echo",
        "ingress": plugin_server.url,
        "mode": "envelope",
        "tls": {"ca_file": "ca.pem", "cert_file": "me.pem", "key_file": "me.key"},
    }
    plugin = {"id": "echo", "version": "1.0.0", "target": target, "methods": {"say": {}}}
    manifest = parse_manifest({"version": 1, "plugins": [plugin]}, base_dir=tmp_path)
    assert (await say(manifest))["text"] == "hi"
    # Without the certificate: typed, final (not resent as if a revision were activating).
    target["tls"] = {"ca_file": "ca.pem"}
    manifest = parse_manifest({"version": 1, "plugins": [plugin]}, base_dir=tmp_path)
    with pytest.raises(TargetUnavailable) as raised:
        await say(manifest)
    assert "TLS" in raised.value.message
