"""Whether a plugin's frames still come whole (``ReadWatch``).

aiohttp puts its heartbeat's ping off with every byte it receives, and takes the pings
and pongs sent between the fragments of a message as signs of life: a plugin trickling a
frame (a byte at a time, or fragments with pings between) would hold the connection's
reader, and every call on it, for as long as its frame takes. A receive timeout on the
socket bounded the first (not the second: a pong restarted it), at the price of a timer
per message: 3.7 µs of CPU per call at concurrency 64, a seventh of the channel's own.

Instead one timer per connection looks, every ``bound`` seconds, at how many whole data
frames came since its last look. None since: the plugin is sent a health probe, which it
answers with a whole frame (``docs/protocol.md``); still none at the next look: it is
dropped. So a plugin busy with a long frame has between one and two bounds to finish it,
an idle one is probed once a bound, and counting a frame costs an addition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["ReadWatch"]


class ReadWatch:
    """Counts the whole frames a connection reads (``frames``); calls ``probe`` after a
    bound without one, ``stalled`` after another."""

    __slots__ = ("_bound", "_handle", "_loop", "_probe", "_probing", "_seen", "_stalled", "frames")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bound: float,
        *,
        probe: Callable[[], None],
        stalled: Callable[[], None],
    ) -> None:
        self.frames = 0
        self._seen = 0
        self._probing = False
        self._bound = bound
        self._loop = loop
        self._probe = probe
        self._stalled = stalled
        self._handle: asyncio.TimerHandle | None = None

    @property
    def bound(self) -> float:
        """Seconds between two looks."""
        return self._bound

    @property
    def watching(self) -> bool:
        """Whether a look is due: started, and neither stopped nor stalled since."""
        return self._handle is not None

    def start(self) -> None:
        """Look every ``bound`` seconds from now on (the reader starts reading)."""
        if self._handle is None:
            self._handle = self._loop.call_later(self._bound, self._look)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _look(self) -> None:
        if self.frames != self._seen:
            self._seen = self.frames
            self._probing = False
        elif not self._probing:
            self._probing = True
            self._probe()
        else:
            self._handle = None
            self._stalled()
            return
        self._handle = self._loop.call_later(self._bound, self._look)

    def __repr__(self) -> str:
        return f"<ReadWatch frames={self.frames} probing={self._probing} bound={self._bound:g}s>"
