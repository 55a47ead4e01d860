"""Who listens on a container's loopback port (``providers/docker/port_owner.py``), told
with real sockets and real processes, no engine: a process in a PID namespace of its own
stands for the container, as the engine's ``State.Pid`` would name it.

Reading other processes' descriptors and making PID namespaces both need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher import TargetUnavailable
from providers.docker import port_owner
from providers.docker.channel import Address, HttpChannel
from providers.docker.port_owner import PortOwner, PortTaken
from providers.invocation import Invocation

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="reads other processes' descriptors, makes PID namespaces"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def container_pid() -> Iterator[int]:
    """The host's pid of a process that is PID 1 of a namespace of its own."""
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "120"])
    try:
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split():
            assert time.monotonic() < deadline, "unshare started no process"
            time.sleep(0.01)
        yield int(children.read_text().split()[0])
    finally:
        outer.kill()
        outer.wait()


def test_a_listener_on_an_ipv4_mapped_address_is_looked_at(container_pid: int) -> None:
    """An IPv6 socket bound to ::ffff:127.0.0.1 takes connections to 127.0.0.1 as an IPv4
    one does: it is a listener of the port, not "nothing listens yet"."""
    with socket.socket(socket.AF_INET6) as outsider:
        outsider.bind(("::ffff:127.0.0.1", 0))
        outsider.listen()
        port = outsider.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            pass  # it does answer there
        with pytest.raises(PortTaken, match=f"held by pid {os.getpid()}"):
            PortOwner(port, container_pid, "test").check()


_LISTENER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
print("listening", flush=True)
sys.stdin.read()
"""


def _start_as_pid(pid: int, port: int) -> subprocess.Popen[str] | None:
    """A listener on ``port`` in this host's namespace, started as ``pid`` if the kernel
    hands that pid out next (``ns_last_pid``); None if another process took it first."""
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    process = subprocess.Popen(
        [sys.executable, "-c", _LISTENER, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if process.pid == pid:
        return process
    process.kill()
    process.wait()
    return None


def test_the_pid_of_a_container_gone_is_not_its_namespace(container_pid: int) -> None:
    """The container's namespace is the one its first process had when the check was
    made: once that process is gone, a host process given its pid is not the container."""
    port = free_port()
    owner = PortOwner(port, container_pid, "test")
    os.kill(container_pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{container_pid}").exists():
        assert time.monotonic() < deadline, "the container's first process did not end"
        time.sleep(0.01)
    impostor = None
    for _ in range(50):  # other processes of the machine may take the pid first
        impostor = _start_as_pid(container_pid, port)
        if impostor is not None:
            break
    if impostor is None:
        pytest.skip(f"pid {container_pid} went to other processes 50 times")
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "listening"
        with pytest.raises(PortTaken, match=f"held by pid {container_pid}"):
            owner.check()
    finally:
        impostor.kill()
        impostor.wait()
        assert impostor.stdin is not None and impostor.stdout is not None
        impostor.stdin.close()
        impostor.stdout.close()


def test_a_pid_of_the_hosts_own_namespace_is_no_container() -> None:
    """A pid that is a process of this host's own namespace (the container's pid reused
    before the channel was made) would let every process of the host pass."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortTaken):
            PortOwner(port, os.getpid(), "test").check()


class _Impostor(http.server.BaseHTTPRequestHandler):
    seen: list[str | None]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"ok": true, "result": "forged"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


async def test_a_container_without_a_pid_is_not_trusted_with_its_port() -> None:
    """The engine names no ``State.Pid`` for a container that stopped as it started (its
    plugin found the port taken): the channel must not then skip the check."""
    seen: list[str | None] = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Impostor", (_Impostor,), {"seen": seen})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    channel = HttpChannel(Address("test-container", port=port, token="secret"))
    await channel.open()
    answer = None
    try:
        invocation = Invocation(
            "plugin", "1.0.0", "method", {}, asyncio.get_running_loop().time() + 5, "r-1"
        )
        with contextlib.suppress(TargetUnavailable):
            answer = await channel.invoke(invocation)
    finally:
        await channel.aclose()
        server.shutdown()
        server.server_close()
    assert seen == [], "the container's token went to whoever listened on its port"
    assert answer != "forged"


#: The plugin's request handler in a container's server script: answers every call in
#: the container's name.
_HANDLER = """
import http.server, os, socket, socketserver, sys, time

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"ok": true, "result": "from the container"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass
"""

#: The container's plugin server. Forking, as a server handing each connection to a
#: worker process does: the accepted end is then held by a process the listener check
#: never saw, still one of the container's.
_CONTAINER_SERVER = (
    _HANDLER
    + """
class Server(socketserver.ForkingMixIn, http.server.HTTPServer):
    allow_reuse_address = True

server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", flush=True)
server.serve_forever()
"""
)


@contextlib.contextmanager
def _container_server(
    port: int, script: str = _CONTAINER_SERVER
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """The plugin's server as PID 1 of a namespace of its own; yields its host pid."""
    command = ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c"]
    outer = subprocess.Popen(
        [*command, script, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert outer.stdout is not None
        assert outer.stdout.readline().strip() == "listening"
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        yield int(children[0]), outer
    finally:
        outer.kill()
        outer.wait()
        assert outer.stdout is not None
        outer.stdout.close()


async def test_a_connection_accepted_outside_the_container_gets_no_request() -> None:
    """Between the last look at the port's listeners and ``connect`` the port may change
    hands (the plugin's server letting go of it, a process joining it with
    ``SO_REUSEPORT``). Whoever accepted the connection is who reads the request and its
    token: the channel finds that end of the connection and refuses it when a process
    outside the container holds it, before a byte is sent."""
    port = free_port()
    seen: list[str | None] = []
    with _container_server(port) as (container_pid, container):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        impostor = None
        try:

            def invocation() -> Invocation:
                return Invocation("plugin", "1.0.0", "method", {}, loop.time() + 5, "r-1")

            # A forked worker of the container answers: the check lets it through.
            assert await channel.invoke(invocation()) == "from the container"
            # The port changes hands after the channel last read its listeners.
            container.kill()
            container.wait()
            await asyncio.sleep(0.2)  # the pool sees its connection closed
            impostor = http.server.ThreadingHTTPServer(
                ("127.0.0.1", port), type("Impostor", (_Impostor,), {"seen": seen})
            )
            threading.Thread(target=impostor.serve_forever, daemon=True).start()
            assert channel._owner is not None
            channel._owner.unchanged = lambda: True  # type: ignore[method-assign]
            with pytest.raises(TargetUnavailable) as refused:
                await channel.invoke(invocation())
        finally:
            await channel.aclose()
            if impostor is not None:
                impostor.shutdown()
                impostor.server_close()
    assert seen == [], "the container's token went to the process that took its port"
    assert refused.value.details.get("port_taken") is True
    assert f"accepted by pid {os.getpid()}" in str(refused.value)


#: A container's server at its limit of connections: each one is accepted and closed at once.
_CLOSING_SERVER = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
print("listening", flush=True)
while True:
    listener.accept()[0].close()
"""


async def test_a_connection_its_container_closes_at_once_fails_at_once() -> None:
    """A server that closes what it accepts leaves the connection's other end held by no
    process: that is a closed connection (a retryable failure, nothing sent), not a port
    in other hands, and the call does not wait for its deadline."""
    port = free_port()
    with _container_server(port, _CLOSING_SERVER) as (container_pid, _):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            invocation = Invocation("plugin", "1.0.0", "method", {}, started + 10, "r-1")
            with pytest.raises(TargetUnavailable) as failed:
                await channel.invoke(invocation)
        finally:
            await channel.aclose()
    assert loop.time() - started < 5
    assert not failed.value.details.get("port_taken")
    assert channel._taken is None


def test_a_connection_that_met_itself_is_no_port_taken(container_pid: int) -> None:
    """With nothing listening, a connection whose own port the kernel picked as the one it
    dials connects to itself (TCP's simultaneous open): its other end is this process's
    own socket. Nothing is sent there, and it is not a port in other hands."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.connect(("127.0.0.1", port))
        owner = PortOwner(port, container_pid, "test")
        with pytest.raises(ConnectionResetError, match="to itself"):
            owner.accepted(probe.getsockname())


#: A container's server whose listening process accepts and hands each connection to a
#: worker it forked, over a Unix socket (``SCM_RIGHTS``), closing its own copy: between the
#: two the connection is held by no process. The worker is busy for a while before it
#: takes the next one, as a worker in the middle of another request is.
_HANDING_SERVER = (
    _HANDLER
    + """
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
handing, taking = socket.socketpair()
if os.fork() == 0:
    listener.close()
    while True:
        time.sleep(0.3)
        _, (descriptor,), _, _ = socket.recv_fds(taking, 1, 1)
        connection = socket.socket(fileno=descriptor)
        Handler(connection, ("127.0.0.1", 0), None)
        connection.close()
print("listening", flush=True)
while True:
    connection, _ = listener.accept()
    socket.send_fds(handing, [b"c"], [connection.fileno()])
    connection.close()
"""
)


async def test_a_connection_handed_to_a_busy_worker_is_the_containers() -> None:
    """A server that accepts in one process and hands the connection to a worker over a
    Unix socket leaves it held by no process until the worker takes it, for as long as
    the worker is busy. Nothing can read the request before a process holds the
    connection, so the channel waits for one, and judges that one: a container handing
    connections to its workers is not a port in other hands."""
    port = free_port()
    with _container_server(port, _HANDING_SERVER) as (container_pid, _):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        try:
            invocation = Invocation("plugin", "1.0.0", "method", {}, loop.time() + 10, "r-1")
            assert await channel.invoke(invocation) == "from the container"
        finally:
            await channel.aclose()
    assert channel._taken is None


async def test_a_forking_server_costs_a_connection_no_scan_of_every_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that forks a process per connection (and closes the connection in the
    parent) leaves it held by a process the last look at the listeners never saw. Found
    by reading every process's descriptors, that cost each new connection seconds on a
    host of many processes, and a server closing each connection after its answer
    (HTTP/1.0) makes one per call. The container's processes' own children are looked
    at first. The real scan is counted, not replaced."""
    scans: list[set[str]] = []
    every_process = port_owner._holders

    def counted(inodes: set[str]) -> dict[str, set[int]]:
        scans.append(inodes)
        return every_process(inodes)

    monkeypatch.setattr(port_owner, "_holders", counted)
    port = free_port()
    with _container_server(port) as (container_pid, _):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        try:
            for number in range(5):
                invocation = Invocation(
                    "plugin", "1.0.0", "method", {}, loop.time() + 5, f"r-{number}"
                )
                assert await channel.invoke(invocation) == "from the container"
        finally:
            await channel.aclose()
    assert len(scans) == 1, "every process's descriptors read again for a new connection"


def test_a_connection_is_told_from_one_to_another_address_of_the_same_port() -> None:
    """The kernel may give two connections one source address and port when they go to
    different destinations: one to the container's 127.0.0.1:port, one to a process
    outside it listening on 127.0.0.2:port. The container's connection is the container's,
    whichever row the table lists first."""
    port = free_port()
    with (
        _container_server(port) as (container_pid, _),
        socket.socket() as outsider,
        socket.socket() as elsewhere,
        socket.socket() as ours,
    ):
        outsider.bind(("127.0.0.2", port))
        outsider.listen()
        for client in (elsewhere, ours):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elsewhere.bind(("127.0.0.1", 0))
        ours.bind(elsewhere.getsockname())
        elsewhere.connect(("127.0.0.2", port))
        accepted, _ = outsider.accept()  # held by this process: outside the container
        with accepted:
            ours.connect(("127.0.0.1", port))
            owner = PortOwner(port, container_pid, "test")
            assert owner.check()
            deadline = time.monotonic() + 10
            while not owner.accepted(ours.getsockname()):
                assert time.monotonic() < deadline, "the container never took the connection"
                time.sleep(0.01)


async def test_connections_waiting_together_are_looked_at_together_off_the_default_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections a server hands to a busy worker wait, held by no process, and each look
    at one held by nobody reads every process's descriptors. Looked at one by one, each
    connection ran that scan every 20 ms in the event loop's default executor (six threads
    on two cores, the ones aiohttp resolves host names in): six waiting connections
    filled it. They are looked at together now, on the channel's own thread: one scan at a
    time, never on the default executor's threads. The real scan is watched, not replaced."""
    threads: set[str] = set()
    running = 0
    most_at_once = 0
    lock = threading.Lock()
    every_process = port_owner._holders

    def watched(inodes: set[str]) -> dict[str, set[int]]:
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
            threads.add(threading.current_thread().name)
        try:
            time.sleep(0.005)  # a scan of a busier host than this one
            return every_process(inodes)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(port_owner, "_holders", watched)
    port = free_port()
    with _container_server(port, _HANDING_SERVER) as (container_pid, _):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        try:
            calls = [
                channel.invoke(
                    Invocation("plugin", "1.0.0", "method", {}, loop.time() + 10, f"r-{number}")
                )
                for number in range(6)
            ]
            assert await asyncio.gather(*calls) == ["from the container"] * 6
        finally:
            await channel.aclose()
    assert threads, "no connection was held by nobody: the test proves nothing"
    assert all(name.startswith("linchkit-port-check") for name in threads), threads
    assert most_at_once == 1


async def test_a_connection_an_outsider_keeps_in_flight_is_refused_not_waited_for() -> None:
    """A process that takes the port after the channel last read its listeners, accepts
    the connection and passes it along in a message (``SCM_RIGHTS``) leaves it held by no
    process, as a container's server handing it to a worker would: the channel waited for
    a holder until the call's deadline. The port's listeners are read again while it
    waits: listeners other than the container's are checked, and the outsider's is found."""
    port = free_port()
    with _container_server(port) as (container_pid, container):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        loop = asyncio.get_running_loop()
        impostor = socket.socket()
        kept, keeper = socket.socketpair()
        try:

            def invocation() -> Invocation:
                return Invocation("plugin", "1.0.0", "method", {}, loop.time() + 4, "r-1")

            assert await channel.invoke(invocation()) == "from the container"
            container.kill()
            container.wait()
            await asyncio.sleep(0.2)  # the pool sees its connection closed
            impostor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            impostor.bind(("127.0.0.1", port))
            impostor.listen()

            def keep_in_flight() -> None:
                with contextlib.suppress(OSError):
                    connection, _ = impostor.accept()
                    socket.send_fds(kept, [b"c"], [connection.fileno()])
                    connection.close()

            threading.Thread(target=keep_in_flight, daemon=True).start()
            assert channel._owner is not None
            channel._owner.unchanged = lambda: True  # type: ignore[method-assign]
            started = loop.time()
            with pytest.raises(TargetUnavailable) as refused:
                await channel.invoke(invocation())
        finally:
            await channel.aclose()
            impostor.close()
            kept.close()
            keeper.close()
    assert loop.time() - started < 2, "the call waited for its deadline"
    assert refused.value.details.get("port_taken") is True
    assert f"held by pid {os.getpid()}" in str(refused.value)


async def test_a_table_that_cannot_be_read_is_the_providers_error_not_the_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading who accepted a connection can fail (``/proc`` unreadable, a descriptor
    limit reached): the call ends with the provider's typed error, stage ``connect``
    (nothing was sent), not with the reader's ``PermissionError`` escaping aiohttp."""
    port = free_port()
    with _container_server(port) as (container_pid, _):
        channel = HttpChannel(
            Address("test-container", port=port, token="secret", container_pid=container_pid)
        )
        await channel.open()
        assert channel._owner is not None

        def unreadable(ends: object) -> object:
            raise PermissionError("/proc/net/tcp: permission denied")

        monkeypatch.setattr(channel._owner, "accepted_all", unreadable)
        loop = asyncio.get_running_loop()
        try:
            invocation = Invocation("plugin", "1.0.0", "method", {}, loop.time() + 5, "r-1")
            with pytest.raises(TargetUnavailable) as failed:
                await channel.invoke(invocation)
        finally:
            await channel.aclose()
    assert failed.value.details.get("stage") == "connect"
    assert "cannot check who accepted" in str(failed.value)
