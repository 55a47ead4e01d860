"""The docker provider against the real engine: lifecycle, crashes, cleanup, containment.

Images are built once per session with the provider's own deployer on the base image
of ``infra/docker/build-base-image.sh`` (both idempotent; the engine is started by
``scripts/start-docker.sh``). Waits poll for a state with a generous bound instead of
sleeping a fixed time, so a slow, shared 2-core machine makes them slower, not flaky.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dispatcher import (
    DeadlineExceeded,
    Dispatcher,
    ManifestError,
    MethodNotFound,
    PluginError,
    ProviderError,
    TargetUnavailable,
    parse_manifest,
)
from providers.docker import LABEL_OWNER, DockerProvider
from tests.conftest import EXAMPLES, LOCAL_TARGET, ROOT, manifest

ECHO_IMAGE = "linchkit-test/echo:1"
# :2 since the plugin learnt ``refuse``, :3 ``hijack``: a run of an older tree rebuilding
# the previous tag meanwhile must not take the method away.
UNRULY_IMAGE = "linchkit-test/unruly:3"
UNRULY_METHODS = (
    "whoami",
    "nap",
    "crash",
    "hog_memory",
    "fork_bomb",
    "write",
    "connect",
    "sandbox",
    "sicken",
    "refuse",
    "hijack",
)


def echo_box(**target: Any) -> dict[str, Any]:
    """The example plugin in a container."""
    return {
        "id": "echo-box",
        "version": "1.0.0",
        "config": {"greeting": "from a container"},
        "target": {
            "provider": "docker",
            "image": ECHO_IMAGE,
            "build": {"context": "examples/python", "entrypoint": "echo_plugin:EchoPlugin"},
            **target,
        },
        "methods": {"say": {}, "digest": {}, "sleep": {}},
    }


def unruly(**target: Any) -> dict[str, Any]:
    """The misbehaving test plugin, with tight limits."""
    return {
        "id": "unruly",
        "version": "1.0.0",
        "defaults": {"timeout_ms": 60_000},
        "target": {
            "provider": "docker",
            "image": UNRULY_IMAGE,
            "limits": {"memory_mb": 96, "pids": 48, "cpus": 0.5},
            "build": {"context": "tests/docker_plugin", "entrypoint": "unruly_plugin:UnrulyPlugin"},
            **target,
        },
        "methods": {name: {} for name in UNRULY_METHODS},
    }


@pytest.fixture(scope="session", autouse=True)
def docker_images() -> None:
    """Start the engine, build the base image and both plugin images (once per session)."""
    subprocess.run([str(ROOT / "scripts" / "start-docker.sh")], check=True)
    subprocess.run(
        [str(ROOT / "infra" / "docker" / "build-base-image.sh")],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.DEVNULL,
    )

    async def deploy() -> None:
        plugins = manifest(echo_box(), unruly()).plugins
        async with DockerProvider() as provider:
            for plugin in plugins:
                await provider.deployer().apply(plugin, plugin.target)

    asyncio.run(deploy())


def containers(owner: str, *, running_only: bool = False) -> list[str]:
    """Ids of the containers labelled with ``owner``, asked of the engine by the CLI."""
    command = ["docker", "ps", "-q", "--no-trunc", "--filter", f"label={LABEL_OWNER}={owner}"]
    if not running_only:
        command.append("-a")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return output.split()


def image_size_mb(tag: str) -> float:
    """The image's size, asked of the engine by the CLI."""
    command = ["docker", "image", "inspect", "-f", "{{.Size}}", tag]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout) / 1e6


def socket_folders(pid: int) -> list[Path]:
    """The docker provider's socket folders made by the dispatcher process ``pid``."""
    return list(Path(tempfile.gettempdir()).glob(f"linchkit-docker-{pid}-*"))


def owner_of(dispatcher: Dispatcher) -> str:
    provider = dispatcher.providers["docker"]
    assert isinstance(provider, DockerProvider)
    return provider.owner


async def eventually(check: Callable[[], bool], *, within: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A TCP listener on the host's loopback, to see whether a container can reach it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    try:
        yield server, server.getsockname()[1]
    finally:
        server.close()


def accepted_any(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


# -- lifecycle ---------------------------------------------------------------------------


async def test_cold_start_then_warm_reuse_then_removed_on_exit() -> None:
    async with Dispatcher(manifest(echo_box())) as dispatcher:
        owner = owner_of(dispatcher)
        assert containers(owner) == [], "nothing runs before the first call"
        first = await dispatcher.call("echo-box", "say", {"text": "hi"}, caller="alice")
        assert first == {"text": "hi", "greeting": "from a container", "caller": "alice"}
        started = containers(owner)
        assert len(started) == 1
        for _ in range(5):
            await dispatcher.call("echo-box", "say", {"text": "again"})
        assert containers(owner) == started, "warm calls reuse the same container"
        (cold,) = dispatcher.stats()["cold_starts"]["docker"].values()
        assert cold["count"] == 1, "only the first call waited for a container to start"
        assert cold["seconds"] > 0
        health = await dispatcher.health()
        assert health[0].health.ok, health
    assert containers(owner) == []


async def test_min_instances_start_with_the_dispatcher() -> None:
    async with Dispatcher(manifest(echo_box(min_instances=2, max_instances=2))) as dispatcher:
        assert len(containers(owner_of(dispatcher), running_only=True)) == 2


async def test_idle_container_is_stopped_and_the_next_call_starts_one() -> None:
    async with Dispatcher(manifest(unruly(idle_timeout_s=0.5))) as dispatcher:
        owner = owner_of(dispatcher)
        first = (await dispatcher.call("unruly", "whoami"))["hostname"]

        def gone() -> bool:
            return not any(container.startswith(first) for container in containers(owner))

        await eventually(gone, what="the idle container is removed")
        second = (await dispatcher.call("unruly", "whoami"))["hostname"]
        assert second != first, "a new container answered"
        (cold,) = dispatcher.stats()["cold_starts"]["docker"].values()
        assert cold["count"] == 2, "the call after the idle stop was cold again"


async def test_idle_stop_keeps_min_instances_on_an_injected_clock() -> None:
    now = [1000.0]
    # A background tick of an hour: only the explicit stop_idle() calls below stop anything.
    provider = DockerProvider(clock=lambda: now[0], reap_interval_s=3600)
    plugins = manifest(unruly(min_instances=1, max_instances=2, concurrency=1, idle_timeout_s=60))
    async with Dispatcher(plugins, providers={"docker": provider}) as dispatcher:
        await asyncio.gather(
            *(dispatcher.call("unruly", "nap", {"seconds": 1.0}) for _ in range(2))
        )
        assert len(containers(provider.owner)) == 2, "the second call started a second one"
        now[0] += 59
        await provider.stop_idle()
        assert len(containers(provider.owner)) == 2, "59 s idle is not 60"
        now[0] += 2
        await provider.stop_idle()
        assert len(containers(provider.owner)) == 1, "idle down to min_instances, no further"


async def test_scales_up_to_max_instances_under_concurrent_calls() -> None:
    plugins = manifest(unruly(concurrency=1, max_instances=3))
    async with Dispatcher(plugins) as dispatcher:
        # Six calls, one per container at a time: exactly three containers start (the
        # waiting calls count the starts already under way), and each call naps long
        # enough that a slow start still gets its share of the calls: 5 s, for under a
        # full run on two cores the third container was seen ready more than 3 s after
        # the first two, and the calls of both rounds had gone to those.
        answers = await asyncio.gather(
            *(dispatcher.call("unruly", "nap", {"seconds": 5.0}) for _ in range(6))
        )
        assert len(containers(owner_of(dispatcher))) == 3
        hosts = {answer["hostname"] for answer in answers}
        assert len(hosts) == 3, answers


async def test_waiting_for_a_busy_container_ends_at_the_deadline() -> None:
    plugins = manifest(unruly(concurrency=1, max_instances=1))
    async with Dispatcher(plugins) as dispatcher:
        await dispatcher.call("unruly", "whoami")
        busy = asyncio.create_task(dispatcher.call("unruly", "nap", {"seconds": 3}))
        await asyncio.sleep(0.2)
        with pytest.raises(DeadlineExceeded, match="no container"):
            await dispatcher.call("unruly", "whoami", timeout=0.5)
        await busy


async def test_crash_fails_the_calls_in_flight_and_the_container_is_replaced() -> None:
    async with Dispatcher(manifest(unruly(min_instances=1))) as dispatcher:
        owner = owner_of(dispatcher)
        [original] = containers(owner)
        in_flight = asyncio.create_task(dispatcher.call("unruly", "nap", {"seconds": 30}))
        await asyncio.sleep(0.3)
        with pytest.raises(TargetUnavailable) as crashed:
            await dispatcher.call("unruly", "crash", {"code": 3})
        assert crashed.value.retryable
        assert crashed.value.details["exit_code"] == 3
        assert "died mid-call" in crashed.value.message
        with pytest.raises(TargetUnavailable):
            await in_flight

        def replaced() -> bool:
            running = containers(owner, running_only=True)
            return len(running) == 1 and running[0] != original

        await eventually(replaced, what="a replacement container runs (min_instances=1)")
        answer = await dispatcher.call("unruly", "whoami")
        assert not original.startswith(answer["hostname"])


async def test_unhealthy_container_is_replaced() -> None:
    plugins = manifest(unruly(min_instances=1, health_interval_s=0.2, unhealthy_after=2))
    async with Dispatcher(plugins) as dispatcher:
        owner = owner_of(dispatcher)
        sick = (await dispatcher.call("unruly", "whoami"))["hostname"]
        await dispatcher.call("unruly", "sicken")

        def replaced() -> bool:
            running = containers(owner, running_only=True)
            return len(running) == 1 and not running[0].startswith(sick)

        await eventually(replaced, what="the container failing /health is replaced")
        assert (await dispatcher.call("unruly", "whoami"))["hostname"] != sick


async def test_container_never_healthy_fails_at_ready_timeout() -> None:
    # The plugin listens somewhere the provider does not look, so /health never answers.
    elsewhere = ["echo_plugin:EchoPlugin", "--path", "/plugin", "--uds", "/tmp/elsewhere.sock"]
    plugins = manifest(echo_box(command=elsewhere, ready_timeout_s=1.5))
    async with Dispatcher(plugins) as dispatcher:
        with pytest.raises(TargetUnavailable, match=r"not healthy within ready_timeout_s=1\.5"):
            await dispatcher.call("echo-box", "say", {"text": "hi"})
        assert containers(owner_of(dispatcher)) == []


async def test_missing_image_is_a_provider_error_naming_deploy() -> None:
    plugins = manifest(echo_box(image="linchkit-test/never-built:0"))
    async with Dispatcher(plugins) as dispatcher:
        with pytest.raises(ProviderError, match="dispatcher deploy"):
            await dispatcher.call("echo-box", "say", {"text": "hi"})
        health = await dispatcher.health()
        assert not health[0].health.ok


async def test_container_that_exits_before_ready_is_reported_with_its_output() -> None:
    broken = echo_box(command=["no_such_module:Nothing", "--path", "/plugin"])
    async with Dispatcher(manifest(broken)) as dispatcher:
        with pytest.raises(TargetUnavailable, match="exited before it was ready") as failed:
            await dispatcher.call("echo-box", "say", {"text": "hi"})
        assert "cannot load plugin 'no_such_module:Nothing'" in failed.value.message
        assert failed.value.details["exit_code"] == 1
        assert containers(owner_of(dispatcher)) == [], "the failed container is removed"


_ORPHAN_MAKER = """
import asyncio, json, sys
sys.path.insert(0, {root!r})
from dispatcher import Dispatcher
from tests.conftest import manifest
from tests.test_docker import echo_box

async def main():
    async with Dispatcher(manifest(echo_box(min_instances=1))) as dispatcher:
        print(json.dumps({{"owner": dispatcher.providers["docker"].owner}}), flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_containers_of_a_sigkilled_dispatcher_are_removed_by_the_next() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORPHAN_MAKER.format(root=str(ROOT)), stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        owner = json.loads(line)["owner"]
        orphans = containers(owner, running_only=True)
        assert len(orphans) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert containers(owner) == orphans, "SIGKILL gave the dispatcher no chance to clean up"
    async with Dispatcher(manifest(unruly())):
        assert containers(owner) == [], "the next dispatcher removed the orphan on start"
    assert socket_folders(child.pid) == [], "and the dead dispatcher's socket folder"


async def test_a_plugin_error_keeps_the_plugins_own_type() -> None:
    async with Dispatcher(manifest(unruly())) as dispatcher:
        with pytest.raises(PluginError) as refused:
            await dispatcher.call("unruly", "refuse", {"reason": "not today"})
        assert refused.value.remote_type == "Refusal"
        assert refused.value.message == "not today"
        assert not refused.value.retryable
        # The container is fine: a plugin's error is an answer, not a crash.
        assert (await dispatcher.call("unruly", "whoami"))["uid"] == 65534


def test_tcp_transport_needs_host_network_said_in_the_manifest() -> None:
    with pytest.raises(ManifestError, match=r"sandbox\.network: host"):
        parse_manifest(
            {"version": 1, "plugins": [echo_box(transport="tcp")]},
            base_dir=ROOT,
        )


# -- containment -------------------------------------------------------------------------


async def test_sandbox_defaults_non_root_no_capabilities_read_only_root() -> None:
    async with Dispatcher(manifest(unruly())) as dispatcher:
        seen = await dispatcher.call("unruly", "sandbox")
        assert seen["uid"] == 65534
        assert seen["gid"] == 65534
        assert int(seen["cap_effective"], 16) == 0
        assert int(seen["cap_bounding"], 16) == 0
        assert seen["no_new_privs"] == "1"
        assert "ro" in seen["root_options"]
        for path in ("/var/tmp/escape", "/plugin/escape", "/etc/escape"):
            attempt = await dispatcher.call("unruly", "write", {"path": path})
            assert attempt["ok"] is False, path
            assert attempt["errno"] == 30, (path, attempt)  # EROFS
        assert (await dispatcher.call("unruly", "write", {"path": "/tmp/scratch"}))["ok"]


async def test_network_egress_fails(listener: tuple[socket.socket, int]) -> None:
    server, port = listener
    async with Dispatcher(manifest(unruly())) as dispatcher:
        attempt = await dispatcher.call("unruly", "connect", {"host": "127.0.0.1", "port": port})
    assert attempt["ok"] is False, attempt
    assert attempt["interfaces"] == ["lo"], "only the container's own loopback exists"
    assert not accepted_any(server), "the host's listener was not reached"


async def test_relaxed_network_is_explicit_and_then_works(
    listener: tuple[socket.socket, int],
) -> None:
    server, port = listener
    relaxed = unruly(transport="tcp", sandbox={"network": "host"})
    async with Dispatcher(manifest(relaxed)) as dispatcher:
        attempt = await dispatcher.call("unruly", "connect", {"host": "127.0.0.1", "port": port})
    assert attempt["ok"] is True, attempt
    assert accepted_any(server)


async def test_memory_hog_is_killed_with_a_typed_error_while_others_keep_working() -> None:
    async with Dispatcher(manifest(unruly(), echo_box())) as dispatcher:
        await dispatcher.call("echo-box", "say", {"text": "warm"})
        hog = asyncio.create_task(dispatcher.call("unruly", "hog_memory", {"step_mb": 8}))
        while not hog.done():
            answer = await dispatcher.call("echo-box", "say", {"text": "still here"})
            assert answer["text"] == "still here"
            await asyncio.sleep(0.05)
        with pytest.raises(TargetUnavailable) as killed:
            await hog
        assert killed.value.retryable
        assert killed.value.details["oom_killed"] is True
        assert "memory limit" in killed.value.message
        assert (await dispatcher.call("unruly", "whoami"))["uid"] == 65534


async def test_fork_bomb_stops_at_the_pids_limit_while_others_keep_working() -> None:
    async with Dispatcher(manifest(unruly(), echo_box())) as dispatcher:
        await dispatcher.call("echo-box", "say", {"text": "warm"})
        bomb = asyncio.create_task(dispatcher.call("unruly", "fork_bomb", {"hold_s": 2.0}))
        while not bomb.done():
            answer = await dispatcher.call("echo-box", "say", {"text": "still here"})
            assert answer["text"] == "still here"
            await asyncio.sleep(0.05)
        result = bomb.result()
        assert "Errno 11" in result["refused"], result  # EAGAIN: the pids cgroup said no
        assert result["processes_at_peak"] <= 48, result
        assert (await dispatcher.call("unruly", "whoami"))["uid"] == 65534


def test_cli_deploy_builds_the_docker_image_once_and_skips_the_rest(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import main

    # A context and tag of this test's own, so the first deploy must build and the
    # removal at the end touches no image another test (or another run) uses.
    context = tmp_path / "plugin"
    shutil.copytree(EXAMPLES, context, ignore=shutil.ignore_patterns("__pycache__"))
    (context / "run.txt").write_text(tmp_path.name)
    image = f"linchkit-test/echo-cli:{os.getpid()}-{time.monotonic_ns()}"
    build = {"context": str(context), "entrypoint": "echo_plugin:EchoPlugin"}
    plugins = [
        echo_box(image=image, build=build),
        {**echo_box(), "id": "in-process", "target": LOCAL_TARGET},
    ]
    file = tmp_path / "plugins.yaml"
    file.write_text(yaml.safe_dump({"version": 1, "plugins": plugins}))

    def deploy(*options: str) -> str:
        result = CliRunner().invoke(main, ["-m", str(file), "deploy", *options])
        assert result.exit_code == 0, result.output
        return result.output

    assert f"echo-box@1.0.0: docker {image}\n  build image {image}" in deploy("--dry-run")
    try:
        built = deploy()
        assert f"echo-box@1.0.0: built image {image}" in built
        assert f"echo-box@1.0.0: deployed docker {image}" in built
        assert "in-process@1.0.0: local echo_plugin:EchoPlugin: nothing to deploy" in built
        again = deploy()
        assert f"echo-box@1.0.0: unchanged image {image}" in again, "same inputs: no build"
        assert f"echo-box@1.0.0: docker {image}: up to date" in again
    finally:
        removed = deploy("--remove")
    assert f"echo-box@1.0.0: removed docker {image}" in removed
    assert f"echo-box@1.0.0: docker {image}: nothing to remove" in deploy("--remove")


@pytest.fixture
def static_plugin_context(tmp_path: Path) -> Path:
    """A build context holding the Go test plugin, built as one static binary."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        pytest.skip("no Go toolchain here to build the static plugin binary")
    source = ROOT / "tests" / "docker_plugin_go"
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(source / "Dockerfile", context)
    subprocess.run(
        [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(context / "echo-plugin"), "."],
        cwd=source,
        env={**os.environ, "CGO_ENABLED": "0"},
        check=True,
    )
    return context


async def test_static_binary_runs_from_scratch_in_the_same_sandbox(
    static_plugin_context: Path,
) -> None:
    plugins = manifest(
        {
            "id": "go-echo",
            "version": "1.0.0",
            "runtime": "go",
            "target": {
                "provider": "docker",
                "image": "linchkit-test/go-echo:1",
                "build": {"context": str(static_plugin_context), "dockerfile": "Dockerfile"},
            },
            "methods": {"echo": {}, "missing": {}},
        }
    )
    plugin = plugins.plugins[0]
    async with DockerProvider() as provider:
        await provider.deployer().apply(plugin, plugin.target)
    size_mb = image_size_mb("linchkit-test/go-echo:1")
    assert size_mb < 15, f"FROM scratch holds only the binary: {size_mb:.1f} MB"
    async with Dispatcher(plugins) as dispatcher:
        assert await dispatcher.call("go-echo", "echo", {"list": [1, 2]}) == {"list": [1, 2]}
        with pytest.raises(MethodNotFound):
            await dispatcher.call("go-echo", "missing", {})


async def test_unreachable_engine_is_a_provider_error_saying_how_to_start_it(
    tmp_path: Path,
) -> None:
    provider = DockerProvider(docker_url=f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(ProviderError, match=r"scripts/start-docker\.sh"):
        await provider.start()


# -- the socket folder -------------------------------------------------------------------


async def test_a_plugin_cannot_point_the_host_at_another_unix_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The socket folder is the plugin's to write: it swaps plugin.sock for a symlink to a
    # Unix socket of the host's (here the test's own server). The host must keep talking
    # to the socket the plugin created, notice the swap, refuse and say so.
    reached: list[bytes] = []

    async def host_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(await reader.read(65536))
        body = b'{"ok": true, "result": "the host service answered"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    folder = Path(tempfile.mkdtemp(prefix="lk-host-service-"))
    service_path = str(folder / "service.sock")
    server = await asyncio.start_unix_server(host_service, path=service_path)
    outcomes: dict[str, int] = {}
    try:
        async with Dispatcher(manifest(unruly(health_interval_s=0))) as dispatcher:
            hijacked = await dispatcher.call("unruly", "hijack", {"target": service_path})
            assert hijacked["ok"] is True

            async def one() -> None:
                try:
                    answer = await dispatcher.call("unruly", "whoami", timeout=10)
                    name = "the plugin" if "hostname" in answer else f"answered {answer!r}"
                except TargetUnavailable as error:
                    name = f"TargetUnavailable retryable={error.retryable}"
                except Exception as error:
                    name = f"{type(error).__name__}: {error}"
                outcomes[name] = outcomes.get(name, 0) + 1

            await asyncio.gather(*(one() for _ in range(40)))
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(folder, ignore_errors=True)
    assert len(reached) == 0, f"{len(reached)} of 40 calls reached the host's socket: {outcomes}"
    assert outcomes == {"TargetUnavailable retryable=False": 40}, outcomes
    assert "replaced its plugin.sock with a symlink" in caplog.text
    assert service_path in caplog.text  # where it pointed


@pytest.mark.parametrize("planted", ["symlink", "fifo", "file", "directory"])
def test_a_socket_path_that_is_not_a_socket_is_refused_before_any_connect(
    planted: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from providers._socket_pin import PinnedSocket, SocketTampered

    victim = tmp_path / "victim.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(victim))
    path = tmp_path / "plugin.sock"
    {
        "symlink": lambda: path.symlink_to(victim),
        "fifo": lambda: os.mkfifo(path),
        "file": lambda: path.write_text("x"),
        "directory": path.mkdir,
    }[planted]()
    pin = PinnedSocket(
        str(path),
        "container test-container",
        logging.getLogger("dispatcher.providers.docker"),
        "refuses every call to this container",
    )
    try:
        with pytest.raises(SocketTampered, match=r"made its plugin\.sock a"):
            pin.pin()
        with pytest.raises(SocketTampered):  # and from then on, always
            pin.pin()
    finally:
        pin.close()
        server.close()
    assert "security: container test-container" in caplog.text


async def test_a_tcp_container_answers_only_its_dispatcher() -> None:
    """On the host's loopback any local process can dial the plugin: it must prove who it is."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    box = echo_box(transport="tcp", port=free_port, max_instances=1, sandbox={"network": "host"})
    async with Dispatcher(manifest(box)) as dispatcher:
        assert (await dispatcher.call("echo-box", "say", {"text": "hi"}))["text"] == "hi"
        envelope = {"v": 1, "plugin": "echo-box", "method": "say", "params": {"text": "x"}}
        async with httpx.AsyncClient() as stranger:
            answer = await stranger.post(f"http://127.0.0.1:{free_port}/invoke", json=envelope)
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "unauthorized"


def test_the_static_binary_recipe_in_docs_is_the_one_this_file_runs() -> None:
    """docs/docker.md's Dockerfile for a static binary starts what the test plugin's
    Dockerfile starts (no SDK binary serves the HTTP envelope a docker target speaks)."""
    doc = (ROOT / "docs" / "docker.md").read_text()
    recipe = (ROOT / "tests" / "docker_plugin_go" / "Dockerfile").read_text()
    entrypoints = re.findall(r"ENTRYPOINT \[.*\]", doc)
    assert entrypoints, "docs/docker.md shows no Dockerfile"
    assert set(entrypoints) == set(re.findall(r"ENTRYPOINT \[.*\]", recipe))
    assert "tests/docker_plugin_go" in doc
