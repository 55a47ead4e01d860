"""How many events a second one plugin connection's event stream delivers to the host.

Memory is bounded elsewhere (a gRPC stream by its flow control, a WebSocket by the size of
a message); the rate is what bounds the host's CPU: an event over it is dropped before its
data is decoded or a handler looks at it, and counted. The WebSocket binding and the gRPC
``Events`` stream (of ``provider: grpc`` and ``subprocess`` targets) bound their plugins'
events alike, with ``max_events_per_second``: a token bucket of that rate whose burst is
one second of it. What it drops it counts (``dropped``) and logs sparingly, in the same
words on both bindings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from providers._log_lines import sparingly

__all__ = ["DEFAULT_MAX_EVENTS_PER_SECOND", "EventRate"]

#: A target's ``max_events_per_second`` unless it sets one.
DEFAULT_MAX_EVENTS_PER_SECOND = 10_000


class EventRate:
    """A token bucket: ``rate`` events a second, bursts of ``rate``; ``take`` says whether
    one more event fits, ``admit`` also counts and logs one that does not. ``describe``
    names the plugin's connection in that log line, written to ``log``. ``clock``:
    seconds, monotonic (tests pass their own)."""

    __slots__ = ("_clock", "_describe", "_last", "_log", "_rate", "_tokens", "dropped")

    def __init__(
        self,
        rate: float,
        describe: str = "a plugin",
        log: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._tokens = rate
        self._clock = clock
        self._last = clock()
        self._describe = describe
        self._log = log if log is not None else logging.getLogger("dispatcher.providers")
        #: Events ``admit`` refused: beyond the rate, dropped.
        self.dropped = 0

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def admit(self) -> bool:
        """``take``; an event it refuses is counted and logged sparingly."""
        if self.take():
            return True
        self.dropped += 1
        if sparingly(self.dropped):
            self._log.warning(
                "%s sends events faster than max_events_per_second; %d dropped",
                self._describe,
                self.dropped,
            )
        return False

    def __repr__(self) -> str:
        return f"<EventRate {self._rate:g}/s tokens={self._tokens:.0f} dropped={self.dropped}>"
