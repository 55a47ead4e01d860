"""Who uses a dialled connection: the versions of one plugin attached over it.

By the protocol (docs/protocol.md, WebSocket binding) a dialled connection is one plugin
id's and no one version's: its ``hello`` must name the manifest's plugin id, its version
is not checked, and nothing the host sends on it names a version (a call's envelope names
the plugin; a host event goes to the process at the URL). So the versions of one plugin
whose targets are equal (``target.key``): two in a rollout, or a reload that adds
version 2 beside version 1, share one connection; another plugin id at the same URL
dials its own, held to its own ``hello``. Hence:

- the connection is dialled at the first attach and closed at the last detach; a detach
  that leaves another version attached only takes its own off, and never waits;
- what the plugin emits goes to the version its last ``hello`` names when that version
  is attached, else to the newest attached: an event names a version still served (the
  newest, as on gRPC: ``providers._grpc.sharing``);
- what each ``hello`` lists is reported for every version attached, each having its own
  routes; a version that joins an open connection is told what the last one listed
  (``WebSocketProvider.attach``);
- a reload that changes a version's entry (its methods) and keeps its target equal does
  not attach it again: the connection takes the new entry (``update``), and what the last
  ``hello`` listed is reported for it again (``WebSocketProvider.update``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from providers.websocket.events import EventSink

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["DialUsers"]


class DialUsers:
    """The versions of plugin ``plugin_id`` attached over one dialled connection."""

    __slots__ = ("_report", "_sink", "_sinks", "plugin_id", "plugins", "said")

    def __init__(
        self,
        plugin_id: str,
        report: Callable[[PluginInfo, frozenset[str] | None], None] | None = None,
    ) -> None:
        """``report(plugin, served)``: tell the dispatcher what ``plugin`` serves."""
        self.plugin_id = plugin_id
        self._report = report
        #: By version, oldest first.
        self.plugins: dict[str, PluginInfo] = {}
        self._sinks: dict[str, EventSink] = {}
        #: The version the connection's last ``hello`` said.
        self.said: str | None = None
        #: Where the plugin's events go now (``_choose``): looked up once per change,
        #: not once per event.
        self._sink: EventSink | None = None

    def join(self, plugin: PluginInfo, sink: EventSink | None) -> None:
        self.plugins[plugin.version] = plugin
        if sink is not None:
            self._sinks[plugin.version] = sink
        self._choose()

    def update(self, plugin: PluginInfo) -> bool:
        """A reload changed the entry of ``plugin``'s version: keep the new one (its
        methods are what the next ``hello`` is checked against); False when that version
        is not attached here."""
        if plugin.version not in self.plugins:
            return False
        self.plugins[plugin.version] = plugin  # its place, oldest first, is kept
        return True

    def leave(self, plugin: PluginInfo) -> bool:
        """Take ``plugin`` off; False when it was not attached here."""
        if self.plugins.pop(plugin.version, None) is None:
            return False
        self._sinks.pop(plugin.version, None)
        self._choose()
        return True

    def heard(self, version: str, served: frozenset[str] | None) -> None:
        """A connection's ``hello`` said ``version`` and listed ``served``."""
        self.said = version
        self._choose()
        if self._report is not None:
            for plugin in list(self.plugins.values()):
                self._report(plugin, served)

    def emit(self, event: str, data: Any) -> None:
        """The connection's event sink."""
        sink = self._sink
        if sink is not None:
            sink(event, data)

    def _choose(self) -> None:
        sinks = self._sinks
        chosen = sinks.get(self.said) if self.said is not None else None
        if chosen is None and sinks:
            chosen = next(reversed(sinks.values()))
        self._sink = chosen

    def __len__(self) -> int:
        return len(self.plugins)

    def __repr__(self) -> str:
        return f"<DialUsers {self.plugin_id} versions={list(self.plugins)} hello={self.said}>"
