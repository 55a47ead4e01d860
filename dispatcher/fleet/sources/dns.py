"""Instances from DNS: the A/AAAA records of a name (with a port), or its SRV records.

``DnsSource`` resolves ``DnsDiscovery.name`` against ``server`` (UDP, then TCP when the
answer is truncated) or the system's resolvers, reports the endpoints, and resolves again
when the answer's TTL ends, clamped to ``[min_refresh_ms, max_refresh_ms]`` (dnsmasq's
local records have TTL 0: without the floor the source would ask in a loop).

* A/AAAA: one endpoint per address, on ``port``.
* SRV: only the lowest-priority group (RFC 2782: the others are fallbacks, which a fleet
  already gets from its own failover), weight from the record (0, "rarely", becomes 1;
  above 1000 becomes 1000), host the target's address from the additional section or a
  follow-up A query (AAAA when the target has no A record). A target whose follow-up fails
  keeps the addresses it had on the last good read.

Failures map to one line in ``error``; the last list stays reported (a DNS mistake must not
drain a fleet), and the source asks again after ``min_refresh_ms``, growing 1.5x per failure
up to 30 s (or ``max_refresh_ms`` if lower). The log gets a line when reads start failing
and one when they work again (``health.ReadHealth``), not one per read:

    timeout             no answer within timeout_ms (also: the server is down, since the
                        UDP refusal does not surface; or every UDP reply was garbage or not
                        an answer to our query, which dnspython drops, as it should)
    NXDOMAIN / NODATA   the name does not exist / has no records of the type
    SERVFAIL, REFUSED…  the server's rcode
    OS errors           the OS refused to send (network unreachable, a broadcast address)
    malformed answer    a TCP answer that does not parse
    no usable records   SRV records that all say "no service" (target "." or port 0)

dnspython (``dns.asyncresolver``) is the vendor SDK; it appears in this module only and is
imported when a source first runs, so importing the dispatcher does not load it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.fleet.sources import MAX_ENDPOINTS, InstanceSource, Report
from dispatcher.fleet.sources.health import ReadHealth
from providers.discovery import DnsDiscovery, Endpoint

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.message
    import dns.name

__all__ = ["MAX_ENDPOINTS", "DnsSource", "RefreshSchedule"]

log = logging.getLogger("dispatcher.fleet.dns")

#: SRV targets resolved by a follow-up query per read, and how many at once: a huge SRV
#: answer without an additional section must not turn into thousands of queries.
MAX_FOLLOW_UPS = 64
FOLLOW_UP_CONCURRENCY = 8
#: Failures back off from min_refresh_ms by this factor up to FAILURE_CAP_S.
FAILURE_GROWTH = 1.5
FAILURE_CAP_S = 30.0
#: EDNS payload size: the common safe size (DNS flag day 2020); bigger answers come by TCP.
EDNS_PAYLOAD = 1232
#: Messages in ``error`` are one line; a hostile server's text must not flood health output.
MAX_ERROR_CHARS = 300

Sleep = Callable[[float], Awaitable[None]]


class LookupFailed(Exception):
    """One read got no usable answer; the message is what ``error`` says."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one good read found: the endpoints and how long the answer may be kept."""

    endpoints: list[Endpoint]
    ttl_s: float
    #: Why the read is not complete (endpoints beyond the bound, unresolved SRV targets).
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class RefreshSchedule:
    """When to read again: I/O-free, so its clamps and backoff are tested without waiting."""

    min_s: float
    max_s: float
    failures: int = field(default=0)

    @classmethod
    def of(cls, spec: DnsDiscovery) -> RefreshSchedule:
        return cls(min_s=spec.min_refresh_ms / 1000, max_s=spec.max_refresh_ms / 1000)

    def after_success(self, ttl_s: float) -> float:
        self.failures = 0
        return min(max(ttl_s, self.min_s), self.max_s)

    def after_failure(self) -> float:
        cap = max(self.min_s, min(self.max_s, FAILURE_CAP_S))
        delay = min(cap, self.min_s * FAILURE_GROWTH**self.failures)
        self.failures += 1
        return delay


def settle(endpoints: Iterable[Endpoint]) -> tuple[list[Endpoint], int]:
    """Sorted, one endpoint per address (weights of duplicates added, capped), bounded.

    Returns the list and how many endpoints the bound dropped.
    """
    merged: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        key = (endpoint.host, endpoint.port)
        seen = merged.get(key)
        if seen is not None:
            weight = min(1000, seen.weight + endpoint.weight)
            endpoint = Endpoint(endpoint.host, endpoint.port, weight, endpoint.scheme)
        merged[key] = endpoint
    ordered = sorted(merged.values(), key=_sort_key)
    return ordered[:MAX_ENDPOINTS], max(0, len(ordered) - MAX_ENDPOINTS)


def _sort_key(endpoint: Endpoint) -> tuple[int, bytes, int]:
    address = ipaddress.ip_address(endpoint.host)
    return address.version, address.packed, endpoint.port


def srv_weight(weight: int) -> int:
    """RFC 2782's weight 0 means "rarely", not "never"; our weights are 1..1000."""
    return min(1000, max(1, weight))


def one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 1] + "…"


class DnsSource(InstanceSource):
    """Resolves one ``DnsDiscovery`` again at each TTL and reports its endpoints."""

    def __init__(self, spec: DnsDiscovery, *, sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(spec.describe())
        self.spec = spec
        #: The last list reported; kept through failures.
        self.endpoints: list[Endpoint] = []
        #: Endpoints the last good read dropped (beyond MAX_ENDPOINTS).
        self.dropped = 0
        self._sleep = sleep
        #: Keeps ``error`` and the read counters; logs an outage's start and end, once.
        self.health = ReadHealth(self, log)
        self._schedule = RefreshSchedule.of(spec)
        self._reported = False
        self._resolver: dns.asyncresolver.Resolver | None = None
        #: SRV target -> its addresses at the last good read, for a follow-up that fails.
        self._target_addresses: dict[dns.name.Name, list[str]] = {}

    async def run(self, report: Report) -> None:
        while True:
            try:
                delay = await self._read_once(report)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end discovery, nor drain the fleet
                log.exception("%s: unexpected failure", self.name)
                self.health.failed(one_line(f"unexpected {type(exc).__name__}: {exc}"))
                delay = self._schedule.after_failure()
            await self._sleep(delay)

    async def _read_once(self, report: Report) -> float:
        """One read and its report; returns how long to wait before the next."""
        try:
            lookup = await self._lookup()
        except LookupFailed as exc:
            # Build the resolver again next time: /etc/resolv.conf may have changed, or the
            # address of a server given by name.
            self._resolver = None
            kept = f"; keeping the last {len(self.endpoints)} endpoints" if self._reported else ""
            self.health.failed(one_line(f"{exc}{kept}"))
            return self._schedule.after_failure()
        endpoints, dropped = settle(lookup.endpoints)
        notes = list(lookup.notes)
        if dropped:
            notes.append(f"{dropped} endpoints beyond the bound of {MAX_ENDPOINTS} ignored")
        if notes and (dropped != self.dropped or endpoints != self.endpoints):
            log.warning("%s: %s", self.name, "; ".join(notes))
        self.dropped = dropped
        if not self._reported or endpoints != self.endpoints:
            report(endpoints)
            self.endpoints = endpoints
            self._reported = True
        self.health.succeeded(len(endpoints))
        return self._schedule.after_success(lookup.ttl_s)

    async def _lookup(self) -> Lookup:
        import dns.exception

        timeout_s = self.spec.timeout_ms / 1000
        resolver = await self._get_resolver()
        try:
            if self.spec.type == "SRV":
                return await self._lookup_srv(resolver, timeout_s)
            return await self._lookup_addresses(resolver, timeout_s)
        except dns.exception.DNSException as exc:
            raise LookupFailed(self._explain(exc)) from exc

    async def _lookup_addresses(
        self, resolver: dns.asyncresolver.Resolver, timeout_s: float
    ) -> Lookup:
        answer = await resolver.resolve(self.spec.name, self.spec.type, lifetime=timeout_s)
        port = self.spec.port
        assert port is not None  # DnsDiscovery requires it for A/AAAA
        endpoints = [Endpoint(record.address, port, scheme=self.spec.scheme) for record in answer]
        return Lookup(endpoints, answer.chaining_result.minimum_ttl)

    async def _lookup_srv(self, resolver: dns.asyncresolver.Resolver, timeout_s: float) -> Lookup:
        import dns.name

        answer = await resolver.resolve(self.spec.name, "SRV", lifetime=timeout_s)
        ttl = float(answer.chaining_result.minimum_ttl)
        # Target "." or port 0 says "no service here" (RFC 2782); such a record is no instance.
        records = [r for r in answer if r.port > 0 and r.target != dns.name.root]
        if not records:
            raise LookupFailed(
                f"{self.spec.name}: no usable SRV records (all target '.' or port 0)"
            )
        lowest = min(r.priority for r in records)
        group = sorted(
            (r for r in records if r.priority == lowest), key=lambda r: (r.target, r.port)
        )[:MAX_ENDPOINTS]
        known, additional_ttl = _addresses_in(answer.response, {r.target for r in group})
        if additional_ttl is not None:
            ttl = min(ttl, additional_ttl)
        missing = sorted({r.target for r in group} - known.keys())
        notes: list[str] = []
        followed, follow_ttl, unresolved = await self._follow_up(
            resolver, missing[:MAX_FOLLOW_UPS], timeout_s
        )
        # Beyond the follow-up bound a target is "not asked": its last addresses still count.
        unresolved.update(dict.fromkeys(missing[MAX_FOLLOW_UPS:], "not asked"))
        known.update(followed)
        if follow_ttl is not None:
            ttl = min(ttl, follow_ttl)
        kept: list[str] = []
        lost: list[str] = []
        for target, why in unresolved.items():
            previous = self._target_addresses.get(target)
            if previous:
                known[target] = previous
            (kept if previous else lost).append(f"{target} ({why})")
        if kept:
            notes.append(f"{len(kept)} SRV targets kept their last addresses: {_few(kept)}")
        if lost:
            notes.append(f"{len(lost)} SRV targets without addresses: {_few(lost)}")
        endpoints = [
            Endpoint(address, r.port, srv_weight(r.weight), self.spec.scheme)
            for r in group
            for address in known.get(r.target, ())
        ]
        if not endpoints:
            why = "; ".join(notes) or "no addresses"
            raise LookupFailed(f"{self.spec.name}: no SRV target resolved: {why}")
        self._target_addresses = known  # only the current targets: bounded by the group
        return Lookup(endpoints, ttl, tuple(notes))

    async def _follow_up(
        self,
        resolver: dns.asyncresolver.Resolver,
        targets: Sequence[dns.name.Name],
        timeout_s: float,
    ) -> tuple[dict[dns.name.Name, list[str]], float | None, dict[dns.name.Name, str]]:
        """Addresses of SRV targets the additional section did not give: A, else AAAA."""
        import dns.exception
        import dns.resolver

        found: dict[dns.name.Name, list[str]] = {}
        unresolved: dict[dns.name.Name, str] = {}
        ttls: list[float] = []
        limit = asyncio.Semaphore(FOLLOW_UP_CONCURRENCY)

        async def one(target: dns.name.Name) -> None:
            async with limit:
                try:
                    try:
                        answer = await resolver.resolve(target, "A", lifetime=timeout_s)
                    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                        answer = await resolver.resolve(target, "AAAA", lifetime=timeout_s)
                except dns.exception.DNSException as exc:
                    unresolved[target] = self._explain(exc, target.to_text(), "A/AAAA")
                    return
                found[target] = [record.address for record in answer]
                ttls.append(answer.chaining_result.minimum_ttl)

        # Follow-ups share one more timeout: a read never takes much more than two.
        try:
            async with asyncio.timeout(timeout_s * 1.5):
                await asyncio.gather(*(one(target) for target in targets))
        except TimeoutError:
            for target in targets:
                if target not in found:
                    unresolved.setdefault(target, "timed out")
        return found, (min(ttls) if ttls else None), unresolved

    async def _get_resolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver
        import dns.nameserver
        import dns.resolver

        if self._resolver is not None:
            return self._resolver
        address = self.spec.server_address()
        try:
            if address is None:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                async with asyncio.timeout(self.spec.timeout_ms / 1000):
                    host = await _numeric_host(*address)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(host, address[1])]
        except TimeoutError as exc:
            raise LookupFailed(
                f"no DNS server to ask ({self.spec.server}): its name did not resolve within {self.spec.timeout_ms} ms"
            ) from exc
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise LookupFailed(
                one_line(
                    f"no DNS server to ask ({self.spec.server or 'system resolvers'}): {reason}"
                )
            ) from exc
        resolver.timeout = resolver.lifetime = self.spec.timeout_ms / 1000
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.cache = None  # the TTL schedule is ours; a cache would hide changes
        self._resolver = resolver
        return resolver

    def _explain(self, exc: Exception, name: str | None = None, rdtype: str | None = None) -> str:
        """One line for a dnspython failure: what happened, to which name, at which server."""
        import dns.resolver

        name = name or self.spec.name
        rdtype = rdtype or self.spec.type
        server = self.spec.server or "the system's resolvers"
        if isinstance(exc, dns.resolver.NXDOMAIN):
            return f"{name}: NXDOMAIN (no such name) at {server}"
        if isinstance(exc, dns.resolver.NoAnswer):
            return f"{name}: no {rdtype} records (NODATA) at {server}"
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            return f"{name}: no answer from {server} within {self.spec.timeout_ms} ms"
        if isinstance(exc, dns.resolver.NoNameservers):
            errors = exc.kwargs.get("errors") or []
            why = sorted({_server_error(error[3]) for error in errors}) or ["no server answered"]
            return one_line(f"{name}: {', '.join(why)} (asking {server})")
        return one_line(f"{name}: {type(exc).__name__}: {exc} ({server})")

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        dropped = f" dropped={self.dropped}" if self.dropped else ""
        return (
            f"<DnsSource {self.name} endpoints={len(self.endpoints)} reads={self.reads}"
            f"{dropped}{state}>"
        )


def _addresses_in(
    response: dns.message.Message, targets: set[dns.name.Name]
) -> tuple[dict[dns.name.Name, list[str]], float | None]:
    """Addresses of ``targets`` in an answer's additional section, A preferred over AAAA:
    one family per target, so a dual-stack target does not take twice its share."""
    import dns.rdatatype

    found: dict[dns.name.Name, list[str]] = {}
    ttls: list[float] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        for rrset in response.additional:
            if rrset.rdtype == rdtype and rrset.name in targets and rrset.name not in found:
                found[rrset.name] = [record.address for record in rrset]
                ttls.append(rrset.ttl)
    return found, (min(ttls) if ttls else None)


def _few(items: Sequence[str], shown: int = 3) -> str:
    """The first few of a list for a log line or an error, and how many more there are."""
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _server_error(error: object) -> str:
    """One of NoNameservers' per-server errors: an rcode's text or an exception."""
    import dns.exception

    if isinstance(error, str):
        return error  # the rcode: SERVFAIL, REFUSED, NOTIMP…
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    if isinstance(error, dns.exception.FormError | EOFError):
        return f"malformed answer ({type(error).__name__})"
    return type(error).__name__


async def _numeric_host(host: str, port: int) -> str:
    """dnspython asks servers by address; a server given by name is looked up once."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return str(infos[0][4][0])
