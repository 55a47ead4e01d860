"""How many connections one port holds, in total and per peer, and which it refuses.

``ConnectionLimit`` is I/O-free: the listener (``dispatcher.gateway.listener``) asks it
to ``admit`` each connection it accepts, by its peer's address, and gets a ``Seat`` back,
which the connection's protocol releases when the connection closes, or the reason the
connection is refused:

    reason (``refused[reason]``)    when
    max_connections                 the port holds ``max_connections`` already
    max_connections_per_peer        the peer holds ``connections_per_peer`` already

A peer is an IP address; an IPv6 peer is its /64, since a host is usually given a whole
/64 and could otherwise open each connection from another address of it. An IPv4 address
mapped into IPv6 (``::ffff:192.0.2.1``, a dual-stack socket) is the IPv4 peer. Loopback
peers are peers like any other: a sidecar or a proxy on the same host counts as one.

Refusals are logged in one line at WARNING at most every ``LOG_INTERVAL`` seconds, saying
how many were refused since the last line and why, never a line per connection: a flood
of connections must not become a flood of log lines. Those refused after a line are said
when the interval ends (the listener's timer calls ``flush``), not at the next refusal,
which may come minutes later or never: the first of a burst of 1,122 was logged alone, and
the other 1,121 waited for the next burst. ``Dispatcher.telemetry``'s metrics
export the counts (``dispatcher.telemetry.metrics.ConnectionsCollector``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["LOG_INTERVAL", "REASONS", "ConnectionLimit", "Refusal", "Seat", "peer_of"]

log = logging.getLogger("dispatcher.gateway")

Refusal = Literal["max_connections", "max_connections_per_peer"]
REASONS: tuple[Refusal, ...] = ("max_connections", "max_connections_per_peer")
#: Seconds between two log lines about refused connections.
LOG_INTERVAL = 10.0


def peer_of(address: Any) -> str:
    """The peer a socket address (``getpeername``'s) counts against: its IP address, or
    an IPv6 address's /64. Anything else (a Unix socket's path) is one peer, ``local``."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return "local"
    host = address[0]
    if ":" not in host:  # IPv4, the common case: no parsing
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])  # without a zone (fe80::1%eth0)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Seat:
    """An admitted connection's place in its port's counts, given back once by
    ``release`` (again: nothing), by whichever protocol serves the connection when it
    closes, or by the listener when it never got one."""

    __slots__ = ("_limit", "peer")

    def __init__(self, limit: ConnectionLimit, peer: str) -> None:
        self._limit: ConnectionLimit | None = limit
        self.peer = peer

    def release(self) -> None:
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.released(self.peer)

    def __repr__(self) -> str:
        return f"<Seat {self.peer} {'held' if self._limit is not None else 'released'}>"


class ConnectionLimit:
    """The open connections of one port, in total and per peer, against their limits."""

    def __init__(
        self,
        port: str,
        *,
        most: int,
        most_per_peer: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= most_per_peer <= most:
            raise ValueError(f"most_per_peer must be in [1, {most}], not {most_per_peer}")
        #: What the log line calls the port: ``HTTP``.
        self.port = port
        self.most = most
        self.most_per_peer = most_per_peer
        self._clock = clock
        self.open = 0
        #: Open connections by peer; a peer with none is not kept.
        self.by_peer: dict[str, int] = {}
        #: Connections refused since the start, by reason.
        self.refused: dict[Refusal, int] = dict.fromkeys(REASONS, 0)
        self._logged: dict[Refusal, int] = dict.fromkeys(REASONS, 0)
        #: Seconds between two log lines about refused connections.
        self.log_interval = LOG_INTERVAL
        self._next_log = -float("inf")
        self._last_refused_peer = ""

    def admit(self, peer: str) -> Seat | Refusal:
        """A seat for a new connection from ``peer``, or why it is refused (counted)."""
        held = self.by_peer.get(peer, 0)
        refusal: Refusal | None = None
        if self.open >= self.most:
            refusal = "max_connections"
        elif held >= self.most_per_peer:
            refusal = "max_connections_per_peer"
            self._last_refused_peer = peer
        if refusal is not None:
            self.refused[refusal] += 1
            if self._clock() >= self._next_log:
                self.flush()
            return refusal
        self.open += 1
        self.by_peer[peer] = held + 1
        return Seat(self, peer)

    def released(self, peer: str) -> None:
        """A connection of ``peer`` closed (``Seat.release`` calls it, once per seat)."""
        self.open -= 1
        held = self.by_peer[peer] - 1
        if held:
            self.by_peer[peer] = held
        else:
            del self.by_peer[peer]

    @property
    def unlogged(self) -> int:
        """Connections refused since the last log line."""
        return sum(self.refused[reason] - self._logged[reason] for reason in REASONS)

    def log_due_in(self) -> float:
        """Seconds until the next log line may be written (0: now)."""
        return max(0.0, self._next_log - self._clock())

    def flush(self) -> None:
        """Log the refusals since the last line, if any (the listener calls it when the
        interval ends, so that a burst's count does not wait for the next refusal)."""
        if not self.unlogged:
            return
        self._next_log = self._clock() + self.log_interval
        counts = {reason: self.refused[reason] - self._logged[reason] for reason in REASONS}
        self._logged = dict(self.refused)
        parts = []
        if counts["max_connections"]:
            parts.append(
                f"{counts['max_connections']} with the port at max_connections ({self.most})"
            )
        if counts["max_connections_per_peer"]:
            parts.append(
                f"{counts['max_connections_per_peer']} from peers at max_connections_per_peer"
                f" ({self.most_per_peer}; the latest {self._last_refused_peer})"
            )
        log.warning(
            "refused %d new connection(s) on the %s port since the last such line (at most"
            " one each %g s): %s; %d open now from %d peer(s)",
            sum(counts.values()),
            self.port,
            self.log_interval,
            ", ".join(parts),
            self.open,
            len(self.by_peer),
        )

    def stats(self) -> dict[str, Any]:
        """Open connections, the limits, refusals by reason (the metrics read it)."""
        return {
            "open": self.open,
            "max": self.most,
            "max_per_peer": self.most_per_peer,
            "peers": len(self.by_peer),
            "refused": dict(self.refused),
        }

    def __repr__(self) -> str:
        refused = sum(self.refused.values())
        return (
            f"<ConnectionLimit {self.port} open={self.open}/{self.most}"
            f" peers={len(self.by_peer)} per_peer={self.most_per_peer} refused={refused}>"
        )
