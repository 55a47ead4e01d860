"""Who listens on a container's loopback port (``transport: tcp``): its own processes, or
someone who bound the port first.

With ``transport: tcp`` the container shares the host's network and its plugin binds
``127.0.0.1:port``; the host connects there with the container's bearer token. Any local
process that binds the port first (a fixed ``port``, or the free port the host picked, in
the moment before the plugin binds it), or while the plugin's server lets go of it, would
get the calls, the token with them, and answer in the container's name. So at each health
probe the host looks up the listening sockets of the port in the kernel's table
(``/proc/net/tcp``, ``tcp6``: every address a connection to 127.0.0.1 reaches, the
IPv4-mapped ones too), finds the processes holding them (``/proc/PID/fd``), and requires
each socket to be held, and only by processes in the container's PID namespace (the
namespace of the container's first process, which the engine names in ``State.Pid``, read
once, as it starts: a pid read again later may be another process's). A listening socket
no process holds is not the container's: it may be travelling in a message
(``SCM_RIGHTS``) between an outsider's calls to ``accept``.

Before each new connection the host reads the table again (``unchanged``, no descriptor
scan): the port's listeners must be the very sockets the last check found, or it checks
again. That leaves the moment between the read and ``connect`` itself, in which the port
may change hands (the plugin's server letting go of it, a process of the same user
joining it with ``SO_REUSEPORT``, which spreads connections over every listener). So once
a connection is open, and before a byte of the request goes out, the host finds the other
end of that very connection in the table and requires it to be held by the container's
processes (``accepted``): the kernel gives it a socket file only when a process accepts
it, so the host waits for that, and whoever holds it is who would read the request (one
handed to a worker in a message is held by nobody until the worker takes it: the host
waits for that too).

Reading every process's descriptors takes time (seconds on a host of many processes with
many descriptors each): the channel does it off the event loop, on a thread of its own,
for every connection waiting to be accepted at once (``accepted_all``). Reading another user's
descriptors needs root (or ``CAP_SYS_PTRACE``): without it the check cannot be made, and
the provider reports the port as trusted, not checked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DIALLED_HOST", "PortOwner", "PortTaken", "can_check_owners"]

#: ``st`` of a listening socket in ``/proc/net/tcp``.
_LISTEN = "0A"
#: Where the host dials a container's port (``providers.docker.channel``).
DIALLED_HOST = "127.0.0.1"
#: ``st`` of a connection's end while it is open: ESTABLISHED, SYN_RECV. Any other of an
#: end that no process holds is one its server closed.
_OPEN = ("01", "03")
#: Local addresses a listener on the host's loopback port answers at (hex, as the table
#: writes them): 127.0.0.1, 0.0.0.0, ::1, ::, and an IPv6 socket's IPv4-mapped
#: ::ffff:127.0.0.1 and ::ffff:0.0.0.0, which take IPv4 connections as the first two do.
_LOOPBACK_OR_ANY = {
    "0100007F",
    "00000000",
    "00000000000000000000000001000000",
    "00000000000000000000000000000000",
    "0000000000000000FFFF00000100007F",
    "0000000000000000FFFF000000000000",
}


class PortTaken(OSError):
    """A process outside the container listens on the container's port."""


#: What ``PortOwner.accepted_all`` finds of one connection: accepted by the container
#: (True), not yet (False), or why it is not to be used (``PortTaken``, a reset).
Outcome = bool | OSError


def can_check_owners() -> bool:
    """Whether this process may read other users' descriptors (``PortOwner.check``)."""
    return os.geteuid() == 0


class PortOwner:
    """The check that ``port`` is listened on by the container whose first process is
    ``container_pid`` alone (``check``), and that it still is (``unchanged``)."""

    def __init__(self, port: int, container_pid: int, describe: str) -> None:
        self.port = port
        self.describe = describe
        namespace = _namespace(container_pid)
        # None: no process of the container to tell apart from the host's (it is gone, or
        # the pid is a process of this host's own namespace): nobody passes.
        self._namespace = None if namespace == _namespace(os.getpid()) else namespace
        #: The listening sockets ``check`` last found held by the container's alone.
        self._verified: frozenset[str] = frozenset()
        #: The container's processes found holding its sockets: looked at first for an
        #: accepted connection (a few descriptors, not every process's).
        self._pids: frozenset[int] = frozenset()

    def check(self) -> bool:
        """True when the port has a listener and every one is held by the container's
        processes alone; False while nothing listens yet. ``PortTaken`` when a process
        outside it holds one, or nobody does. Reads every process's descriptors: call it
        off the event loop."""
        self._verified = frozenset()
        inodes = _listening_inodes(self.port)
        if not inodes:
            return False
        holders = _holders(inodes)
        held = frozenset(holders)
        unheld = inodes - held
        if unheld and unheld & _listening_inodes(self.port):  # not closed meanwhile
            raise PortTaken(
                f"port {self.port} of {self.describe} is listened on by a socket no process"
                " holds (one passed in a message between its owner's calls to accept), not"
                " by a process of the container"
            )
        for pids in holders.values():
            for pid in pids:
                if self._namespace is None or _namespace(pid) != self._namespace:
                    raise PortTaken(
                        f"port {self.port} of {self.describe} is held by pid {pid}"
                        f" ({_command(pid)}), not by a process of the container"
                    )
        if not held:
            return False
        self._verified = held
        self._pids = frozenset(pid for pids in holders.values() for pid in pids)
        return True

    def accepted(self, local: tuple[Any, ...]) -> bool:
        """Whether the connection this host opened from ``local`` (its own end's address
        and port) to the port was accepted by the container's processes: False while it
        waits in a listener's queue or is held by no process, True once a process of the
        container holds its other end. ``PortTaken`` when a process outside the container
        holds that end; ``ConnectionResetError`` when its server closed it first, or it is
        gone from the table. Reads descriptors: call it off the event loop."""
        outcome = self.accepted_all([local])[local]
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def accepted_all(self, ends: Iterable[tuple[Any, ...]]) -> dict[tuple[Any, ...], Outcome]:
        """``accepted`` of many connections at once, its error as the outcome of the
        connection it is about: the tables read once for all of them, every process's
        descriptors at most once (for the connections that no process of the container
        holds). Connections opened together wait together; each alone, they read the
        tables and scanned every process once each, as often as they looked.

        While a connection is held by no process, the port's listeners are read again:
        listeners other than those last found the container's mean the port may have
        changed hands since the connection was opened (a process joining it with
        ``SO_REUSEPORT`` and handing what it accepts elsewhere), and they are checked
        (``check``): its ``PortTaken`` is then the outcome of every connection."""
        outcomes: dict[tuple[Any, ...], Outcome] = {}
        ends = list(ends)
        found = _other_ends(self.port, [end for end in ends if end[1] != self.port])
        unheld: dict[tuple[Any, ...], str] = {}
        for end in ends:
            if end[1] == self.port:  # nothing listened, and the connection met itself
                outcomes[end] = ConnectionResetError(
                    f"the connection to port {self.port} is to itself"
                )
                continue
            state, inode = found.get(end, (None, None))
            if inode == "0" and state in _OPEN:  # in a listener's queue: not accepted yet
                outcomes[end] = False
            elif inode is None or inode == "0":  # closed by its server, or gone
                outcomes[end] = ConnectionResetError(
                    f"the connection to port {self.port} of {self.describe} closed before it"
                    " was checked"
                )
            elif self._held_by_container(inode):
                outcomes[end] = True
            else:
                unheld[end] = inode
        if unheld:
            outcomes.update(self._judge_unheld(unheld))
        return outcomes

    def _judge_unheld(self, unheld: dict[tuple[Any, ...], str]) -> dict[tuple[Any, ...], Outcome]:
        """The outcomes of accepted connections that no process the container is known by
        holds: one scan of every process for all of them."""
        holders = _holders(set(unheld.values()))
        outcomes: dict[tuple[Any, ...], Outcome] = {}
        for end, inode in unheld.items():
            pids = holders.get(inode, set())
            outsiders = [pid for pid in pids if not self._in_container(pid)]
            if outsiders:
                outcomes[end] = PortTaken(
                    f"a connection to port {self.port} of {self.describe} was accepted"
                    f" by pid {outsiders[0]} ({_command(outsiders[0])}), not by a process"
                    " of the container"
                )
                continue
            self._pids |= pids
            # Held by nobody (False): its descriptor is being installed, or it travels in
            # a message (a server handing connections to its workers, for as long as the
            # worker is busy). Nothing reads the request before a process holds the
            # connection, and that process is judged then: wait for it, as for an accept.
            outcomes[end] = bool(pids)
        if False in outcomes.values() and not self._listeners_unchanged():
            try:
                self.check()
            except PortTaken as taken:
                return dict.fromkeys(unheld, taken)
        return outcomes

    def _held_by_container(self, inode: str) -> bool:
        """Whether the container's server, or a process it forked, holds the socket
        ``inode``: a few descriptors read (a server forking a process per connection
        hands each to a child of its own)."""
        link = {f"socket:[{inode}]": inode}
        return any(_held(str(pid), link) for pid in self._pids) or any(
            _held(str(pid), link) for pid in _children(self._pids)
        )

    def _in_container(self, pid: int) -> bool:
        return self._namespace is not None and _namespace(pid) == self._namespace

    def unchanged(self) -> bool:
        """Whether the port's listeners are still exactly those ``check`` last found held
        by the container alone: the table read again, no descriptor scanned."""
        return self._listeners_unchanged()

    def _listeners_unchanged(self) -> bool:
        return bool(self._verified) and _listening_inodes(self.port) == self._verified

    def __repr__(self) -> str:
        return f"<PortOwner port={self.port} verified={sorted(self._verified)}>"


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


def _other_ends(port: int, ends: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], tuple[str, str]]:
    """The state and inode of the other end of each connection from one of ``ends`` to
    127.0.0.1:``port`` (inode "0" until a process accepts it, and again once it closed
    it); a connection the table does not list is left out. Both ends' addresses are
    matched: a connection from the same address and port to 127.0.0.2:``port`` (another
    destination, so the kernel may give it the same source port) is another one. Each
    table is read once, for every connection."""
    wanted: dict[str, dict[tuple[str, str], tuple[Any, ...]]] = {}
    for end in ends:
        for table, dialled, peer in _ends_as_written(DIALLED_HOST, port, end[0], end[1]):
            wanted.setdefault(table, {})[peer, dialled] = end
    found: dict[tuple[Any, ...], tuple[str, str]] = {}
    for table, rows_wanted in wanted.items():
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            next(rows, None)  # the header
            for row in rows:
                fields = row.split()
                matched = rows_wanted.get((fields[2], fields[1]))
                if matched is not None and matched not in found:
                    found[matched] = fields[3], fields[9]
    return found


def _ends_as_written(
    host: str, port: int, peer_host: str, peer_port: int
) -> list[tuple[str, str, str]]:
    """Where the accepted end of a connection from ``peer_host:peer_port`` to
    ``host:port`` is listed, and how its own address and its peer's are written there: in
    ``tcp`` for an IPv4 listener, and in ``tcp6`` as IPv4-mapped addresses for an IPv6
    one; each 32-bit word of an address in the machine's byte order, as hex."""
    if ":" in host or ":" in peer_host:
        return [
            (
                "/proc/net/tcp6",
                f"{_words(socket.AF_INET6, host)}:{port:04X}",
                f"{_words(socket.AF_INET6, peer_host)}:{peer_port:04X}",
            )
        ]
    return [
        (
            "/proc/net/tcp",
            f"{_words(socket.AF_INET, host)}:{port:04X}",
            f"{_words(socket.AF_INET, peer_host)}:{peer_port:04X}",
        ),
        (
            "/proc/net/tcp6",
            f"{_words(socket.AF_INET6, '::ffff:' + host)}:{port:04X}",
            f"{_words(socket.AF_INET6, '::ffff:' + peer_host)}:{peer_port:04X}",
        ),
    ]


def _words(family: int, host: str) -> str:
    packed = socket.inet_pton(family, host)
    if sys.byteorder == "big":
        return packed.hex().upper()
    return b"".join(packed[at : at + 4][::-1] for at in range(0, len(packed), 4)).hex().upper()


def _holders(inodes: set[str]) -> dict[str, set[int]]:
    """The processes with a descriptor of each of the sockets ``inodes`` that any holds."""
    links = {f"socket:[{inode}]": inode for inode in inodes}
    holders: dict[str, set[int]] = {}
    with os.scandir("/proc") as processes:
        for process in processes:
            if process.name.isdigit():
                for inode in _held(process.name, links):
                    holders.setdefault(inode, set()).add(int(process.name))
    return holders


def _children(pids: frozenset[int]) -> list[int]:
    """The processes ``pids`` forked (``/proc/PID/task/TID/children``, every thread's);
    none where the kernel does not list them."""
    children: list[int] = []
    for pid in pids:
        with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/task") as threads:
            for thread in threads:
                with contextlib.suppress(OSError, ValueError):
                    listed = Path(thread.path, "children").read_text().split()
                    children.extend(int(child) for child in listed)
    return children


def _held(pid: str, links: dict[str, str]) -> set[str]:
    held: set[str] = set()
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as descriptors:
        for descriptor in descriptors:
            with contextlib.suppress(OSError):
                inode = links.get(os.readlink(descriptor.path))
                if inode is not None:
                    held.add(inode)
    return held


def _namespace(pid: int) -> str | None:
    if pid <= 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "gone"
