"""The manifest's ``gateway:`` section: its checks, how it maps onto ``GatewaySettings``,
and ``dispatcher serve`` reading it, with the command line's options winning."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import grpc.aio
import orjson
import pytest
import yaml

from dispatcher import ManifestError, parse_manifest
from dispatcher.gateway import GatewaySettings
from linchkit_plugin._proto import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ROOT
from tests.gateway_support import echo_entry


def with_gateway(gateway: dict[str, object], base_dir: Path) -> object:
    return parse_manifest(
        {"version": 1, "plugins": [echo_entry()], "gateway": gateway}, base_dir=base_dir
    )


def test_the_section_maps_onto_settings_and_given_options_win(tmp_path: Path) -> None:
    manifest = with_gateway(
        {
            "host": "0.0.0.0",
            "port": 8443,
            "grpc_port": 9443,
            "tls": {"cert": "tls/gw.pem", "key": "tls/gw.key", "client_ca": "tls/ca.pem"},
            "max_body_bytes": 4096,
            "timeouts": {
                "body_ms": 1500,
                "header_ms": 2500,
                "keep_alive_ms": 4000,
                "heartbeat_ms": 3000,
            },
            "grace_ms": 7000,
            "call_lane": False,
            "max_grpc_calls": 64,
            "max_connections": 300,
            "max_connections_per_peer": 30,
            "max_timeout_ms": 300_000,
        },
        tmp_path,
    )
    settings = GatewaySettings.from_config(manifest.gateway)  # type: ignore[attr-defined]
    assert (settings.host, settings.port, settings.grpc_port) == ("0.0.0.0", 8443, 9443)
    assert settings.tls_cert == tmp_path / "tls" / "gw.pem"  # from the manifest's folder
    assert settings.client_ca == tmp_path / "tls" / "ca.pem"
    assert settings.client_cert == "required"  # a client CA without a word: required
    assert (settings.body_timeout, settings.header_timeout, settings.heartbeat) == (1.5, 2.5, 3.0)
    assert settings.keep_alive_timeout == 4.0
    assert (settings.max_body_bytes, settings.grace) == (4096, 7.0)
    assert settings.call_lane is False
    assert settings.max_grpc_calls == 64
    assert (settings.max_connections, settings.connections_per_peer) == (300, 30)
    assert settings.max_timeout_ms == 300_000
    assert GatewaySettings().max_timeout_ms is None  # unset: a day, what callers had
    overridden = GatewaySettings.from_config(
        manifest.gateway,  # type: ignore[attr-defined]
        port=0,
        client_cert="optional",
    )
    assert (overridden.port, overridden.client_cert, overridden.grpc_port) == (0, "optional", 9443)
    assert GatewaySettings.from_config(None) == GatewaySettings()
    assert GatewaySettings().call_lane is True
    unset = GatewaySettings.from_config(with_gateway({"max_connections": 100}, tmp_path).gateway)  # type: ignore[attr-defined]
    assert unset.connections_per_peer == 25  # a quarter when not said
    assert GatewaySettings().connections_per_peer == 1024


@pytest.mark.parametrize(
    ("gateway", "complaint"),
    [
        ({"tls": {"cert": "a.pem", "key": "a.key", "client_cert": "required"}}, "needs client_ca"),
        (
            {"tls": {"cert": "a.pem", "key": "a.key", "client_ca": "c", "client_cert": "none"}},
            "drop one",
        ),
        ({"tls": {"cert": "a.pem"}}, "key"),
        ({"port": 70000}, "65535"),
        ({"grpc_port": -1}, "grpc_port"),
        ({"timeouts": {"body_ms": 0}}, "body_ms"),
        ({"max_grpc_calls": 0}, "max_grpc_calls"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": "many"}, "max_connections"),
        ({"max_connections": 10**9}, "max_connections"),
        ({"max_connections_per_peer": 0}, "max_connections_per_peer"),
        (
            {"max_connections": 100, "max_connections_per_peer": 101},
            r"max_connections_per_peer \(101\) is above max_connections \(100\)",
        ),
        ({"max_connections_per_peer": 5000}, r"above max_connections \(4096\)"),
        ({"timeouts": {"keep_alive_ms": 0}}, "keep_alive_ms"),
        ({"timeouts": {"keep_alive_ms": 10**12}}, "keep_alive_ms"),
        ({"timeouts": {"keep_alive_ms": "forever"}}, "keep_alive_ms"),
        ({"listen": "everywhere"}, "listen"),
        ({"max_timeout_ms": 0}, "max_timeout_ms"),
        ({"max_timeout_ms": -5}, "max_timeout_ms"),
        ({"max_timeout_ms": 86_400_001}, "max_timeout_ms"),
        ({"max_timeout_ms": 1.5}, "max_timeout_ms"),
        ({"max_timeout_ms": "soon"}, "max_timeout_ms"),
        ({"max_timeout_ms": True}, "max_timeout_ms"),
    ],
)
def test_mistakes_are_named_where_they_are(
    tmp_path: Path, gateway: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ManifestError, match=complaint) as raised:
        with_gateway(gateway, tmp_path)
    assert "gateway" in str(raised.value)


@pytest.mark.parametrize(
    ("limits", "complaint"),
    [
        ({"max_connections": 0}, r"max_connections must be in \[1, 10000000\], not 0"),
        ({"max_connections_per_peer": 0}, "max_connections_per_peer must be in"),
        (
            {"max_connections": 10, "max_connections_per_peer": 11},
            r"max_connections_per_peer \(11\) is above max_connections \(10\)",
        ),
    ],
)
def test_connection_limits_given_in_python_are_checked(
    limits: dict[str, int], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        GatewaySettings(**limits)  # type: ignore[arg-type]


@pytest.mark.parametrize("cap", [0, -1, 86_400_001, 1.5, "300", True])
def test_a_max_timeout_given_in_python_is_checked(cap: object) -> None:
    with pytest.raises(ValueError, match=r"max_timeout_ms must be an integer of milliseconds"):
        GatewaySettings(max_timeout_ms=cap)  # type: ignore[arg-type]


async def test_serve_reads_the_section_and_serves_grpc_beside_http(tmp_path: Path) -> None:
    manifest = tmp_path / "plugins.yaml"
    gateway = {"host": "127.0.0.1", "port": 1, "grpc_port": 0, "max_body_bytes": 64}
    manifest.write_text(
        yaml.safe_dump({"version": 1, "plugins": [echo_entry()], "gateway": gateway})
    )
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-m", str(manifest), "serve", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        http_line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        grpc_line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert http_line.startswith("listening on http://127.0.0.1:"), http_line
        assert not http_line.rstrip().endswith(":1")  # --port 0 won over the manifest's
        assert grpc_line.startswith("grpc listening on 127.0.0.1:"), grpc_line
        url, address = http_line.split()[-1], grpc_line.split()[-1]
        async with aiohttp.ClientSession() as session:
            big = {"text": "x" * 100}  # over the manifest's max_body_bytes
            async with session.post(f"{url}/v1/plugins/echo/methods/say", json=big) as answer:
                assert answer.status == 413
        async with grpc.aio.insecure_channel(address) as channel:
            call = gateway_pb2.GatewayCall(
                plugin="echo", method="say", params_json=orjson.dumps({"text": "hi"})
            )
            reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Call(call, timeout=30)
            assert reply.ok
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
