"""Every SDK's server sends each write at once: ``TCP_NODELAY`` on the connections it accepts.

Without it, Nagle's algorithm holds a reply's last small write (gRPC's trailers, after a
DATA frame of a few kilobytes) until the host acknowledges the write before, and the host
delays that acknowledgement (40 ms on Linux): an echo of 10 KB took 44 ms from the Rust
SDK, whose accepted sockets tonic leaves without the option (``sdk/rust/src/serve.rs``),
and 0.2 ms from the others.

The option is read, not timed: the test takes a copy of each of the plugin's socket
descriptors (``pidfd_getfd``, Linux 5.6, which a parent may do to its child) and reads it
there. Where the kernel refuses that, the test is skipped.

Both TCP listeners an SDK has are checked: ``serve --address`` (service mode, plaintext)
and the handshake's ``tcp`` network (AutoMTLS, the dispatcher's ``network: tcp``). A Unix
socket, the handshake's default, has no Nagle's algorithm.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import Any

import pytest

from dispatcher import Dispatcher
from tests.conformance.conftest import (
    LANGUAGES,
    START_TIMEOUT,
    _manifest,
    _start_service,
    _stop_service,
    executable,
)

MODES = ("service", "subprocess-tcp")
CASES = [(language, mode) for language in LANGUAGES for mode in MODES]
#: pidfd_getfd(2): one number on every architecture that has it (the syscall table is shared
#: from 424 on), ENOSYS where the kernel is older than 5.6.
SYS_PIDFD_GETFD = 438


def _copy_of(pidfd: int, fd: int) -> socket.socket | None:
    """A copy of the process's descriptor ``fd`` as a socket, or None if it is gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    copied = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if copied < 0:
        error = ctypes.get_errno()
        if error == errno.EBADF:  # closed since it was listed
            return None
        if error in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            pytest.skip(f"cannot read another process's sockets here: {os.strerror(error)}")
        raise OSError(error, os.strerror(error))
    try:
        return socket.socket(fileno=copied)
    except OSError:  # not a socket after all (the number was reused)
        os.close(copied)
        return None


def accepted_nodelay(pid: int) -> list[int]:
    """``TCP_NODELAY`` of each TCP connection the process ``pid`` accepted: its connected
    sockets on the port of one of its listening sockets."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open here (Linux only)")
    sockets: list[socket.socket] = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:  # closed since it was listed
                continue
            copy = _copy_of(pidfd, int(name))
            if copy is None:
                continue
            if copy.type == socket.SOCK_STREAM and copy.family in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                sockets.append(copy)
            else:
                copy.close()
        listening = {
            each.getsockname()[1]
            for each in sockets
            if each.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        }
        found = []
        for each in sockets:
            if each.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            if each.getsockname()[1] in listening:
                found.append(each.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return found
    finally:
        os.close(pidfd)
        for each in sockets:
            each.close()  # our copies only: the plugin's connections stay open


def _subprocess_pid(dispatcher: Dispatcher) -> int:
    target: Any = dispatcher.manifest.plugins[0].target
    provider: Any = dispatcher.providers["subprocess"]
    pid = provider.process("example", "1.0.0", target).pid
    assert pid is not None
    return int(pid)


@pytest.mark.parametrize(
    ("language", "mode"), CASES, ids=[f"{language}-{mode}" for language, mode in CASES]
)
async def test_the_connections_a_plugin_accepts_send_without_delay(
    language: str, mode: str
) -> None:
    path = executable(language)
    params = {"blob": "x" * 10_000}  # a reply Nagle's algorithm would split and hold
    if mode == "service":
        service, address = await _start_service(path)
        try:
            target = {
                "provider": "grpc",
                "address": address,
                "lifecycle": "dispatcher",
                "connect_timeout_ms": int(START_TIMEOUT * 1000),
            }
            async with Dispatcher(_manifest(target)) as dispatcher:
                assert await dispatcher.call("example", "echo", params) == params
                nodelay = accepted_nodelay(service.pid)
        finally:
            await _stop_service(service)
    else:
        target = {
            "provider": "subprocess",
            "command": [str(path)],
            "network": "tcp",
            "handshake_timeout_ms": int(START_TIMEOUT * 1000),
            "health_interval_ms": 0,
        }
        async with Dispatcher(_manifest(target)) as dispatcher:
            assert await dispatcher.call("example", "echo", params) == params
            nodelay = accepted_nodelay(_subprocess_pid(dispatcher))
    # The call went over one of them, so there is one at least.
    assert nodelay, f"no accepted TCP connection found in the {language} plugin"
    assert all(nodelay), (
        f"the {language} plugin ({mode}) accepted {nodelay.count(0)} of {len(nodelay)} "
        "connections without TCP_NODELAY: its replies wait on the host's delayed ACK"
    )
