"""How many events a second one plugin connection's event stream delivers to the host.

Memory is bounded elsewhere (a gRPC stream by its flow control, a WebSocket by the size of
a message); the rate is what bounds the host's CPU: an event over it is dropped before its
data is decoded or a handler looks at it, and counted. The WebSocket binding and the gRPC
``Events`` stream (of ``provider: grpc`` and ``subprocess`` targets) bound their plugins'
events alike, with ``max_events_per_second``: a token bucket of that rate whose burst is
one second of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["DEFAULT_MAX_EVENTS_PER_SECOND", "EventRate"]

#: A target's ``max_events_per_second`` unless it sets one.
DEFAULT_MAX_EVENTS_PER_SECOND = 10_000


class EventRate:
    """A token bucket: ``rate`` events a second, bursts of ``rate``; ``take`` says whether
    one more event fits. ``clock``: seconds, monotonic (tests pass their own)."""

    __slots__ = ("_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._tokens = rate
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def __repr__(self) -> str:
        return f"<EventRate {self._rate:g}/s tokens={self._tokens:.0f}>"
