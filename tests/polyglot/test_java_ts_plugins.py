"""Smoke test of the TypeScript and Java example plugins as gRPC services.

Each plugin is built by its own ``sdk/<lang>/build.sh`` (a no-op when up to date; ``make
test`` runs both first), started with ``serve --address 127.0.0.1:0``, and called with a
raw grpcio client: Describe, health, the lifecycle, Call, CallBatch, CallStream, Events.
The messages are compiled from ``proto/plugin.proto`` at test time into a private
descriptor pool, so they cannot clash with generated modules of the same proto that other
tests import into protobuf's default pool.

Subprocess mode (handshake environment, AutoMTLS on a Unix socket, exit on stdin EOF) is
checked by the TypeScript SDK's node:test harness, pointed at each plugin in turn: it
makes the host's one-time client certificate with the SDK's own code, which Python could
only do with a package the project does not otherwise need. The full conformance suite
(``tests/conformance/``) runs the same plugins as subprocess plugins from the Python host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "linchkit.plugin.v1.PluginService"
BUILD_TIMEOUT = 1200  # a cold Maven build downloads a few hundred artifacts
START_TIMEOUT = 30

# The one RPC of grpc.health.v1 this test uses, so no other package is needed for it.
HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
"""

LANGUAGES = {
    # language: the toolchain commands its build needs
    "typescript": ("node", "npm"),
    "java": ("java", "mvn"),
}


class Messages:
    """The message classes of plugin.proto and health.proto, from a private pool."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "health.proto").write_text(HEALTH_PROTO)
        descriptor_set = workdir / "protos.pb"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT / 'proto'}",
                f"-I{workdir}",
                f"--descriptor_set_out={descriptor_set}",
                "plugin.proto",
                "health.proto",
            ]
        )
        assert status == 0, "protoc could not compile proto/plugin.proto"
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
        self.pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            self.pool.Add(file)

    def __getattr__(self, name: str) -> Any:
        package = "grpc.health.v1" if name.startswith("HealthCheck") else "linchkit.plugin.v1"
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(f"{package}.{name}"))


@pytest.fixture(scope="module")
def messages(tmp_path_factory: pytest.TempPathFactory) -> Messages:
    return Messages(tmp_path_factory.mktemp("protos"))


@dataclass
class Client:
    """Raw stubs of PluginService and grpc.health.v1.Health on one channel."""

    channel: grpc.Channel
    m: Messages

    def _unary(self, service: str, method: str, reply: str) -> Callable[..., Any]:
        return self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=getattr(self.m, reply).FromString,
        )

    def describe(self) -> Any:
        return self._unary(SERVICE, "Describe", "PluginInfo")(self.m.DescribeRequest(), timeout=10)

    def lifecycle(self, method: str, **fields: Any) -> None:
        request = self.m.InitRequest(**fields) if method == "Init" else self.m.LifecycleRequest()
        self._unary(SERVICE, method, "LifecycleReply")(request, timeout=10)

    def health(self, service: str) -> int:
        check = self._unary("grpc.health.v1.Health", "Check", "HealthCheckResponse")
        return int(check(self.m.HealthCheckRequest(service=service), timeout=10).status)

    def request(self, method: str, params: Any, deadline_ms: int = 0) -> Any:
        context = self.m.CallContext(
            request_id=f"test-{method}", caller="pytest", deadline_ms=deadline_ms
        )
        return self.m.CallRequest(
            v=1,
            plugin="example",
            method=method,
            params_json=json.dumps(params).encode(),
            context=context,
        )

    def call(self, method: str, params: Any, deadline_ms: int = 0, timeout: float = 10) -> Any:
        unary = self._unary(SERVICE, "Call", "CallReply")
        return unary(self.request(method, params, deadline_ms), timeout=timeout)

    def result(self, method: str, params: Any) -> Any:
        reply = self.call(method, params)
        assert reply.ok, f"{method} failed: {reply.error.type}: {reply.error.message}"
        return json.loads(reply.result_json)

    def batch(self, calls: list[tuple[str, Any]]) -> Any:
        unary = self._unary(SERVICE, "CallBatch", "BatchReply")
        requests = [self.request(method, params) for method, params in calls]
        return unary(self.m.BatchRequest(calls=requests), timeout=10)

    def stream(self, method: str, params: Any) -> list[Any]:
        call = self.channel.unary_stream(
            f"/{SERVICE}/CallStream",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=self.m.StreamItem.FromString,
        )
        return list(call(self.request(method, params), timeout=10))

    def events(self, host_events: Iterator[Any]) -> Any:
        call = self.channel.stream_stream(
            f"/{SERVICE}/Events",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=self.m.PluginEvent.FromString,
        )
        return call(host_events, timeout=10)


def build(language: str) -> Path:
    missing = [tool for tool in LANGUAGES[language] if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the {language} toolchain is not installed ({', '.join(missing)} missing)")
    script = ROOT / "sdk" / language / "build.sh"
    done = subprocess.run(
        [str(script)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if done.returncode != 0:
        pytest.fail(
            f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return ROOT / "sdk" / language / "dist" / "example-plugin"


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The handshake line, or a failure that shows the plugin's stderr."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            process.communicate()
            pytest.fail(f"no handshake line within {timeout}s (the plugin's stderr is above)")
    return process.stdout.readline().decode()


def launch(executable: Path) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(
        [str(executable), "serve", "--address", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,  # to the test's own stderr, which pytest captures and shows on failure
    )
    line = read_line(process, START_TIMEOUT).strip()
    core, app, network, address, protocol, cert = line.split("|")
    assert (core, app, network, protocol, cert) == ("1", "1", "tcp", "grpc", ""), line
    assert address.startswith("127.0.0.1:"), line
    return process, address


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as the host's last polite word; the exit status."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module", params=sorted(LANGUAGES))
def plugin(request: pytest.FixtureRequest, messages: Messages) -> Iterator[tuple[str, Client]]:
    """A running example plugin and a client; initialised with a config and started."""
    language: str = request.param
    process, address = launch(build(language))
    channel = grpc.insecure_channel(address)
    client = Client(channel, messages)
    try:
        # Service mode serves health from the start, before the lifecycle.
        assert client.health("") == 1
        client.lifecycle("Init", config_json=json.dumps({"greeting": "hi", "n": 2}).encode())
        client.lifecycle("Start")
        yield language, client
    finally:
        channel.close()
        if process.poll() is None:
            stop(process)


def test_describe(plugin: tuple[str, Client]) -> None:
    language, client = plugin
    info = client.describe()
    assert (info.id, info.version, info.runtime, info.protocol_version) == (
        "example",
        "1.0.0",
        language,
        1,
    )
    methods = {method.name: method.streaming for method in info.methods}
    assert methods == {
        "echo": False, "digest": False, "fail": False, "sleep": False,
        "count": True, "emit": False, "config": False, "hooks": False, "non_finite": False,
        "not_unicode": False,
    }  # fmt: skip


def test_health_serving(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    assert client.health("") == 1
    assert client.health(SERVICE) == 1


def test_unary_methods(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    payload = {"text": "hé", "list": [1, 2.5, None, True], "nested": {"a": {}}}
    assert client.result("echo", payload) == payload
    assert client.result("echo", [1, "two"]) == [1, "two"]
    expected = hashlib.sha256(hashlib.sha256(b"abc").digest()).hexdigest()
    assert client.result("digest", {"data": "abc", "rounds": 2}) == expected
    assert client.result("config", {}) == {"greeting": "hi", "n": 2}
    assert client.result("count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert client.result("sleep", {"ms": 20}) == {"slept_ms": 20}


def test_errors(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    failure = client.call("fail", {"message": "boom"})
    assert not failure.ok
    assert (failure.error.type, failure.error.message, failure.error.retryable) == (
        "ExampleFailure",
        "boom",
        False,
    )
    assert client.call("no_such_method", {}).error.type == "method_not_found"
    for method, params in [
        ("count", {}),
        ("count", {"n": "three"}),
        ("digest", {"data": "x", "rounds": 1.5}),
        ("digest", {"rounds": 1}),
        ("sleep", [10]),
    ]:
        reply = client.call(method, params)
        assert (reply.ok, reply.error.type) == (False, "invalid_params"), (method, params)


def test_sleep_gives_up_at_the_deadline(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    started = time.monotonic()
    reply = client.call("sleep", {"ms": 10_000}, deadline_ms=300)
    assert (reply.ok, reply.error.type, reply.error.retryable) == (False, "deadline_exceeded", True)
    assert time.monotonic() - started < 5
    # The gRPC deadline bounds the call as well. Plugin and host see the same instant, so
    # either the plugin's answer or the host's own DEADLINE_EXCEEDED comes first.
    started = time.monotonic()
    try:
        reply = client.call("sleep", {"ms": 10_000}, timeout=0.3)
        outcome = reply.error.type
    except grpc.RpcError as error:
        outcome = error.code()  # type: ignore[attr-defined]
    assert outcome in {"deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED}
    assert time.monotonic() - started < 5


def test_batch_keeps_order_and_isolates_failures(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    reply = client.batch([("echo", 1), ("fail", {"message": "x"}), ("count", {"n": 1})])
    assert [item.ok for item in reply.results] == [True, False, True]
    assert json.loads(reply.results[0].result_json) == 1
    assert reply.results[1].error.type == "ExampleFailure"
    assert json.loads(reply.results[2].result_json) == [{"i": 0}]


def test_call_stream(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    items = client.stream("count", {"n": 5})
    assert [json.loads(item.chunk_json) for item in items] == [{"i": i} for i in range(5)]
    assert client.stream("count", {"n": 0}) == []
    many = client.stream("count", {"n": 20_000})  # past the transport's buffers: flow control
    assert json.loads(many[-1].chunk_json) == {"i": 19_999}
    assert len(many) == 20_000
    (only,) = client.stream("count", {"n": "x"})
    assert only.WhichOneof("item") == "error"
    assert only.error.type == "invalid_params"


def test_events_ping_pong_and_emit(plugin: tuple[str, Client]) -> None:
    _, client = plugin
    m = client.m
    sent = [m.HostEvent(name="ping", data_json=json.dumps({"seq": 7}).encode())]
    answered: list[tuple[str, Any]] = []

    def host_events() -> Iterator[Any]:
        yield from sent
        # Keep the stream open until both events came back, then close our side.
        deadline = time.monotonic() + 8
        while len(answered) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)

    stream = client.events(host_events())
    for event in stream:
        answered.append((event.name, json.loads(event.data_json)))
        if len(answered) == 1:
            assert client.result("emit", {"name": "custom", "data": [1, "a"]}) is True
        if len(answered) == 2:
            break
    stream.cancel()
    assert sorted(answered) == [("custom", [1, "a"]), ("pong", {"seq": 7})]


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_sigterm_stops_the_service_gracefully(language: str) -> None:
    process, _ = launch(build(language))
    started = time.monotonic()
    assert stop(process) == 0
    assert time.monotonic() - started < 8


def test_the_java_plugin_maps_its_class_data_archive_from_anywhere(tmp_path: Path) -> None:
    """The build trains a class-data archive that shortens the JVM's start by about 40 %;
    the JVM maps it only when started with the class path it recorded, and warns when it
    cannot. Until the archive recorded absolute paths, only ``dist/example-plugin`` run
    from ``sdk/java`` used it: a host starting the plugin by any other path (this one: its
    absolute path, from another folder) got the slower start and a warning each time."""
    executable = build("java")
    if not (executable.parent / "example-plugin.jsa").exists():
        pytest.skip("the build made no class-data archive (it says why)")
    process = subprocess.Popen(
        [str(executable), "serve", "--address", "127.0.0.1:0"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    read_line(process, START_TIMEOUT)
    assert stop(process) == 0
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert "[cds" not in stderr and "shared archive" not in stderr, stderr


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_subprocess_mode_with_automtls(language: str) -> None:
    build("typescript")  # the harness; needs node whichever plugin it drives
    executable = build(language)
    harness = ROOT / "sdk" / "typescript" / "dist" / "test" / "subprocess.test.js"
    env = {
        **os.environ,
        "LINCHKIT_EXAMPLE_PLUGIN": str(executable),
        "LINCHKIT_EXAMPLE_RUNTIME": language,
    }
    done = subprocess.run(
        ["node", "--test", str(harness)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert "# fail 0" in done.stdout


def host_certificate(folder: Path) -> tuple[bytes, bytes]:
    """A one-time ECDSA P-256 client certificate for the host, as PEM (key, certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the host certificate here, and it is not installed")
    key, cert = folder / "host.key", folder / "host.pem"
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1"
    extensions = ["basicConstraints=critical,CA:FALSE", "extendedKeyUsage=clientAuth"]
    subprocess.run(
        [*command.split(), "-keyout", str(key), "-out", str(cert), "-subj", "/CN=host"]
        + [argument for extension in extensions for argument in ("-addext", extension)],
        check=True,
        capture_output=True,
    )
    return key.read_bytes(), cert.read_bytes()


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_python_host_over_automtls(language: str, messages: Messages, tmp_path: Path) -> None:
    """A Python host as the dispatcher is one: handshake env, pinned server cert, stdin EOF."""
    executable = build(language)
    key, cert = host_certificate(tmp_path)
    env = {
        **os.environ,
        "LINCHKIT_PLUGIN_MAGIC_COOKIE": "d1spatch3r-pl4g1n",
        "LINCHKIT_PLUGIN_PROTOCOL_VERSIONS": "1",
        "LINCHKIT_PLUGIN_NETWORK": "unix",
        "LINCHKIT_PLUGIN_SOCKET_DIR": str(tmp_path),
        "LINCHKIT_PLUGIN_CLIENT_CERT": cert.decode(),
    }
    process = subprocess.Popen(
        [str(executable)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
    )
    assert process.stdin is not None
    try:
        core, app, network, address, protocol, server_cert = (
            read_line(process, START_TIMEOUT).strip().split("|")
        )
        assert (core, app, network, protocol) == ("1", "1", "unix", "grpc")
        assert Path(address).parent == tmp_path
        assert "=" not in server_cert, "RawStdEncoding: no padding"
        der = base64.b64decode(server_cert + "=" * (-len(server_cert) % 4))
        server_pem = (
            b"-----BEGIN CERTIFICATE-----\n"
            + base64.encodebytes(der)
            + b"-----END CERTIFICATE-----\n"
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=server_pem, private_key=key, certificate_chain=cert
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(f"unix:{address}", credentials, options=options) as channel:
            client = Client(channel, messages)
            assert client.describe().runtime == language
            assert client.health(SERVICE) == 2, "NOT_SERVING before Start"
            client.lifecycle("Init", config_json=b"{}")
            client.lifecycle("Start")
            assert client.health(SERVICE) == 1
            assert client.result("echo", {"over": "mtls"}) == {"over": "mtls"}
        # Parent death: the host's end of stdin closes, the plugin exits by itself.
        process.stdin.close()
        assert process.wait(timeout=10) == 0
        assert not Path(address).exists(), "the plugin removes its socket"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
