"""The plugin's events on their way to the hosts connected over WebSocket
(``linchkit_plugin.ws_server``), in both modes: served, and dialling a gateway.

Events the plugin emits while no host is connected wait in a bounded ``EventOutbox``
(the oldest dropped beyond its limit) and go out when a host connects, followed by a
``dropped`` frame with the count lost, if any.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.wire import encode_result, event_name_refused
from linchkit_plugin.ws_protocol import encode_frame

__all__ = ["EventOutbox", "EventReceiver"]

log = logging.getLogger("linchkit_plugin.websocket")


class EventReceiver(Protocol):
    """One connection's side of the outbox: ``linchkit_plugin.ws_server.PluginSession``."""

    def queue_event(self, frame: bytes, event: str = "", *, droppable: bool = True) -> None:
        """Send ``frame`` (an encoded ``event`` frame, or the ``dropped`` frame, which is not
        ``droppable``; ``event``: an event's name, for the log); never blocks."""


class EventOutbox:
    """The plugin's events on their way to every connected host.

    With no host connected they wait, at most ``limit`` of them (then the oldest go and
    are counted in ``dropped``); the next session takes them and reports the count.
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        #: Each event waiting: its name and its frame.
        self._waiting: deque[tuple[str, bytes]] = deque(maxlen=limit)
        self.dropped = 0
        self._sessions: set[EventReceiver] = set()

    def emit(self, event: str, data: Any) -> None:
        """The plugin's ``emit``: synchronous, never blocks; an event JSON cannot carry is
        logged and dropped."""
        if event_name_refused(event):
            return
        try:
            frame = encode_result(
                {"type": "event", "event": event, "data": data}, f"the data of event {event!r:.80}"
            )
        except ProviderError as error:
            log.warning("event %r not sent: %s", event, error.message)
            return
        if not self._sessions:
            if len(self._waiting) == self._waiting.maxlen:
                self.dropped += 1
            self._waiting.append((event, frame))
            return
        for session in self._sessions:
            session.queue_event(frame, event)

    def join(self, session: EventReceiver) -> None:
        """``session`` takes the events waiting, then a ``dropped`` frame with the count
        lost, if any, then every event emitted until it leaves."""
        while self._waiting:
            event, frame = self._waiting.popleft()
            session.queue_event(frame, event)
        if self.dropped:
            frame = encode_frame({"type": "dropped", "count": self.dropped})
            session.queue_event(frame, droppable=False)
            self.dropped = 0
        self._sessions.add(session)

    def leave(self, session: EventReceiver) -> None:
        self._sessions.discard(session)

    def __repr__(self) -> str:
        return f"<EventOutbox waiting={len(self._waiting)} dropped={self.dropped} sessions={len(self._sessions)}>"
