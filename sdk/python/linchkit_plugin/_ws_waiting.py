"""The connections of ``WebSocketPluginServer`` that have not sent a whole head yet: at
most ``MAX_WAITING`` at once, the oldest closed to make room for a new one.

A socket that never sends a byte, or a head dripped one byte at a time, costs a
descriptor, a task and buffers until its head deadline; before this bound a peer could
hold any number of them. Closing the oldest rather than the newest keeps the server
reachable while the flood goes on: a dispatcher's upgrade is complete within a round
trip, long before a hundred newer connections push it out, whereas idle sockets are
pushed out by the flood itself.

aiohttp calls its ``Server``'s ``connection_made`` and ``connection_lost`` for every
connection; ``watch`` wraps the two on the runner's server (aiohttp has no other hook that
sees a connection before its head), and the server's handler says when a head is complete
(``taken``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["HEADER_TIMEOUT", "MAX_WAITING", "WaitingConnections"]

#: Connections waiting for their head at once. A dispatcher dials a plugin once per host,
#: and its head follows its connection within a round trip: a hundred waiting is a flood.
MAX_WAITING = 100
#: Seconds from a connection's opening to its whole head, as ``dispatcher-plugin serve``'s
#: ``--header-timeout`` (``ServerLimits.header_timeout``).
HEADER_TIMEOUT = 10.0


class WaitingConnections:
    """Connections opened and not yet past their head, oldest first."""

    def __init__(self, most: int = MAX_WAITING) -> None:
        if most < 1:
            raise ValueError(f"max_waiting must be at least 1, not {most}")
        self.most = most
        #: handler -> nothing, in the order the connections opened (dicts keep it).
        self._waiting: dict[Any, None] = {}
        self.pushed_out = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def watch(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            made(handler, transport)
            self.opened(handler)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self.taken(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def opened(self, handler: Any) -> None:
        """A connection opened: it waits, and the oldest waiting closes past ``most``."""
        self._waiting[handler] = None
        if len(self._waiting) > self.most:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self.pushed_out += 1
            oldest.force_close()

    def taken(self, handler: Any) -> None:
        """``handler``'s head is complete, or its connection is gone: it waits no more."""
        self._waiting.pop(handler, None)

    def __repr__(self) -> str:
        return f"waiting={len(self._waiting)}/{self.most} pushed_out={self.pushed_out}"
