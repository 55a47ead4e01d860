"""The docker provider against a plugin that abuses the host folder its socket lives in,
and against a local process that takes a container's loopback port before it does.

That folder is a host directory mounted read-write at ``/run/linchkit``: the one place a
sandboxed plugin writes to the host's own disk. The plugin (``tests/docker_plugin_hostile``)
runs on the unruly plugin's image with its folder granted read-only, so nothing is built.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher import Dispatcher, DispatchError, TargetUnavailable
from providers.docker import DockerProvider
from providers.docker.engine import Engine
from tests.conftest import ROOT, manifest
from tests.test_docker import (
    UNRULY_IMAGE,
    docker_images,
    eventually,
    socket_folders,
    unruly,
)

__all__ = ["docker_images"]  # the session's engine and images, as tests/test_docker.py has them

pytestmark = pytest.mark.docker

HOSTILE_FOLDER = ROOT / "tests" / "docker_plugin_hostile"


def hostile(**limits: Any) -> dict[str, Any]:
    return {
        "id": "hostile",
        "version": "1.0.0",
        "defaults": {"timeout_ms": 120_000},
        "target": {
            "provider": "docker",
            "image": UNRULY_IMAGE,
            "command": ["hostile_plugin:HostilePlugin", "--path", str(HOSTILE_FOLDER)],
            "limits": {"memory_mb": 96, "pids": 48, "cpus": 1.0, **limits},
        },
        "capabilities": {"files": [{"path": str(HOSTILE_FOLDER), "mode": "ro"}]},
        "methods": {"fill": {}, "litter": {}, "crash": {}, "stop_listening": {}, "deaf": {}},
    }


def hostile_on_port(port: int) -> dict[str, Any]:
    """The hostile plugin with transport tcp on ``port``, probed only when it starts."""
    plugin = hostile()
    plugin["target"].update(
        transport="tcp",
        port=port,
        max_instances=1,
        health_interval_s=3600,
        sandbox={"network": "host"},
    )
    return plugin


#: The hostile plugin on an image declaring ``VOLUME /data`` (``Dockerfile.volume``).
VOLUME_IMAGE = "linchkit-test/hostile-volume:1"


def with_a_volume(**limits: Any) -> dict[str, Any]:
    return {
        "id": "hostile",
        "version": "1.0.0",
        "defaults": {"timeout_ms": 120_000},
        "target": {
            "provider": "docker",
            "image": VOLUME_IMAGE,
            "build": {"context": str(HOSTILE_FOLDER), "dockerfile": "Dockerfile.volume"},
            "limits": {"memory_mb": 96, "pids": 48, "cpus": 1.0, **limits},
        },
        "methods": {"fill": {}},
    }


@pytest.fixture(scope="module")
def volume_image(docker_images: None) -> None:
    async def deploy() -> None:
        (plugin,) = manifest(with_a_volume()).plugins
        async with DockerProvider() as provider:
            await provider.deployer().apply(plugin, plugin.target)

    asyncio.run(deploy())


def engine_volumes() -> set[str]:
    listed = subprocess.run(
        ["docker", "volume", "ls", "-q"], check=True, capture_output=True, text=True
    )
    return set(listed.stdout.split())


def unmounted(volumes: set[str]) -> set[str]:
    """Those of ``volumes`` no container has (in any state): left behind. A volume another
    test's container holds meanwhile (the engine is shared) is that container's."""
    held = subprocess.run(
        ["docker", "ps", "-a", "--no-trunc", "--format", "{{.Mounts}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {volume for volume in volumes if volume not in held}


def socket_folder_entries() -> list[str]:
    """The container folders in this process's socket roots."""
    return [entry.name for root in socket_folders(os.getpid()) for entry in root.iterdir()]


@pytest.fixture
def host_socket_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider as a process that cannot reach the engine's volumes (not root) runs
    it: each socket folder is a folder of the host's, on its disk."""

    async def unreachable(self: Engine) -> bool:
        return False

    monkeypatch.setattr(Engine, "volumes_reachable", unreachable)


@pytest.mark.usefixtures("host_socket_folders")
async def test_removing_a_littered_socket_folder_does_not_stall_other_calls() -> None:
    # 100,000 files take the engine's host seconds to delete: done on the event loop, every
    # other call of the dispatcher waits for them. Each file's inode and dentry are kernel
    # memory charged to the container: 100,000 are about 120 MB, more than the 96 MB the
    # other cases allow, and the kernel's reclaim does not always keep up (an OOM kill in
    # one run in many). This case is about the host's removal, not the limit: room for them.
    async with Dispatcher(manifest(hostile(memory_mb=512))) as dispatcher:
        await dispatcher.call(
            "hostile", "litter", {"folder": "/run/linchkit/junk", "count": 100_000}
        )
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        with pytest.raises(TargetUnavailable):
            await dispatcher.call("hostile", "crash")
        await eventually(lambda: not socket_folder_entries(), what="the socket folder removed")
        ticking.cancel()
        assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f} s"


async def test_the_socket_folder_holds_a_socket_and_little_else() -> None:
    """The socket folder is a tmpfs of SOCKET_FOLDER_INODES files: 100,000 empty ones are
    refused (each would cost the host kernel memory), and the plugin goes on serving."""
    async with Dispatcher(manifest(hostile())) as dispatcher:
        with pytest.raises(DispatchError, match="No space left on device"):
            await dispatcher.call(
                "hostile", "litter", {"folder": "/run/linchkit/junk", "count": 100_000}
            )
        filled = await dispatcher.call("hostile", "fill", {"path": "/tmp/small", "mb": 1})
        assert filled["ok"], filled
    assert not socket_folder_entries(), "nothing of it on the host's disk"


async def test_the_socket_folder_takes_no_more_than_tmp_mb() -> None:
    async with Dispatcher(manifest(hostile(tmp_mb=8))) as dispatcher:
        in_tmp = await dispatcher.call("hostile", "fill", {"path": "/tmp/big", "mb": 32})
        assert not in_tmp["ok"]
        beside_socket = await dispatcher.call(
            "hostile", "fill", {"path": "/run/linchkit/big", "mb": 32}
        )
        assert not beside_socket["ok"], "32 MiB written to the host's disk with tmp_mb 8"


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Answers as a plugin would, and keeps what the host sent it."""

    seen: list[dict[str, str | None]]

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b'{"status": "serving"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.seen.append({"authorization": self.headers.get("Authorization"), "body": body})
        self._answer(b'{"ok": true, "result": "forged"}')

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[tuple[int, list[dict[str, str | None]]]]:
    """A local process's HTTP server on a loopback port, listening before any container."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    seen: list[dict[str, str | None]] = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), type("Impostor", (_Impostor,), {"seen": seen})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield port, seen
    finally:
        server.shutdown()
        server.server_close()


async def test_a_port_taken_before_the_container_does_not_receive_its_calls(
    impostor: tuple[int, list[dict[str, str | None]]],
) -> None:
    port, seen = impostor
    await _the_impostor_hears_nothing(port, seen)


@pytest.mark.usefixtures("volume_image")
async def test_an_image_volume_is_a_tmpfs_of_tmp_mb_and_nothing_is_left_behind() -> None:
    before = engine_volumes()
    async with Dispatcher(manifest(with_a_volume(tmp_mb=8))) as dispatcher:
        filled = await dispatcher.call("hostile", "fill", {"path": "/data/big", "mb": 32})
        assert not filled["ok"], "32 MiB written to the image's volume with tmp_mb 8"
        assert filled["mb"] <= 8
    assert unmounted(engine_volumes() - before) == set()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _impostor_server(seen: list[dict[str, str | None]]) -> http.server.ThreadingHTTPServer:
    """An impostor's HTTP server that is handed its connections (``process_request``)."""
    handler = type("Impostor", (_Impostor,), {"seen": seen})
    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)


def _accept_queue(inode: int) -> int:
    """How many connections wait on the listening socket ``inode`` (``/proc/net/tcp``)."""
    with open("/proc/net/tcp", encoding="ascii") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[9] == str(inode):
                return int(fields[4].partition(":")[2], 16)
    return 0


@pytest.fixture
def impostor_in_flight() -> Iterator[tuple[int, list[dict[str, str | None]]]]:
    """A local process listening on a loopback port that no process holds while the host
    looks: the listening socket travels in a message the process sent itself, and comes out
    only for as long as it takes to accept a connection waiting on it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port, inode = int(listener.getsockname()[1]), os.fstat(listener.fileno()).st_ino
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def park(sock: socket.socket) -> None:
        rights = array.array("i", [sock.fileno()])
        sender.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        sock.close()

    def unpark() -> socket.socket:
        _, ancillary, _, _ = receiver.recvmsg(1, socket.CMSG_SPACE(rights_size))
        descriptor = array.array("i")
        descriptor.frombytes(ancillary[0][2][:rights_size])
        return socket.socket(fileno=descriptor[0])

    rights_size = array.array("i").itemsize
    park(listener)
    seen: list[dict[str, str | None]] = []
    server = _impostor_server(seen)
    stop = threading.Event()

    def accept_when_asked() -> None:
        while not stop.wait(0.005):
            if not _accept_queue(inode):
                continue
            held = unpark()
            held.setblocking(False)
            waiting = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    waiting.append(held.accept())
            park(held)
            for connection, address in waiting:
                connection.setblocking(True)
                server.process_request(connection, address)

    thread = threading.Thread(target=accept_when_asked, daemon=True)
    thread.start()
    try:
        yield port, seen
    finally:
        stop.set()
        thread.join()
        server.server_close()
        sender.close()
        receiver.close()


async def test_a_listener_no_process_holds_while_the_host_looks_does_not_receive_its_calls(
    impostor_in_flight: tuple[int, list[dict[str, str | None]]],
) -> None:
    """A listening socket in flight (SCM_RIGHTS) is in no process's descriptors: no
    holder found is not "held by the container alone"."""
    port, seen = impostor_in_flight
    await _the_impostor_hears_nothing(port, seen)


async def test_a_port_the_container_lets_go_of_is_checked_again_before_a_new_connection() -> None:
    """The check holds for the listener it saw: a connection the pool opens later goes to
    whoever listens then, here a local process that took the port while the plugin's
    server let go of it (as a server reloading does)."""
    port = _free_port()
    seen: list[dict[str, str | None]] = []
    server = None
    try:
        async with Dispatcher(manifest(hostile_on_port(port))) as dispatcher:
            assert await dispatcher.call("hostile", "stop_listening") >= 1
            server = http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), type("Impostor", (_Impostor,), {"seen": seen})
            )
            threading.Thread(target=server.serve_forever, daemon=True).start()
            # One call takes the connection the pool keeps; the others need new ones.
            calls = [
                dispatcher.call("hostile", "fill", {"path": "/tmp/x", "mb": 0}) for _ in range(4)
            ]
            answers = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert seen == [], f"an impostor received the container's calls, token and all: {seen}"
    assert "forged" not in answers


#: Processes holding many descriptors each, as on a busy host (a database, a browser).
_CROWD = """
import os, signal
files = [open("/dev/null") for _ in range({descriptors})]
for _ in range({processes}):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
print("ready", flush=True)
signal.pause()
"""


@pytest.fixture
def crowded_host() -> Iterator[None]:
    """600 processes of 400 descriptors each, the lot ended with their process group."""
    crowd = subprocess.Popen(
        [sys.executable, "-c", _CROWD.format(processes=600, descriptors=400)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert crowd.stdout is not None
        assert crowd.stdout.readline().strip() == "ready"
        yield
    finally:
        os.killpg(crowd.pid, signal.SIGKILL)
        crowd.wait()
        crowd.stdout.close()


@pytest.mark.usefixtures("crowded_host")
async def test_who_listens_on_a_port_is_looked_up_off_the_event_loop() -> None:
    """Finding a port's holders reads every process's descriptors: on a host with many,
    that takes most of a second, which must not be the event loop's at each probe."""
    box = unruly(
        transport="tcp", max_instances=1, health_interval_s=0.2, sandbox={"network": "host"}
    )
    async with Dispatcher(manifest(box)) as dispatcher:
        await dispatcher.call("unruly", "whoami")
        gaps: list[float] = []
        last = time.perf_counter()
        deadline = last + 2.0
        while time.perf_counter() < deadline:  # the container's probes, every 0.2 s
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    assert max(gaps) < 0.25, f"the event loop stalled {max(gaps):.2f} s"


_IN_ITS_OWN_MOUNT_NAMESPACE = """
import asyncio, sys
sys.path[:0] = [{root!r}, {sdk!r}]
from dispatcher import Dispatcher
from tests.conftest import manifest
from tests.test_docker import echo_box

async def main():
    async with Dispatcher(manifest(echo_box(ready_timeout_s=10))) as dispatcher:
        answer = await dispatcher.call("echo-box", "say", {{"text": "hi"}})
        print(answer["text"], flush=True)

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine's volumes are out of reach: no tmpfs")
async def test_socket_folders_work_where_the_engine_mounts_out_of_sight() -> None:
    """A rootless engine mounts its volumes in a mount namespace of its own (rootlesskit's):
    the tmpfs is not where this process looks, and a socket made in it never appears here.
    A dispatcher in a mount namespace of its own stands for that: the folder must then be
    a host folder again (as before the tmpfs), said once as NOT ENFORCED."""
    program = _IN_ITS_OWN_MOUNT_NAMESPACE.format(root=str(ROOT), sdk=str(ROOT / "sdk" / "python"))
    child = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", sys.executable, "-c", program,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == "hi"
    assert err.decode().count("NOT ENFORCED") == 1, err.decode()


async def _the_impostor_hears_nothing(port: int, seen: list[dict[str, str | None]]) -> None:
    """A container on ``port`` (transport tcp) is called: refused, never answered by the
    impostor there, which hears nothing (no call, no token)."""
    victim = unruly(transport="tcp", port=port, max_instances=1, sandbox={"network": "host"})
    answer = None
    async with Dispatcher(manifest(victim)) as dispatcher:
        with contextlib.suppress(DispatchError):  # refused is what should happen
            answer = await dispatcher.call("unruly", "whoami")
    assert seen == [], f"an impostor received the container's calls, token and all: {seen}"
    assert answer != "forged"


async def test_closing_with_three_deaf_containers_costs_one_stop_timeout_not_three() -> None:
    """Three plugin versions' containers ignore SIGTERM: each is stopped by the SIGKILL
    after its ``stop_timeout_s``. Their pools share nothing, so a close stops them at
    once: about one timeout. Before, one after another (6 s and more here)."""
    plugins = []
    for n in range(3):
        plugin = hostile()
        plugin["id"] = f"deaf-{n}"
        plugin["target"]["stop_timeout_s"] = 2
        plugin["target"]["max_instances"] = 1
        plugins.append(plugin)
    dispatcher = Dispatcher(manifest(*plugins))
    await dispatcher.start()
    try:
        for n in range(3):
            await dispatcher.call(f"deaf-{n}", "deaf")
    finally:
        started = time.monotonic()
        await dispatcher.aclose()
        elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 5.0, f"aclose took {elapsed:.1f} s"
