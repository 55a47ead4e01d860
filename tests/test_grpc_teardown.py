"""A closed dispatcher leaves nothing of grpc's running in its host, whatever its gRPC calls
left behind: an error the caller keeps (of a call it cancelled, a deadline, a refusal), or
a stream its consumer left without closing.

grpc.aio keeps its core (a poller thread, the event engine's threads, their epoll, eventfd
and socket descriptors) while any channel or call object of it lives, so anything the
caller keeps must not reach one once the dispatcher has closed. Each case runs in a host
process of its own (``tests/grpc_teardown_host.py``): grpc's core is process-wide, and
this one has other tests' channels and servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT, bound_socket

HOST = ROOT / "tests" / "grpc_teardown_host.py"
PYTHON_EXAMPLE = [sys.executable, str(ROOT / "sdk" / "python" / "examples" / "example_plugin.py")]
# This checkout's host and SDK, not whichever the virtualenv installed (a worktree's differ).
SOURCE_PATH = os.pathsep.join([str(ROOT), str(ROOT / "sdk" / "python")])
ENVIRONMENT = {**os.environ, "PYTHONPATH": SOURCE_PATH}


@pytest.fixture(scope="module")
def grpc_address() -> Iterator[str]:
    """The Python SDK's example plugin served over gRPC by its own process."""
    plugin = subprocess.Popen(
        [*PYTHON_EXAMPLE, "serve", "--address", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENVIRONMENT,
    )
    assert plugin.stdout is not None
    try:
        handshake = plugin.stdout.readline().strip()  # 1|1|tcp|127.0.0.1:PORT|grpc|
        if not handshake.endswith("|grpc|"):
            pytest.fail(f"the example plugin did not start: {handshake!r}")
        yield handshake.split("|")[3]
    finally:
        plugin.terminate()
        plugin.wait(timeout=30)
        plugin.stdout.close()


def target(provider: str, grpc_address: str) -> dict[str, Any]:
    if provider == "grpc":
        return {"provider": "grpc", "address": grpc_address}
    return {"provider": "subprocess", "command": PYTHON_EXAMPLE, "env": {"PYTHONPATH": SOURCE_PATH}}


def left_behind(provider: str, grpc_address: str, way: str) -> dict[str, Any]:
    """What the host has of grpc's after closing its dispatcher (see the host's docstring)."""
    with bound_socket() as refusing:  # bound, never listening: connections are refused
        refused = f"127.0.0.1:{refusing.getsockname()[1]}"
        ran = subprocess.run(
            [sys.executable, str(HOST), json.dumps(target(provider, grpc_address)), way, refused],
            capture_output=True,
            text=True,
            env=ENVIRONMENT,
            timeout=120,
            check=False,
        )
    assert ran.returncode == 0, ran.stderr
    report: dict[str, Any] = json.loads(ran.stdout.splitlines()[-1])
    return report


@pytest.mark.parametrize("provider", ["grpc", "subprocess"])
@pytest.mark.parametrize(
    "way", ["completed", "cancelled", "deadline", "stream_left", "stream_failed"]
)
def test_a_closed_dispatcher_leaves_no_grpc_thread_or_descriptor(
    grpc_address: str, provider: str, way: str
) -> None:
    report = left_behind(provider, grpc_address, way)
    assert report["kept"] == (0 if way == "completed" else 1)  # what the call left the host
    assert (report["threads"], report["descriptors"]) == ({}, {})


def test_a_kept_refusal_leaves_no_grpc_thread_or_descriptor(grpc_address: str) -> None:
    """A gRPC status (UNAVAILABLE: nothing listens), translated: its ``__cause__`` is
    grpc's own error, whose traceback ran through the call."""
    report = left_behind("grpc", grpc_address, "refused")
    assert report["kept"] == 1
    assert (report["threads"], report["descriptors"]) == ({}, {})
