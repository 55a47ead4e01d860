"""Smoke test of the Go and Rust example plugins with a raw grpcio client.

Each plugin is built with its own ``sdk/<lang>/build.sh`` (``make test`` has already run
it, so here it takes a second), started for real, and called over gRPC: as a service
(``serve --address 127.0.0.1:0``) and as a subprocess plugin over a Unix socket, plain and
with AutoMTLS, to check the handshake and the parent-death rule (the plugin exits when its
stdin closes).
The full cross-language conformance suite lives in ``tests/conformance/``.

The raw client uses the project's generated code (``linchkit_plugin/_proto``) and nothing
else of the dispatcher, so a failure here points at the plugin, not at a provider.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import select
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from linchkit_plugin._proto import plugin_pb2 as pb
from linchkit_plugin._proto import plugin_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "linchkit.plugin.v1.PluginService"
TOOLCHAINS = {"go": "go", "rust": "cargo"}
STARTUP_TIMEOUT = 20.0


class PluginClient:
    """PluginService over one channel, with JSON in and out."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = plugin_pb2_grpc.PluginServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def request(self, method: str, params: Any = None, *, deadline_ms: int = 0) -> Any:
        return pb.CallRequest(
            v=1, plugin="example", method=method,
            params_json=json.dumps(params).encode(),
            context=pb.CallContext(request_id=f"req-{method}", deadline_ms=deadline_ms),
        )  # fmt: skip

    def call(self, method: str, params: Any = None, *, deadline_ms: int = 0) -> Any:
        """The result, or the CallReply's error message when the call failed."""
        reply = self.stub.Call(self.request(method, params, deadline_ms=deadline_ms), timeout=10)
        return json.loads(reply.result_json) if reply.ok else reply.error

    def health_of(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    fields: list[str]  # the handshake line's


def read_line(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_TIMEOUT)
    if not ready:
        process.kill()
        pytest.fail(f"no handshake line within {STARTUP_TIMEOUT}s")
    line = process.stdout.readline().decode()
    if not line:
        stderr = process.stderr.read().decode() if process.stderr else ""
        pytest.fail(f"plugin exited with {process.wait()} before its handshake: {stderr}")
    return line.rstrip("\n")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe:
            pipe.close()


@pytest.fixture(scope="module", params=["go", "rust"])
def executable(request: pytest.FixtureRequest) -> Path:
    language: str = request.param
    if shutil.which(TOOLCHAINS[language]) is None:
        pytest.skip(f"the {language} toolchain ({TOOLCHAINS[language]}) is not installed")
    sdk = ROOT / "sdk" / language
    # Idempotent and quick once `make test` ran it; its own tests ran there.
    subprocess.run([str(sdk / "build.sh")], check=True, env={**os.environ, "SKIP_TESTS": "1"})
    return sdk / "dist" / "example-plugin"


@pytest.fixture(scope="module")
def service(executable: Path) -> Iterator[Running]:
    process = subprocess.Popen(
        [str(executable), "serve", "--address", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Running(process, read_line(process).split("|"))
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(service: Running) -> Iterator[PluginClient]:
    with grpc.insecure_channel(service.fields[3]) as channel:
        yield PluginClient(channel)


def runtime_of(executable: Path) -> str:
    return executable.parent.parent.name


def test_service_mode_handshake_line(service: Running) -> None:
    core, app, network, address, protocol, cert = service.fields
    assert (core, app, network, protocol, cert) == ("1", "1", "tcp", "grpc", "")
    assert address.startswith("127.0.0.1:")


def test_describe_and_health(client: PluginClient, executable: Path) -> None:
    info = client.stub.Describe(pb.DescribeRequest(), timeout=5)
    assert (info.id, info.version, info.protocol_version) == ("example", "1.0.0", 1)
    assert info.runtime == runtime_of(executable)
    methods = {m.name: m.streaming for m in info.methods}
    assert set(methods) == {
        *("echo", "digest", "fail", "sleep", "count", "emit", "config", "hooks", "non_finite"),
        "not_unicode",
    }
    assert methods["count"] is True
    for name in ("", SERVICE):
        assert client.health_of(name) == health_pb2.HealthCheckResponse.SERVING


def test_methods(client: PluginClient) -> None:
    params = {"text": "hi", "n": [1, 2.5, None], "big": 12345678901234567890, "ü": True}
    assert client.call("echo", params) == params
    expected = b"abc"
    for _ in range(3):
        expected = hashlib.sha256(expected).digest()
    assert client.call("digest", {"data": "abc", "rounds": 3}) == expected.hex()
    assert client.call("sleep", {"ms": 5}) == {"slept_ms": 5}
    assert client.call("count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_errors(client: PluginClient) -> None:
    error = client.call("fail", {"message": "no luck"})
    assert (error.type, error.message, error.retryable) == ("ExampleFailure", "no luck", False)
    assert client.call("nope", {}).type == "method_not_found"
    for method, params in [
        ("count", {}),
        ("digest", {"data": "x", "rounds": "many"}),
        ("digest", {"data": "x", "rounds": 1.5}),
        ("sleep", {"ms": "long"}),
        ("fail", {}),
    ]:
        error = client.call(method, params)
        assert error.type == "invalid_params", (method, params, error)
        assert not error.retryable


def test_sleep_gives_up_at_the_deadline(client: PluginClient) -> None:
    started = time.monotonic()
    error = client.call("sleep", {"ms": 5000}, deadline_ms=100)
    assert error.type == "deadline_exceeded"
    assert error.retryable
    assert time.monotonic() - started < 2


def test_call_stream(client: PluginClient) -> None:
    items = list(client.stub.CallStream(client.request("count", {"n": 4}), timeout=10))
    assert [json.loads(item.chunk_json) for item in items] == [{"i": i} for i in range(4)]
    (item,) = client.stub.CallStream(client.request("count", {}), timeout=10)
    assert item.WhichOneof("item") == "error"
    assert item.error.type == "invalid_params"


def test_call_batch_fails_items_alone(client: PluginClient) -> None:
    batch = pb.BatchRequest(
        calls=[client.request("echo", 1), client.request("fail", {"message": "x"})]
    )
    first, second = client.stub.CallBatch(batch, timeout=10).results
    assert first.ok
    assert json.loads(first.result_json) == 1
    assert not second.ok
    assert second.error.type == "ExampleFailure"


def test_init_config_and_events(client: PluginClient) -> None:
    client.stub.Init(pb.InitRequest(config_json=b'{"region": "eu", "limit": 3}'), timeout=5)
    client.stub.Start(pb.LifecycleRequest(), timeout=5)
    assert client.call("config", {}) == {"region": "eu", "limit": 3}

    outgoing = [pb.HostEvent(name="ping", data_json=b'{"seq": 1}')]
    events = client.stub.Events(iter(outgoing), timeout=10)
    pong = next(events)
    assert (pong.name, json.loads(pong.data_json)) == ("pong", {"seq": 1})
    assert client.call("emit", {"name": "progress", "data": [1, 2]}) is True
    event = next(events)
    assert (event.name, json.loads(event.data_json)) == ("progress", [1, 2])
    events.cancel()


def test_sigterm_stops_the_service(executable: Path) -> None:
    process = subprocess.Popen(
        [str(executable), "serve", "--address", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        read_line(process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        stop(process)


def test_refuses_to_run_without_the_host(executable: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINCHKIT_PLUGIN_")}
    done = subprocess.run(
        [str(executable)], env=env, capture_output=True, timeout=10, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 1
    assert b"dispatcher" in done.stderr


def test_subprocess_mode_over_a_unix_socket(executable: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LINCHKIT_PLUGIN_MAGIC_COOKIE": "d1spatch3r-pl4g1n",
        "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS": "1",
        "LINCHKIT_PLUGIN_NETWORK": "unix",
        "LINCHKIT_PLUGIN_SOCKET_DIR": str(tmp_path),
    }
    env.pop("LINCHKIT_PLUGIN_CLIENT_CERT", None)
    process = subprocess.Popen(
        [str(executable)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        core, app, network, address, protocol, cert = read_line(process).split("|")
        assert (core, app, network, protocol, cert) == ("1", "1", "unix", "grpc", "")
        assert Path(address).parent == tmp_path
        # gRPC's C core sends the socket path as :authority, which a Rust (h2) server
        # refuses as malformed; "localhost" is the convention for Unix sockets.
        options = [("grpc.default_authority", "localhost")]
        with grpc.insecure_channel(f"unix:{address}", options=options) as channel:
            client = PluginClient(channel)
            assert client.health_of(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            client.stub.Start(pb.LifecycleRequest(), timeout=5)
            assert client.health_of(SERVICE) == health_pb2.HealthCheckResponse.SERVING
            assert client.call("echo", [1, "two"]) == [1, "two"]
        # The host "dies": its end of the plugin's stdin closes, and the plugin exits.
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=10) == 0
    finally:
        stop(process)


def make_host_cert(name: str) -> tuple[bytes, bytes]:
    """A host certificate and key (PEM), as the dispatcher makes one per launch."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_subprocess_mode_with_auto_mtls(executable: Path, tmp_path: Path) -> None:
    host_cert, host_key = make_host_cert("host")
    env = {
        **os.environ,
        "LINCHKIT_PLUGIN_MAGIC_COOKIE": "d1spatch3r-pl4g1n",
        "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS": "1",
        "LINCHKIT_PLUGIN_NETWORK": "unix",
        "LINCHKIT_PLUGIN_SOCKET_DIR": str(tmp_path),
        "LINCHKIT_PLUGIN_CLIENT_CERT": host_cert.decode(),
    }
    process = subprocess.Popen(
        [str(executable)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )  # fmt: skip
    try:
        fields = read_line(process).split("|")
        der = base64.b64decode(fields[5] + "=" * (-len(fields[5]) % 4))
        server_pem = ssl.DER_cert_to_PEM_cert(der).encode()
        options = [
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.default_authority", "localhost"),
        ]

        def channel(cert: bytes, key: bytes) -> grpc.Channel:
            credentials = grpc.ssl_channel_credentials(server_pem, key, cert)
            return grpc.secure_channel(f"unix:{fields[3]}", credentials, options=options)

        with channel(host_cert, host_key) as host:
            assert PluginClient(host).call("echo", {"tls": True}) == {"tls": True}
        with channel(*make_host_cert("stranger")) as stranger:
            with pytest.raises(grpc.RpcError) as refused:
                PluginClient(stranger).call("echo", 1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(process)
