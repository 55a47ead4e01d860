"""The docker provider against a plugin that abuses the host folder its socket lives in,
and against a local process that takes a container's loopback port before it does.

That folder is a host directory mounted read-write at ``/run/linchkit``: the one place a
sandboxed plugin writes to the host's own disk. The plugin (``tests/docker_plugin_hostile``)
runs on the unruly plugin's image with its folder granted read-only, so nothing is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import subprocess
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
        "methods": {"fill": {}, "litter": {}, "crash": {}},
    }


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
    # other call of the dispatcher waits for them.
    async with Dispatcher(manifest(hostile())) as dispatcher:
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
    victim = unruly(transport="tcp", port=port, max_instances=1, sandbox={"network": "host"})
    answer = None
    async with Dispatcher(manifest(victim)) as dispatcher:
        with contextlib.suppress(DispatchError):  # refused is what should happen
            answer = await dispatcher.call("unruly", "whoami")
    assert seen == [], f"an impostor received the container's calls, token and all: {seen}"
    assert answer != "forged"


@pytest.mark.usefixtures("volume_image")
async def test_an_image_volume_is_a_tmpfs_of_tmp_mb_and_nothing_is_left_behind() -> None:
    before = engine_volumes()
    async with Dispatcher(manifest(with_a_volume(tmp_mb=8))) as dispatcher:
        filled = await dispatcher.call("hostile", "fill", {"path": "/data/big", "mb": 32})
        assert not filled["ok"], "32 MiB written to the image's volume with tmp_mb 8"
        assert filled["mb"] <= 8
    assert engine_volumes() - before == set()
