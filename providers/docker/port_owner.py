"""Who listens on a container's loopback port (``transport: tcp``): its own processes, or
someone who bound the port first.

With ``transport: tcp`` the container shares the host's network and its plugin binds
``127.0.0.1:port``; the host connects there with the container's bearer token. Any local
process that binds the port first (a fixed ``port``, or the free port the host picked, in
the moment before the plugin binds it) would get the calls, the token with them, and
answer in the container's name. So before the host sends anything there, and again at
each health probe, it looks up the listening sockets of the port in the kernel's table
(``/proc/net/tcp``, ``tcp6``), finds the processes holding them (``/proc/PID/fd``), and
requires each to be in the container's PID namespace (the same ``/proc/PID/ns/pid`` as
the container's first process, which the engine names in ``State.Pid``).

Reading another user's descriptors needs root (or ``CAP_SYS_PTRACE``): without it the
check cannot be made, and the provider reports the port as trusted, not checked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["PortOwner", "PortTaken", "can_check_owners"]

#: ``st`` of a listening socket in ``/proc/net/tcp``.
_LISTEN = "0A"
#: Local addresses a listener on the host's loopback port answers at (hex, as the table
#: writes them): 127.0.0.1, 0.0.0.0, ::1 and ::.
_LOOPBACK_OR_ANY = {
    "0100007F",
    "00000000",
    "00000000000000000000000001000000",
    "00000000000000000000000000000000",
}


class PortTaken(OSError):
    """A process outside the container listens on the container's port."""


def can_check_owners() -> bool:
    """Whether this process may read other users' descriptors (``PortOwner.check``)."""
    return os.geteuid() == 0


class PortOwner:
    """The check that ``port`` is listened on by the container whose first process is
    ``container_pid`` alone; ``verified`` once it held (the provider checks again at
    each health probe)."""

    def __init__(self, port: int, container_pid: int, describe: str) -> None:
        self.port = port
        self.container_pid = container_pid
        self.describe = describe
        self.verified = False

    def check(self) -> bool:
        """True when the port has a listener and every one is the container's; False while
        nothing listens yet. ``PortTaken`` when a process outside it holds one."""
        inodes = _listening_inodes(self.port)
        if not inodes:
            self.verified = False
            return False
        theirs = _namespace(self.container_pid)
        for pid in _holders(inodes):
            if theirs is None or _namespace(pid) != theirs:
                self.verified = False
                raise PortTaken(
                    f"port {self.port} of {self.describe} is held by pid {pid}"
                    f" ({_command(pid)}), not by a process of the container"
                )
        self.verified = True
        return True


def _listening_inodes(port: int) -> set[str]:
    wanted = f"{port:04X}"
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            next(rows, None)  # the header
            for row in rows:
                fields = row.split()
                address, _, local_port = fields[1].partition(":")
                if local_port == wanted and fields[3] == _LISTEN and address in _LOOPBACK_OR_ANY:
                    inodes.add(fields[9])
    return inodes


def _holders(inodes: set[str]) -> set[int]:
    """The processes with a descriptor of one of the sockets ``inodes``."""
    links = {f"socket:[{inode}]" for inode in inodes}
    holders: set[int] = set()
    with os.scandir("/proc") as processes:
        for process in processes:
            if process.name.isdigit() and _holds(process.name, links):
                holders.add(int(process.name))
    return holders


def _holds(pid: str, links: set[str]) -> bool:
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as descriptors:
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                if os.readlink(descriptor.path) in links:
                    return True
    return False


def _namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "gone"
