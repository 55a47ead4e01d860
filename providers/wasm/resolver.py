"""Name lookups for wasm modules' HTTP requests, each waited for until its call's end only.

``socket.getaddrinfo`` (the system resolver: ``/etc/hosts``, then the servers of
``resolv.conf``) cannot be interrupted, and ends when the resolver gives up: resolv.conf's
``timeout`` times its ``attempts`` for each server, seconds to minutes. A lane's thread that
called it itself stayed taken that long after its caller was answered, and the plugin's
next calls found the pool busy. Here each lookup runs on a daemon thread of the
``Resolver``'s own, and the lane's thread waits for the answer until its call's end; a
lookup nobody waits for any more keeps its thread until the system resolver answers or
gives up, and its answer is dropped.

At most ``limit`` lookups are under way at once, answered or not: a resolver that never
answers ties up ``limit`` threads, not one more with every call, and a lookup past them
fails at once (``ResolverBusy``), starting no thread and waiting for none, unless the
hosts file (``/etc/hosts``) names the host: the system resolver would have answered that
from the file without asking a server (``files`` before ``dns`` in nsswitch.conf, as every
distribution ships it), so a stuck server does not make ``localhost`` unreachable. The
file is read only then: while a thread is free, every name goes to ``getaddrinfo``, which
asks the sources in the order the machine's nsswitch.conf gives.

    Resolver.resolve raises
    ├── TimeoutError     the wait reached its end; the lookup goes on, unheard
    ├── ResolverBusy     ``limit`` lookups are under way, and the hosts file does not
    │                    name the host; this one never started
    ├── RuntimeError     the resolver is closed
    └── what getaddrinfo raised (``socket.gaierror``, ``UnicodeError`` for a name IDNA
        cannot encode)
"""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_LOOKUPS", "AddressInfo", "Resolver", "ResolverBusy"]

#: Lookups under way at once, for every wasm plugin of a dispatcher together. A healthy
#: resolver answers in milliseconds, so 32 at once carry thousands a second; 32 threads
#: blocked in a resolver that never answers cost little (their stacks mostly unused).
MAX_LOOKUPS = 32

AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

HOSTS_FILE = "/etc/hosts"
#: The most of the hosts file read: a file past it is read that far.
HOSTS_FILE_MAX_BYTES = 1 << 20


class ResolverBusy(Exception):
    """Every lookup the resolver may run at once is under way (and likely unanswered)."""

    def __init__(self, busy: int) -> None:
        super().__init__(f"{busy} lookups are waiting for the system resolver, the most at once")
        self.busy = busy


class _Lookup:
    __slots__ = ("answer", "done", "error", "host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.done = threading.Event()
        self.answer: Sequence[AddressInfo] = ()
        self.error: Exception | None = None


class Resolver:
    """``getaddrinfo`` on up to ``limit`` daemon threads, started as lookups need them."""

    def __init__(
        self, limit: int = MAX_LOOKUPS, name: str = "wasm-resolver", hosts_file: str = HOSTS_FILE
    ) -> None:
        self._limit = limit
        self._name = name
        self._hosts = _HostsFile(hosts_file)
        self._lookups: queue.SimpleQueue[_Lookup | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: Lookups handed to a thread and not yet answered, waited for or not.
        self._busy = 0
        self._lock = threading.Lock()
        self._closed = False

    def resolve(self, host: str, port: int, *, timeout: float) -> Sequence[AddressInfo]:
        """``getaddrinfo(host, port, type=SOCK_STREAM)``, waited for ``timeout`` seconds at
        most (raises: module docstring)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self._name} threads have ended")
            busy = self._busy >= self._limit
            if not busy:
                self._busy += 1
                self._start_thread_if_needed()
        if busy:
            answer = self._hosts.lookup(host, port)
            if not answer:
                raise ResolverBusy(self._limit)
            return answer
        lookup = _Lookup(host, port)
        self._lookups.put(lookup)
        if not lookup.done.wait(max(timeout, 0.0)):
            raise TimeoutError(f"no answer for {host} within {timeout:.3f} s")
        if lookup.error is not None:
            raise lookup.error
        return lookup.answer

    def _start_thread_if_needed(self) -> None:
        # Every thread is either idle or on one lookup: a lookup more than there are
        # threads needs a new one (at most ``limit`` in all, as lookups are).
        if self._busy > len(self._threads):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while (lookup := self._lookups.get()) is not None:
            try:
                lookup.answer = socket.getaddrinfo(
                    lookup.host, lookup.port, type=socket.SOCK_STREAM
                )
            except Exception as error:  # raised to the waiter, if one is left
                lookup.error = error
            with self._lock:
                self._busy -= 1
            lookup.done.set()

    def close(self) -> None:
        """End every thread once its lookup is done, without waiting: one blocked in the
        system resolver ends when that gives up (a daemon thread: it holds up no exit)."""
        with self._lock:
            self._closed = True
            threads = len(self._threads)
        for _ in range(threads):
            self._lookups.put(None)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"busy={self._busy}/{self._limit}"
        return f"<Resolver {self._name} {state} threads={len(self._threads)}>"


class _HostsFile:
    """The addresses the hosts file gives each name, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._read_as: tuple[int, int] | None = None
        self._names: dict[str, list[str]] = {}

    def lookup(self, host: str, port: int) -> list[AddressInfo]:
        """What ``getaddrinfo(host, port, type=SOCK_STREAM)`` answers from the file (in its
        order), or nothing where it does not name ``host``."""
        answer: list[AddressInfo] = []
        for address in self._entries().get(host.lower().rstrip("."), ()):
            if ":" in address:
                answer.append(
                    (
                        socket.AF_INET6,
                        socket.SOCK_STREAM,
                        socket.IPPROTO_TCP,
                        "",
                        (address, port, 0, 0),
                    )
                )
            else:
                answer.append(
                    (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
                )
        return answer

    def _entries(self) -> dict[str, list[str]]:
        with self._lock:
            try:
                stat = os.stat(self._path)
            except OSError:
                return {}
            if (stat.st_mtime_ns, stat.st_size) != self._read_as:
                self._names = _parse_hosts(self._path)
                self._read_as = (stat.st_mtime_ns, stat.st_size)
            return self._names


def _parse_hosts(path: str) -> dict[str, list[str]]:
    """Name → addresses of a hosts file, in its order; a line that is not an address and
    names is skipped, as the system resolver skips it."""
    try:
        with open(path, "rb") as hosts:
            text = hosts.read(HOSTS_FILE_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        # A scoped address (fe80::1%eth0) is left out: its socket address needs the
        # scope's number, and egress refuses link-local addresses anyway.
        if len(fields) < 2 or "%" in fields[0]:
            continue
        try:
            address = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            found = names.setdefault(name.lower(), [])
            if address not in found:
                found.append(address)
    return names
