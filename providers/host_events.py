"""Host events on their way to one plugin (``Dispatcher.publish``), held until the plugin
takes them: at most ``HOST_EVENTS_HELD``, past that the oldest goes.

A host that publishes faster than a plugin's ``on_event`` takes events would otherwise
grow this queue without bound, in every binding that delivers host events (the gRPC and
subprocess ``Events`` stream, the in-process ``local`` inbox). The plugin's side of the
stream keeps the same rule for what it emits (``EVENTS_PER_STREAM``, docs/protocol.md):
events are notices, the newest worth the most; a caller that must not lose one makes a
call. The first drop of each run of them is logged, never one line per event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, TypeVar

__all__ = ["HOST_EVENTS_HELD", "HostEvents"]

log = logging.getLogger("dispatcher.providers")

#: Host events held for one plugin at most (the plugin side's ``EVENTS_PER_STREAM``).
HOST_EVENTS_HELD = 1024

T = TypeVar("T")


class HostEvents(asyncio.Queue[T | None], Generic[T]):
    """The host events held for one plugin, and ``None``, put by ``end``, after them."""

    def __init__(self, describe: str) -> None:
        super().__init__()
        #: Names the plugin in the log line about drops.
        self.describe = describe
        self.dropped = 0
        self._dropping = False

    def hold(self, event: T) -> None:
        """Hold ``event`` for the plugin; the oldest held goes when ``HOST_EVENTS_HELD`` are."""
        if self.qsize() >= HOST_EVENTS_HELD:
            self.get_nowait()
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "%s takes host events slower than they are published: dropping the"
                    " oldest past %d held (%d dropped so far)",
                    self.describe,
                    HOST_EVENTS_HELD,
                    self.dropped,
                )
        else:
            self._dropping = False  # caught up: the next drop is said again
        self.put_nowait(event)

    def end(self) -> None:
        """No more events: the reader stops at this mark, after those held."""
        self.put_nowait(None)

    def __repr__(self) -> str:
        return f"<HostEvents {self.describe} held={self.qsize()} dropped={self.dropped}>"
