"""The docker provider against a plugin that abuses the host folder its socket lives in.

That folder is a host directory mounted read-write at ``/run/linchkit``: the one place a
sandboxed plugin writes to the host's own disk. The plugin (``tests/docker_plugin_hostile``)
runs on the unruly plugin's image with its folder granted read-only, so nothing is built.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from dispatcher import Dispatcher, TargetUnavailable
from tests.conftest import ROOT, manifest
from tests.test_docker import UNRULY_IMAGE, docker_images, eventually, socket_folders

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


def socket_folder_entries() -> list[str]:
    """The container folders in this process's socket roots."""
    return [entry.name for root in socket_folders(os.getpid()) for entry in root.iterdir()]


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


@pytest.mark.xfail(
    strict=True,
    reason="the socket folder is a host bind mount: nothing bounds what a plugin writes there "
    "(docs/docker.md lists /tmp as the only writable place, tmpfs of tmp_mb)",
)
async def test_the_socket_folder_takes_no_more_than_tmp_mb() -> None:
    async with Dispatcher(manifest(hostile(tmp_mb=8))) as dispatcher:
        in_tmp = await dispatcher.call("hostile", "fill", {"path": "/tmp/big", "mb": 32})
        assert not in_tmp["ok"]
        beside_socket = await dispatcher.call(
            "hostile", "fill", {"path": "/run/linchkit/big", "mb": 32}
        )
        assert not beside_socket["ok"], "32 MiB written to the host's disk with tmp_mb 8"
