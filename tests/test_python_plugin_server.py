"""The Python SDK's plugin executable keeps the plugin side of the protocol on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from linchkit_plugin._automtls import der_from_handshake
from tests.conftest import ROOT

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
