"""Instances from an etcd registry: every key under a prefix, read then watched.

The registry contract is ``providers.discovery``'s: one key ``<prefix>/<instance id>`` per
instance, on a lease the instance keeps alive, whose value is JSON ``{"url": …}`` (an
HTTP server) or ``{"address": "host:port"}`` (a gRPC one), optionally ``"weight"``.

etcd is reached through its v3 JSON gateway (``etcd_client.EtcdPrefix``, shared with the
registry of plugin entries), so no etcd client library is needed: a range read, in pages
of at most ``PAGE_KEYS`` keys at one revision (a prefix of any size is listed, each answer
under ``max_message_bytes``), then a watch from the read's revision + 1, so no change
between the read and the watch is lost. What a read finds replaces what was kept only
once every page is in: a read failing midway changes nothing.

Failures and what they do:

* etcd unreachable, slower than ``timeout_ms`` (connecting, reading the range, or
  creating the watch; each page of a read is bounded alone), an HTTP error, a body that is
  not the gateway's JSON, a watch line or a single key's value over ``max_message_bytes``,
  the watch stream ending, a page's revision compacted while the read goes on, a watch cancelled (e.g. its
  revision compacted): ``error`` says which in one line, the last list stays reported,
  and after ``retry_ms`` (growing by half each time, up to 8 times) the range is read again;
  a good read clears ``error``. The log gets one line when reads start failing and one
  when a read works again (``health.ReadHealth``), not one per retry.
* A value off the contract (not JSON, neither url nor address, a bad weight or scheme):
  that key is left out and named in ``skipped`` with the reason (never its value, which
  may hold anything); the other keys are reported.
* More than ``MAX_ENDPOINTS`` registrations: the first in key order are reported, the
  others counted in ``dropped`` and logged when some are first left out; one of those
  reported that leaves makes room for the next. A change past the first keys changes
  nothing reported, and is not reported (the keys are kept in order, not sorted again).
  Only the first keys are kept, not every registration under the prefix
  (``first_keys.FirstKeys``): when one of them leaves while some are past them, the
  prefix is read again to learn which comes next.
* More than ``MAX_ENDPOINTS`` keys off the contract: the first named in ``skipped`` (each
  logged once), the others only counted in ``unlisted`` and logged sparingly
  (``providers._log_lines.sparingly``): a prefix filled with junk costs neither memory nor
  a log line per key.

A watch that was created and then stays silent is a quiet registry, not a failure: etcd
sends nothing while nothing changes. A peer that dies closes the connection, which ends
the stream; a half-open connection is caught by TCP keepalive on the socket.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from dispatcher.fleet.sources import MAX_ENDPOINTS, InstanceSource, Report
from dispatcher.fleet.sources.etcd_client import (
    MAX_MESSAGE_BYTES,
    Change,
    EtcdPrefix,
    PrefixRead,
    RegistryFailure,
)
from dispatcher.fleet.sources.first_keys import FirstKeys
from dispatcher.fleet.sources.health import ReadHealth
from providers._log_lines import sparingly
from providers.discovery import Endpoint, RegistryDiscovery
from providers.tls import ClientTlsContext

__all__ = ["EtcdSource", "RegistryFailure", "parse_registration"]

log = logging.getLogger("dispatcher.fleet.sources.etcd")

_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_registration(value: bytes) -> Endpoint:
    """The endpoint of one registry value, or ``ValueError`` saying what is wrong with it.

    Messages never quote the value: a registry is written by many hands.
    """
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ValueError("the value is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the value is not a JSON object")
    weight = document.get("weight", 1)
    # bool is an int to Python, not a weight to anybody.
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
        raise ValueError("weight must be an integer from 1 to 1000")
    url, address = document.get("url"), document.get("address")
    if (url is None) == (address is None):
        raise ValueError('the value must hold exactly one of "url" and "address"')
    if url is not None:
        return _from_url(url, weight)
    return _from_address(address, weight)


def _from_url(url: Any, weight: int) -> Endpoint:
    if not isinstance(url, str):
        raise ValueError('"url" must be a string')
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError('"url" is not a valid URL') from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError('"url" must be http:// or https://')
    if not parts.hostname:
        raise ValueError('"url" names no host')
    if parts.username is not None or parts.password is not None:
        raise ValueError('"url" must not carry credentials')
    if parts.query or parts.fragment:
        raise ValueError('"url" must not carry a query or a fragment')
    return Endpoint(
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[parts.scheme],
        weight=weight,
        scheme=parts.scheme,
        path=parts.path.rstrip("/"),
    )


def _from_address(address: Any, weight: int) -> Endpoint:
    if not isinstance(address, str):
        raise ValueError('"address" must be a string')
    host, separator, port_text = address.rpartition(":")
    if "/" in host or any(c.isspace() for c in host):
        raise ValueError('"address" must be host:port')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError('"address" has brackets around something not IPv6') from None
    elif ":" in host:
        raise ValueError('"address" must put an IPv6 host in brackets: [::1]:50051')
    if not separator or not host:
        raise ValueError('"address" must be host:port')
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError('"address" must end in a port from 1 to 65535')
    return Endpoint(host=host, port=int(port_text), weight=weight)


@dataclass(slots=True)
class _Kept:
    """What a source keeps of the prefix: built afresh by each read, then swapped in."""

    #: The well-formed registrations reported: the first in key order. Kept to the bound
    #: of what is reported (MAX_ENDPOINTS), not every key under the prefix: whoever writes
    #: the prefix would choose how much of our memory it holds.
    found: FirstKeys[Endpoint] = field(default_factory=lambda: FirstKeys(MAX_ENDPOINTS))
    #: Keys left out because their value is off the contract, with the reason: at most
    #: MAX_ENDPOINTS of them, the same bound; the others are only counted in ``unlisted``
    #: (exact after a read; between reads, one that goes is not seen).
    skipped: dict[str, str] = field(default_factory=dict)
    unlisted: int = 0


class EtcdSource(InstanceSource):
    """Reports the instances registered under ``spec.prefix`` and watches for changes."""

    def __init__(
        self,
        spec: RegistryDiscovery,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(spec.describe())
        self._spec = spec
        self._etcd = EtcdPrefix(
            str(spec.etcd),
            spec.prefix,
            timeout=spec.timeout_ms / 1000,
            retry=spec.retry_ms / 1000,
            max_message_bytes=max_message_bytes,
            tls=None if spec.tls is None else ClientTlsContext(spec.tls),
            auth=spec.auth,
            idle_probe=spec.idle_probe_ms / 1000,
        )
        self._kept = _Kept()
        #: The list last reported (None: none yet), not reported again while it holds.
        self._reported: list[Endpoint] | None = None
        #: Overflows so far, what their log lines are spared by (``sparingly``): keys off
        #: the contract left unlisted, and reports that began to leave registrations out.
        self._unlisted_seen = 0
        self._drops_begun = 0
        #: Whether the last report left registrations out.
        self._dropping = False
        #: Keeps ``error`` and the read counters; logs an outage's start and end, once.
        self.health = ReadHealth(self, log)

    @property
    def dropped(self) -> int:
        """Well-formed registrations left out, beyond the first MAX_ENDPOINTS (exact after
        each read; between reads, ``first_keys`` says how it is counted)."""
        return self._kept.found.beyond

    @property
    def skipped(self) -> dict[str, str]:
        """Keys left out because their value is off the contract, with the reason."""
        return self._kept.skipped

    @property
    def unlisted(self) -> int:
        """Keys off the contract past the bound of ``skipped``, only counted."""
        return self._kept.unlisted

    async def run(self, report: Report) -> None:
        def on_read() -> PrefixRead:
            kept, logged = _Kept(), self._kept.skipped

            def page(values: list[tuple[str, bytes]]) -> None:
                for key, value in values:
                    self._put(kept, key, value, created=True, logged=logged.get(key))

            def done() -> None:
                self._kept = kept
                self._report(report)
                self.health.succeeded(len(kept.found))

            return PrefixRead(page, done)

        def on_change(changes: list[Change]) -> bool:
            read_again = False
            kept = self._kept
            for change in changes:
                if change.value is None:
                    read_again |= kept.found.remove(change.key)
                    kept.skipped.pop(change.key, None)
                else:
                    read_again |= self._put(kept, change.key, change.value, created=change.created)
            self._report(report)
            return read_again

        await self._etcd.follow(on_read, on_change, self._fail)

    def _fail(self, reason: str, delay: float) -> None:
        # Before its first read the source keeps nothing of its own: the fleet may call
        # what another fleet's source of this prefix listed (``FleetRuntime._inherit``),
        # and "keeping the last 0" would say it calls nobody.
        kept = self._reported is not None
        keeping = f"keeping the last {len(self._kept.found)} instance(s), " if kept else ""
        self.health.failed(f"{reason}; {keeping}reading again in {delay:.3g} s")

    def _report(self, report: Report) -> None:
        """Report the first ``MAX_ENDPOINTS`` instances in key order, unless that is the
        list reported last: a writer filling the prefix past the bound, a key at a time,
        would have the fleet go through the same list at each of its keys."""
        dropped = self.dropped
        if dropped and not self._dropping:  # not at each key more (``dropped`` counts)
            self._drops_begun += 1
            if sparingly(self._drops_begun):
                log.warning(
                    "registry %s: %d instances beyond the bound of %d ignored (the first"
                    " keys in order are used)",
                    self.name,
                    dropped,
                    MAX_ENDPOINTS,
                )
        self._dropping = dropped > 0
        listed = self._kept.found.values()
        if listed != self._reported:
            self._reported = listed
            report(listed)

    def _put(
        self, kept: _Kept, key: str, value: bytes, *, created: bool, logged: str | None = None
    ) -> bool:
        """Keep or skip ``key`` in ``kept``; True when a kept registration left and the
        prefix must be read again to know which takes its place. ``logged``: the reason
        this key was skipped for before a read (logged then, not again)."""
        try:
            endpoint = parse_registration(value)
        except ValueError as wrong:
            read_again = kept.found.remove(key)
            self._skip(kept, key, str(wrong), kept.skipped.get(key, logged))
            return read_again
        kept.skipped.pop(key, None)
        kept.found.put(key, endpoint, created=created)
        return False

    def _skip(self, kept: _Kept, key: str, reason: str, logged: str | None) -> None:
        if key not in kept.skipped and len(kept.skipped) >= MAX_ENDPOINTS:
            kept.unlisted += 1
            self._unlisted_seen += 1
            if sparingly(self._unlisted_seen):
                log.warning(
                    "registry %s: more than %d keys off the contract; the others are left"
                    " out and not listed (%d such keys so far)",
                    self.name,
                    MAX_ENDPOINTS,
                    self._unlisted_seen,
                )
            return
        if logged != reason:
            log.warning("registry %s: key %s left out: %s", self.name, key, reason)
        kept.skipped[key] = reason

    async def aclose(self) -> None:
        await self._etcd.aclose()

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        names = sorted(self.skipped)
        skipped = f" skipped={names[:3]}{'…' if len(names) > 3 else ''}" if names else ""
        dropped = f" dropped={self.dropped}" if self.dropped else ""
        skipped += f" ({len(names)})" if len(names) > 3 else ""
        skipped += f" unlisted={self.unlisted}" if self.unlisted else ""
        return (
            f"<EtcdSource {self.name} instances={len(self._kept.found)} reads={self.reads}"
            f"{dropped}{state}{skipped}>"
        )
