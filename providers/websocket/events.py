"""The events a plugin emits over its connection, on their way to the host (``PluginEvents``).

    {type: event, event, data} ──max_events_per_second──► sink(event, data)
                                     └─ beyond it: dropped and counted (``dropped``)
    {type: dropped, count}     ──► counted (``dropped_by_plugin``): what the plugin lost
                                   while it was disconnected, as it reports it

The rate bounds the host's CPU (``providers._event_rate``); a handler that fails is logged
and the connection stays, as one bad handler must not end the calls sharing it. The
reader hands both frames here; which handler the sink is, the provider says (for a
dialled connection that versions of a plugin share: ``providers.websocket.sharing``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from providers._event_rate import EventRate
from providers._log_lines import sparingly

__all__ = ["EventSink", "PluginEvents"]

log = logging.getLogger("dispatcher.providers.websocket")

#: ``sink(event, data)``: where the plugin's events go.
EventSink = Callable[[str, Any], None]


class PluginEvents:
    """One connection's events from its plugin: handed to ``sink`` at most
    ``max_events_per_second``, and what was dropped on either side counted."""

    __slots__ = ("_describe", "_drop_reports", "_rate", "_sink", "dropped_by_plugin")

    def __init__(
        self, sink: EventSink | None, *, max_events_per_second: float, describe: str
    ) -> None:
        """``sink``: None to ignore the plugin's events."""
        self._sink = sink
        self._describe = describe
        self._rate = EventRate(max_events_per_second, describe, log)
        #: Events the plugin said it dropped while disconnected (its ``dropped`` frames).
        self.dropped_by_plugin = 0
        #: Its ``dropped`` frames, for how sparingly they are logged.
        self._drop_reports = 0

    @property
    def dropped(self) -> int:
        """The plugin's events beyond ``max_events_per_second``, dropped."""
        return self._rate.dropped

    def deliver(self, frame: dict[str, Any]) -> None:
        """An ``event`` frame: to the sink, if the rate admits it."""
        name = frame.get("event")
        if type(name) is not str or self._sink is None:
            return
        if not self._rate.admit():
            return
        try:
            self._sink(name, frame.get("data"))
        except Exception:  # one bad handler must not end the connection
            log.exception("%s: delivering event %r failed", self._describe, name)

    def plugin_dropped(self, frame: dict[str, Any]) -> None:
        """A ``dropped`` frame: the plugin lost ``count`` events while disconnected."""
        count = frame.get("count")
        if type(count) is int and count > 0:
            self.dropped_by_plugin += count
            self._drop_reports += 1
            if sparingly(self._drop_reports):
                log.warning(
                    "%s dropped %d events while disconnected (%d in all)",
                    self._describe,
                    count,
                    self.dropped_by_plugin,
                )

    def __repr__(self) -> str:
        return (
            f"<PluginEvents dropped={self.dropped}"
            f" dropped_by_plugin={self.dropped_by_plugin} sink={self._sink is not None}>"
        )
