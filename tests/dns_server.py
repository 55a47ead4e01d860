"""Real DNS servers for tests: Debian's dnsmasq, and a scripted one for hostile answers.

``Dnsmasq`` runs the real binary on a free loopback port (UDP and TCP) with the zone a test
describes. Addresses live in an ``--addn-hosts`` file, so ``set_hosts`` changes them while
it runs (rewrite, SIGHUP: dnsmasq re-reads the file and empties its cache); SRV records are
command-line options, so ``set_srv`` restarts it on the same port. ``stop``/``start`` kill
and bring it back on that port. Its fixture always kills the process.

``ScriptedDnsServer`` answers on real UDP and TCP sockets in the test's event loop with
whatever a handler returns: silence, garbage bytes, a wrong message id, a huge answer.
dnsmasq cannot be made to misbehave, and these are the servers a resolver must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

DNSMASQ = shutil.which("dnsmasq") or next(
    (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None
)
needs_dnsmasq = pytest.mark.skipif(
    DNSMASQ is None,
    reason="dnsmasq is not installed (make test installs it: apt-get install dnsmasq-base)",
)


@dataclass(frozen=True)
class Srv:
    """One ``--srv-host`` record."""

    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass
class Zone:
    """What dnsmasq serves: names under ``domain`` only (others are REFUSED)."""

    domain: str = "test"
    #: name -> its addresses (IPv4 or IPv6), changeable while running.
    hosts: dict[str, list[str]] = field(default_factory=dict)
    srv: list[Srv] = field(default_factory=list)
    #: TTL of every record; dnsmasq's default for local records is 0.
    local_ttl: int | None = None


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now (a DNS server needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


class Dnsmasq:
    """One dnsmasq process serving ``zone`` on 127.0.0.1:``port``."""

    def __init__(self, zone: Zone, workdir: Path) -> None:
        assert DNSMASQ is not None
        self.zone = zone
        self.workdir = workdir
        self.hosts_file = workdir / "hosts"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        self.hosts_file.write_text(
            "".join(
                f"{address} {name}\n"
                for name, addresses in self.zone.hosts.items()
                for address in addresses
            )
        )
        lines = [
            f"port={self.port}",
            "listen-address=127.0.0.1",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "pid-file=",  # no /run/dnsmasq.pid: tests run side by side
            f"local=/{self.zone.domain}/",  # answer NXDOMAIN for unknown names, not REFUSED
            f"addn-hosts={self.hosts_file}",
            *(
                f"srv-host={s.name},{s.target},{s.port},{s.priority},{s.weight}"
                for s in self.zone.srv
            ),
        ]
        if os.geteuid() == 0:
            lines.append("user=root")  # dnsmasq drops to `nobody`, who cannot read tmp_path
        if self.zone.local_ttl is not None:
            lines.append(f"local-ttl={self.zone.local_ttl}")
        config = self.workdir / "dnsmasq.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        assert self.process is None, "already running"
        config = self._write_config()
        assert DNSMASQ is not None
        self.process = subprocess.Popen(
            [DNSMASQ, "--keep-in-foreground", f"--conf-file={config}", "--log-facility=-"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()

    def _wait_ready(self, within_s: float = 15.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + within_s
        probe = dns.message.make_query(f"probe.{self.zone.domain}", "A")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                self.process = None
                raise RuntimeError(f"dnsmasq exited at start: {stderr.strip()}")
            with contextlib.suppress(dns.exception.Timeout, OSError):
                dns.query.udp(probe, "127.0.0.1", port=self.port, timeout=0.2)
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dnsmasq did not answer on {self.server} within {within_s} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def set_hosts(self, hosts: dict[str, list[str]]) -> None:
        """Change addresses while running: rewrite the file, SIGHUP (re-read, cache
        emptied), and return once dnsmasq answers the new ones: it re-reads after the
        signal, and a source asking at once on a loaded machine was told the old ones."""
        assert self.process is not None
        self.zone.hosts = hosts
        self._write_config()
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10.0
        while any(self._addresses(name) != set(each) for name, each in hosts.items()):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"dnsmasq did not answer {hosts} within 10 s of its SIGHUP")
            time.sleep(0.02)

    def _addresses(self, name: str) -> set[str] | None:
        """The A records dnsmasq answers for ``name`` now (None: no answer in time)."""
        try:
            answer = dns.query.udp(
                dns.message.make_query(name, "A"), "127.0.0.1", port=self.port, timeout=0.2
            )
        except (dns.exception.Timeout, OSError):
            return None
        return {
            record.to_text()
            for rrset in answer.answer
            if rrset.rdtype == dns.rdatatype.A
            for record in rrset
        }

    def set_srv(self, srv: list[Srv]) -> None:
        """Change SRV records: they are options, so dnsmasq restarts on the same port."""
        self.zone.srv = srv
        self.stop()
        self.start()


@pytest.fixture(name="dnsmasq")
def dnsmasq_fixture(tmp_path: Path) -> Iterator[Callable[[Zone], Dnsmasq]]:
    """Start dnsmasq with a zone: ``server = dnsmasq(Zone(...))``; killed after the test."""
    if DNSMASQ is None:
        pytest.skip(
            "dnsmasq is not installed (make test installs it: apt-get install dnsmasq-base)"
        )
    started: list[Dnsmasq] = []

    def start(zone: Zone) -> Dnsmasq:
        workdir = tmp_path / f"dnsmasq{len(started)}"
        workdir.mkdir()
        for attempt in range(3):  # the free port may be taken between the check and the bind
            server = Dnsmasq(zone, workdir)
            started.append(server)
            try:
                server.start()
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            return server
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for server in started:
            server.stop()


#: A scripted server's answer to one query: the reply's bytes, or None to stay silent.
Handler = Callable[[dns.message.Message, bool], bytes | None]


class ScriptedDnsServer:
    """UDP and TCP on one loopback port; every query goes to ``handler(query, over_tcp)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.queries: list[tuple[str, str, bool]] = []  # (name, type, over_tcp)
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answer(self, wire: bytes, over_tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        self.queries.append(
            (question.name.to_text(), dns.rdatatype.to_text(question.rdtype), over_tcp)
        )
        return self.handler(query, over_tcp)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # Python 3.11's selector transport is no DatagramTransport subclass: cast.
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server._answer(data, over_tcp=False)
                if reply is not None:
                    self.transport.sendto(reply, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    reply = self._answer(await reader.readexactly(size), over_tcp=True)
                    if reply is not None:
                        writer.write(len(reply).to_bytes(2, "big") + reply)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        for _ in range(20):
            port = free_port()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    Udp, local_addr=("127.0.0.1", port)
                )
            except OSError:
                continue
            try:
                self._tcp = await asyncio.start_server(tcp, "127.0.0.1", port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise RuntimeError("no loopback port for the scripted DNS server")

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):  # Server.close_clients() is Python 3.13+
                writer.close()
            await self._tcp.wait_closed()


@pytest.fixture(name="scripted_dns")
async def scripted_dns_fixture() -> AsyncIterator[
    Callable[[Handler], Awaitable[ScriptedDnsServer]]
]:
    """``server = await scripted_dns(handler)``; every server is closed after the test."""
    servers: list[ScriptedDnsServer] = []

    async def start(handler: Handler) -> ScriptedDnsServer:
        server = ScriptedDnsServer(handler)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.aclose()


def reply(
    query: dns.message.Message, *records: str, rcode: dns.rcode.Rcode = dns.rcode.NOERROR
) -> dns.message.Message:
    """A response to ``query`` whose answer holds ``records`` (zone-file text, e.g.
    ``"echo.test. 30 IN A 127.0.0.2"``)."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for text in records:
        name, ttl, rdclass, rdtype, *rdata = text.split()
        rrset = dns.rrset.from_text(name, int(ttl), rdclass, rdtype, " ".join(rdata))
        existing = response.find_rrset(
            response.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True
        )
        for rdata in rrset:
            existing.add(rdata, rrset.ttl)
    return response


def wire_for(query: dns.message.Message, response: dns.message.Message, over_tcp: bool) -> bytes:
    """What a server sends: the whole answer over TCP; over UDP, when it does not fit the
    client's buffer (EDNS payload, else 512), an empty answer with TC set, so the client
    asks again by TCP."""
    wire = response.to_wire(max_size=65535)  # not the client's payload: that is our job here
    limit = max(512, query.payload) if query.edns >= 0 else 512
    if over_tcp or len(wire) <= limit:
        return wire
    stub = dns.message.make_response(query)  # same id and question, no records
    stub.flags |= dns.flags.TC
    return stub.to_wire()
