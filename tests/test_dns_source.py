"""``DnsSource`` against real DNS servers: dnsmasq, and scripted servers that misbehave.

Each test runs the source through its seam, ``run(report)``, as the fleet will, and watches
what it reports and what ``error`` says. Waits poll with generous deadlines (the machine may
be slow); nothing asserts how fast a read was.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import dns.message
import dns.rcode
import pytest

from dispatcher.fleet.sources.dns import (
    FAILURE_CAP_S,
    MAX_ENDPOINTS,
    MAX_FOLLOW_UPS,
    DnsSource,
    RefreshSchedule,
    settle,
)
from providers.discovery import DnsDiscovery, Endpoint
from tests.conftest import ROOT
from tests.dns_server import (
    Dnsmasq,
    Handler,
    ScriptedDnsServer,
    Srv,
    Zone,
    dnsmasq_fixture,  # noqa: F401  (the fixture `dnsmasq`)
    reply,
    scripted_dns_fixture,  # noqa: F401  (the fixture `scripted_dns`)
    wire_for,
)

StartDnsmasq = Callable[[Zone], Dnsmasq]
StartScripted = Callable[[Handler], Awaitable[ScriptedDnsServer]]


def spec(server: str, name: str, type: str = "A", **extra: Any) -> DnsDiscovery:
    port = extra.pop("port", 8080 if type != "SRV" else None)
    fields = {"min_refresh_ms": 100, "timeout_ms": 1_000, **extra}
    return DnsDiscovery(name=name, type=type, port=port, server=server, **fields)


class Watch:
    """A source running as the fleet runs it, with what it reported so far."""

    def __init__(self, source: DnsSource) -> None:
        self.source = source
        self.reports: list[list[Endpoint]] = []
        self.task: asyncio.Task[None] | None = None

    def report(self, endpoints: Sequence[Endpoint]) -> None:
        self.reports.append(list(endpoints))

    @property
    def last(self) -> list[Endpoint]:
        return self.reports[-1]

    async def until(self, condition: Callable[[], bool], what: str, within_s: float = 20) -> float:
        """Wait for ``condition``; returns how long it took (for the record, not asserted)."""
        started = time.monotonic()
        while not condition():
            assert self.task is not None
            if self.task.done():
                self.task.result()
                raise AssertionError(f"run() returned while waiting for {what}")
            if time.monotonic() - started > within_s:
                raise AssertionError(
                    f"no {what} within {within_s} s: {self.source!r} {self.reports}"
                )
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def __aenter__(self) -> Watch:
        self.task = asyncio.create_task(self.source.run(self.report))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.task is not None
        assert not self.task.done(), "run() must only end when cancelled"
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.source.aclose()


def watch(discovery: DnsDiscovery, **options: Any) -> Watch:
    return Watch(DnsSource(discovery, **options))


def at(*hosts: str, port: int = 8080, weight: int = 1, scheme: str = "http") -> list[Endpoint]:
    return [Endpoint(host, port, weight, scheme) for host in hosts]


# dnsmasq ----------------------------------------------------------------------------------


async def test_a_records_become_sorted_endpoints_on_the_port(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.4", "127.0.0.2", "127.0.0.3"]}))
    async with watch(spec(server.server, "echo.test", scheme="https")) as w:
        await w.until(lambda: w.source.reads >= 3, "three reads")
    assert w.reports == [at("127.0.0.2", "127.0.0.3", "127.0.0.4", scheme="https")]
    assert w.source.error is None
    assert w.reports[0][0].url() == "https://127.0.0.2:8080"


async def test_aaaa_record_of_loopback(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"six.test": ["::1"], "four.test": ["127.0.0.2"]}))
    async with watch(spec(server.server, "six.test", type="AAAA", port=9000)) as w:
        await w.until(lambda: bool(w.reports), "a report")
    assert w.last == [Endpoint("::1", 9000)]
    assert w.last[0].address() == "[::1]:9000"


async def test_srv_keeps_the_lowest_priority_group_with_its_weights(
    dnsmasq: StartDnsmasq,
) -> None:
    zone = Zone(
        hosts={
            "a.test": ["127.0.0.2"],
            "b.test": ["127.0.0.3", "127.0.0.4"],
            "c.test": ["127.0.0.5"],
        },
        srv=[
            Srv("_echo._tcp.test", "a.test", 8080, priority=10, weight=5),
            Srv("_echo._tcp.test", "b.test", 8081, priority=10, weight=0),  # "rarely": 1
            Srv("_echo._tcp.test", "c.test", 9000, priority=20, weight=100),  # a fallback
        ],
    )
    server = dnsmasq(zone)
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV")) as w:
        await w.until(lambda: bool(w.reports), "a report")
    assert w.last == [
        Endpoint("127.0.0.2", 8080, 5),
        Endpoint("127.0.0.3", 8081, 1),
        Endpoint("127.0.0.4", 8081, 1),
    ]


async def test_a_changed_record_is_reported_once_its_ttl_ends(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}, local_ttl=1))
    async with watch(spec(server.server, "echo.test", min_refresh_ms=100)) as w:
        await w.until(lambda: w.source.reads >= 2, "two reads")
        assert w.reports == [at("127.0.0.2")]  # an unchanged answer is not reported again
        server.set_hosts({"echo.test": ["127.0.0.3", "127.0.0.5"]})
        took = await w.until(lambda: w.last == at("127.0.0.3", "127.0.0.5"), "the new list")
    print(f"change seen {took:.2f} s after SIGHUP (TTL 1 s)")
    assert w.reports == [at("127.0.0.2"), at("127.0.0.3", "127.0.0.5")]


async def test_srv_records_changed_by_a_restart_on_the_same_port(dnsmasq: StartDnsmasq) -> None:
    zone = Zone(
        hosts={"a.test": ["127.0.0.2"], "b.test": ["127.0.0.3"]},
        srv=[Srv("_echo._tcp.test", "a.test", 8080)],
    )
    server = dnsmasq(zone)
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV")) as w:
        await w.until(lambda: bool(w.reports), "a report")
        server.set_srv([Srv("_echo._tcp.test", "b.test", 8081, weight=7)])
        await w.until(lambda: w.last == [Endpoint("127.0.0.3", 8081, 7)], "the new SRV set")


async def test_the_refresh_follows_the_ttl_within_its_clamps(dnsmasq: StartDnsmasq) -> None:
    """The wait after each read, seen through an injected sleep: no clock to race."""
    for ttl, expected in ((0, 0.25), (2, 2.0), (600, 3.0)):
        server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}, local_ttl=ttl))
        delays: list[float] = []

        async def sleep(delay: float, delays: list[float] = delays) -> None:
            delays.append(delay)
            if len(delays) >= 2:
                await asyncio.Event().wait()  # parked until the test cancels

        discovery = spec(server.server, "echo.test", min_refresh_ms=250, max_refresh_ms=3000)
        async with watch(discovery, sleep=sleep) as w:
            await w.until(lambda d=delays: len(d) >= 2, "two reads")  # type: ignore[misc]
        server.stop()
        assert delays == [expected, expected], f"TTL {ttl}"


async def test_a_removed_name_keeps_the_last_list_and_says_why(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2", "127.0.0.3"]}))
    async with watch(spec(server.server, "echo.test")) as w:
        await w.until(lambda: bool(w.reports), "a report")
        reads = w.source.reads
        server.set_hosts({"other.test": ["127.0.0.9"]})
        await w.until(lambda: w.source.error is not None, "an error")
        assert "NXDOMAIN" in w.source.error and "keeping the last 2 endpoints" in w.source.error  # type: ignore[operator]
        assert "\n" not in w.source.error  # type: ignore[operator]
        assert w.reports == [at("127.0.0.2", "127.0.0.3")]  # never an empty list
        assert w.source.reads == reads
        server.set_hosts({"echo.test": ["127.0.0.3"]})
        await w.until(lambda: w.source.error is None, "the error cleared")
        await w.until(lambda: w.last == at("127.0.0.3"), "the new list")


async def test_no_records_of_the_type_is_an_error_not_an_empty_list(
    dnsmasq: StartDnsmasq,
) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}))
    async with watch(spec(server.server, "echo.test", type="AAAA")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "NODATA" in w.source.error  # type: ignore[operator]
    assert w.reports == [] and w.source.reads == 0


async def test_a_name_outside_the_servers_zone_is_refused(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}))
    async with watch(spec(server.server, "echo.example")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "REFUSED" in w.source.error  # type: ignore[operator]


async def test_a_killed_server_keeps_the_list_and_recovers_on_the_same_port(
    dnsmasq: StartDnsmasq,
) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}))
    async with watch(spec(server.server, "echo.test", timeout_ms=500)) as w:
        await w.until(lambda: bool(w.reports), "a report")
        server.stop()
        await w.until(lambda: w.source.error is not None, "an error")
        assert server.server in w.source.error  # type: ignore[operator]
        assert w.reports == [at("127.0.0.2")]
        reads = w.source.reads
        server.start()
        await w.until(lambda: w.source.error is None, "recovery")
        assert w.source.reads > reads
    assert w.reports == [at("127.0.0.2")]  # the same answer as before: nothing new to report


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        # sendto() a broadcast address without SO_BROADCAST: the OS refuses (EACCES)
        pytest.param("255.255.255.255:53", "Permission denied", id="the OS will not send"),
        pytest.param("dns.invalid:53", "no DNS server to ask (dns.invalid:53)", id="server name"),
    ],
)
async def test_a_server_that_cannot_be_asked(server: str, expected: str) -> None:
    async with watch(spec(server, "echo.test", timeout_ms=300)) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert expected in w.source.error  # type: ignore[operator]
    assert w.reports == []


def test_importing_the_source_does_not_load_dnspython() -> None:
    code = "import sys, dispatcher.fleet.sources.dns; print('dns' in sys.modules)"
    ran = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert ran.stdout.strip() == "False"


# Scripted servers: what dnsmasq will not do -----------------------------------------------


def srv_without_additional(query: dns.message.Message, over_tcp: bool) -> bytes | None:
    question = query.question[0]
    name, rdtype = question.name.to_text(), dns.rdatatype.to_text(question.rdtype)
    if (name, rdtype) == ("_echo._tcp.test.", "SRV"):
        response = reply(
            query,
            "_echo._tcp.test. 30 IN SRV 0 0 8080 a.test.",
            "_echo._tcp.test. 30 IN SRV 0 65535 8081 b.test.",
            "_echo._tcp.test. 30 IN SRV 0 10 8082 gone.test.",
            "_echo._tcp.test. 30 IN SRV 5 10 9999 fallback.test.",
        )
    elif (name, rdtype) == ("a.test.", "A"):
        response = reply(query, "a.test. 30 IN A 127.0.0.2")
    elif name == "b.test." and rdtype == "AAAA":
        response = reply(query, "b.test. 30 IN AAAA ::1")
    elif name == "b.test.":
        response = reply(query)  # NODATA for A: the follow-up then asks AAAA
    else:
        response = reply(query, rcode=dns.rcode.NXDOMAIN)
    return wire_for(query, response, over_tcp)


async def test_srv_targets_missing_from_the_additional_section_are_looked_up(
    scripted_dns: StartScripted,
) -> None:
    server = await scripted_dns(srv_without_additional)
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV")) as w:
        await w.until(lambda: bool(w.reports), "a report")
    # weight 0 -> 1, 65535 -> 1000; gone.test does not resolve and had no address before
    assert w.last == [Endpoint("127.0.0.2", 8080, 1), Endpoint("::1", 8081, 1000)]
    asked = {(name, rdtype) for name, rdtype, _ in server.queries}
    assert {("a.test.", "A"), ("b.test.", "A"), ("b.test.", "AAAA")} <= asked
    assert ("fallback.test.", "A") not in asked  # the priority-5 group is never used
    assert w.source.error is None


async def test_an_srv_target_that_stops_resolving_keeps_its_last_addresses(
    scripted_dns: StartScripted,
) -> None:
    targets = ["a", "b"]  # changed in place while the source runs
    failing: set[str] = set()

    def handler(query: dns.message.Message, over_tcp: bool) -> bytes:
        question = query.question[0]
        name = question.name.to_text()
        if question.rdtype == dns.rdatatype.SRV:
            records = [f"{name} 1 IN SRV 0 1 8080 {t}.test." for t in targets]
            return reply(query, *records).to_wire()
        if name in failing:
            return reply(query, rcode=dns.rcode.SERVFAIL).to_wire()
        address = {"a.test.": "127.0.0.2", "b.test.": "127.0.0.3"}[name]
        return reply(query, f"{name} 1 IN A {address}").to_wire()

    server = await scripted_dns(handler)
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV")) as w:
        await w.until(lambda: bool(w.reports), "a report")
        assert w.last == at("127.0.0.2", "127.0.0.3")
        failing.add("a.test.")
        reads = w.source.reads
        await w.until(lambda: w.source.reads >= reads + 3, "three more reads")
        assert w.reports == [at("127.0.0.2", "127.0.0.3")]  # a.test kept, nothing reported
        assert w.source.error is None  # the read itself was good
        targets[:] = ["b"]  # a.test leaves the SRV set: its old address goes with it
        await w.until(lambda: w.last == at("127.0.0.3"), "a.test gone")


async def test_a_silent_server_times_out_and_cancelling_does_not_hang(
    scripted_dns: StartScripted,
) -> None:
    server = await scripted_dns(lambda query, over_tcp: None)
    async with watch(spec(server.server, "echo.test", timeout_ms=300)) as w:
        await w.until(lambda: w.source.error is not None, "an error")
        assert "no answer" in w.source.error and "300 ms" in w.source.error  # type: ignore[operator]
        started = time.monotonic()
    assert time.monotonic() - started < 5  # cancel lands mid-query; not a timing benchmark


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda query: b"\xde\xad\xbe\xef" * 40, id="garbage bytes"),
        pytest.param(
            lambda query: _with_id(
                reply(query, "echo.test. 30 IN A 127.0.0.66"), query.id ^ 0x5A5A
            ),
            id="mismatched id",
        ),
    ],
)
async def test_answers_that_are_not_answers_are_ignored_until_the_timeout(
    scripted_dns: StartScripted, answer: Callable[[dns.message.Message], bytes]
) -> None:
    server = await scripted_dns(lambda query, over_tcp: answer(query))
    async with watch(spec(server.server, "echo.test", timeout_ms=400)) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "no answer" in w.source.error  # type: ignore[operator]
    assert w.reports == []  # the spoofed 127.0.0.66 never got in


def _with_id(response: dns.message.Message, message_id: int) -> bytes:
    response.id = message_id
    return response.to_wire()


async def test_garbage_over_tcp_after_truncation_is_a_malformed_answer(
    scripted_dns: StartScripted,
) -> None:
    def handler(query: dns.message.Message, over_tcp: bool) -> bytes:
        if over_tcp:
            return b"\x00\x01garbage that is not a DNS message"
        return wire_for(
            query, reply(query, *(f"echo.test. 30 IN A 10.0.0.{i}" for i in range(200))), False
        )

    server = await scripted_dns(handler)
    async with watch(spec(server.server, "echo.test")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "malformed answer" in w.source.error  # type: ignore[operator]
    assert any(over_tcp for _, _, over_tcp in server.queries)


@pytest.mark.parametrize(
    ("rcode", "expected"), [(dns.rcode.SERVFAIL, "SERVFAIL"), (dns.rcode.REFUSED, "REFUSED")]
)
async def test_a_failing_rcode_is_the_error(
    scripted_dns: StartScripted, rcode: dns.rcode.Rcode, expected: str
) -> None:
    server = await scripted_dns(lambda query, over_tcp: reply(query, rcode=rcode).to_wire())
    async with watch(spec(server.server, "echo.test")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert expected in w.source.error  # type: ignore[operator]


async def test_a_server_answering_for_another_name_is_not_believed(
    scripted_dns: StartScripted,
) -> None:
    server = await scripted_dns(
        lambda query, over_tcp: reply(query, "evil.example. 30 IN A 127.0.0.66").to_wire()
    )
    async with watch(spec(server.server, "echo.test")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "NODATA" in w.source.error  # type: ignore[operator]
    assert w.reports == []


async def test_a_huge_answer_comes_by_tcp_and_is_bounded(scripted_dns: StartScripted) -> None:
    count = 3000  # ~48 kB: too big for UDP, fits one TCP message
    records = [f"echo.test. 30 IN A 10.0.{i // 250}.{i % 250 + 1}" for i in range(count)]
    # Parsed once: parsing 3,000 records took 0.4 s of the test's own event loop per query,
    # and on a busy machine more than the source's 1 s timeout, every time.
    answer = reply(dns.message.make_query("echo.test.", "A"), *records).answer

    def handler(query: dns.message.Message, over_tcp: bool) -> bytes:
        response = dns.message.make_response(query)
        response.answer = answer
        return wire_for(query, response, over_tcp)

    server = await scripted_dns(handler)
    async with watch(spec(server.server, "echo.test")) as w:
        await w.until(lambda: bool(w.reports), "a report")
    assert len(w.last) == MAX_ENDPOINTS
    assert w.last[0] == Endpoint("10.0.0.1", 8080) and w.last[-1] == Endpoint("10.0.3.250", 8080)
    assert w.source.dropped == count - MAX_ENDPOINTS
    assert "dropped=2000" in repr(w.source)


async def test_a_huge_srv_answer_does_not_become_thousands_of_queries(
    scripted_dns: StartScripted,
) -> None:
    def handler(query: dns.message.Message, over_tcp: bool) -> bytes:
        question = query.question[0]
        if question.rdtype == dns.rdatatype.SRV:
            records = [f"_echo._tcp.test. 30 IN SRV 0 1 {8000 + i} t{i}.test." for i in range(1500)]
            return wire_for(query, reply(query, *records), over_tcp)
        number = int(question.name.labels[0][1:])
        name = question.name.to_text()
        return reply(query, f"{name} 30 IN A 10.1.{number // 250}.{number % 250 + 1}").to_wire()

    server = await scripted_dns(handler)
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV", timeout_ms=5000)) as w:
        await w.until(lambda: bool(w.reports), "a report", within_s=60)
    follow_ups = [q for q in server.queries if q[1] == "A"]
    assert 0 < len(follow_ups) <= MAX_FOLLOW_UPS
    assert len(w.last) == MAX_FOLLOW_UPS


async def test_srv_records_that_all_say_no_service_are_an_error(
    scripted_dns: StartScripted,
) -> None:
    server = await scripted_dns(
        lambda query, over_tcp: reply(query, "_echo._tcp.test. 30 IN SRV 0 0 0 .").to_wire()
    )
    async with watch(spec(server.server, "_echo._tcp.test", type="SRV")) as w:
        await w.until(lambda: w.source.error is not None, "an error")
    assert "no usable SRV records" in w.source.error  # type: ignore[operator]


async def test_failures_back_off_from_min_refresh_to_a_cap(scripted_dns: StartScripted) -> None:
    server = await scripted_dns(
        lambda query, over_tcp: reply(query, rcode=dns.rcode.SERVFAIL).to_wire()
    )
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 12:
            await asyncio.Event().wait()

    discovery = spec(server.server, "echo.test", min_refresh_ms=1000, max_refresh_ms=600_000)
    async with watch(discovery, sleep=sleep) as w:
        await w.until(lambda: len(delays) >= 12, "twelve reads")
    assert delays[:3] == [1.0, 1.5, 2.25]
    assert delays == sorted(delays) and delays[-1] == FAILURE_CAP_S


async def test_a_report_that_raises_does_not_end_the_source(dnsmasq: StartDnsmasq) -> None:
    server = dnsmasq(Zone(hosts={"echo.test": ["127.0.0.2"]}))
    calls: list[list[Endpoint]] = []

    def flaky(endpoints: Sequence[Endpoint]) -> None:
        calls.append(list(endpoints))
        if len(calls) == 1:
            raise RuntimeError("the fleet had a bad moment")

    source = DnsSource(spec(server.server, "echo.test"))
    task = asyncio.create_task(source.run(flaky))
    try:
        deadline = time.monotonic() + 20
        while len(calls) < 2 and time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.02)
        assert calls == [at("127.0.0.2"), at("127.0.0.2")]  # reported again: it did not land
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# I/O-free parts ----------------------------------------------------------------------------


def test_refresh_schedule_clamps_ttls_and_backs_off() -> None:
    schedule = RefreshSchedule(min_s=0.5, max_s=10)
    assert [schedule.after_success(ttl) for ttl in (0, 3, 3600)] == [0.5, 3, 10]
    assert [schedule.after_failure() for _ in range(3)] == [0.5, 0.75, 1.125]
    assert schedule.after_success(0) == 0.5
    assert schedule.after_failure() == 0.5  # a good read resets the growth
    tight = RefreshSchedule(min_s=1, max_s=2)
    assert max(tight.after_failure() for _ in range(10)) == 2


def test_settle_sorts_merges_duplicates_and_bounds() -> None:
    endpoints = [
        Endpoint("127.0.0.10", 80, 600),
        Endpoint("127.0.0.9", 80),
        Endpoint("::1", 80),
        Endpoint("127.0.0.10", 80, 600),  # the same address twice: one instance, weights added
    ]
    settled, dropped = settle(endpoints)
    assert settled == [
        Endpoint("127.0.0.9", 80),
        Endpoint("127.0.0.10", 80, 1000),
        Endpoint("::1", 80),
    ]
    assert dropped == 0
    many = [Endpoint(f"10.0.{i // 256}.{i % 256}", 80) for i in range(MAX_ENDPOINTS + 5)]
    settled, dropped = settle(reversed(many))
    assert settled == many[:MAX_ENDPOINTS] and dropped == 5
