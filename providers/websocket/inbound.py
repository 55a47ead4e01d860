"""Reverse mode: plugins that dialled the gateway, each connection an instance of its fleet.

    gateway /v1/plugins/connect ─► Dispatcher.admit_plugin ─► WebSocketProvider.accept
        ─► hello checked ─► Inbound.register ─► ConnectionSource reports ─► Membership joins
        … connection closes ─► unregister ─► reported ─► the fleet drains and drops it

``Inbound`` holds the open connections by the key of the inbound target they serve (the
fleet's target); ``ConnectionSource`` is the ``InstanceSource`` of one such target, which
reports the whole list each time it changes, as DNS and etcd sources do. The fleet layer
does the rest: balancing, outlier ejection, health checks, ``dispatcher health``.

One connection serves every inbound target of its plugin version (its methods may name
several). What can be held per call is each target's own: a call is held to the
``max_in_flight`` and ``max_message_bytes`` of the target it was made through
(``InboundConnection.limits_of``), its answer too. What is one per connection is not:
the heartbeat is the shortest the targets ask (``providers.target.connection_heartbeat``),
the largest message the socket reads the largest they allow, and the plugin's event rate
and whether the gateway takes its offer of permessage-deflate one they must agree on
(``WebSocketTarget.connection_settings``, refused as the manifest loads otherwise).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from providers.discovery import Endpoint, InstanceSource, Report
from providers.websocket.in_flight import CallLimits

if TYPE_CHECKING:
    from providers.websocket.channel import Channel
    from providers.websocket.target import WebSocketTarget

__all__ = ["ConnectionSource", "Inbound", "InboundConnection"]


@dataclass(eq=False)
class InboundConnection:
    """One plugin connected in: its channel and who it said it is."""

    key: str
    channel: Channel
    plugin_id: str
    version: str
    peer: tuple[str, int]
    #: Its ``hello``: who it said it is, its methods.
    hello: dict[str, Any] = field(default_factory=dict)
    #: The methods that ``hello`` listed (``providers.served``).
    served: frozenset[str] | None = None
    #: The limits of the calls of each target served, by the key of its instance target
    #: (the concrete target naming this connection, which calls come through).
    limits: dict[str, CallLimits] = field(default_factory=dict)
    #: The keys of the inbound targets it was admitted to, whose fleets it joined: a
    #: reload that changes them has it connect again (``retarget_connections``).
    fleets: frozenset[str] = frozenset()

    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.peer[0], port=self.peer[1], key=self.key)

    def limits_of(self, target: WebSocketTarget) -> CallLimits:
        """The limits that the calls of ``target`` (an instance target naming this
        connection) are held to on it, counted across them: one per target. Two targets
        that differ only in their fleet's settings (``balance``, ``health_check``,
        ``outlier``) have one instance target, and share it, as equal targets share one."""
        limits = self.limits.get(target.key)
        if limits is None:
            limits = self.limits[target.key] = CallLimits(
                max_in_flight=target.max_in_flight, max_message_bytes=target.max_message_bytes
            )
        return limits


class Inbound:
    """The open inbound connections, by the key of their fleet's target."""

    def __init__(self) -> None:
        self._by_fleet: dict[str, dict[str, InboundConnection]] = {}
        self._by_key: dict[str, InboundConnection] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._numbers = itertools.count(1)

    def new_key(self, plugin_id: str, peer: tuple[str, int]) -> str:
        """A name for a connection that no other connection of this process ever has."""
        return f"{plugin_id}#{next(self._numbers)}@{peer[0]}:{peer[1]}"

    def register(self, fleet_key: str, connection: InboundConnection) -> None:
        self._by_fleet.setdefault(fleet_key, {})[connection.key] = connection
        self._by_key[connection.key] = connection
        self._changed_event(fleet_key).set()

    def unregister(self, fleet_key: str, connection: InboundConnection) -> None:
        self._by_fleet.get(fleet_key, {}).pop(connection.key, None)
        if self._by_key.get(connection.key) is connection:
            del self._by_key[connection.key]
        self._changed_event(fleet_key).set()

    def get(self, key: str) -> InboundConnection | None:
        return self._by_key.get(key)

    def of_fleet(self, fleet_key: str) -> list[InboundConnection]:
        return list(self._by_fleet.get(fleet_key, {}).values())

    def all(self) -> list[InboundConnection]:
        return list(self._by_key.values())

    def _changed_event(self, fleet_key: str) -> asyncio.Event:
        event = self._changed.get(fleet_key)
        if event is None:
            event = self._changed[fleet_key] = asyncio.Event()
        return event

    async def watch(self, fleet_key: str, report: Report) -> None:
        """Report the connections of ``fleet_key`` now and whenever they change."""
        event = self._changed_event(fleet_key)
        while True:
            event.clear()
            report([each.endpoint() for each in self.of_fleet(fleet_key)])
            await event.wait()

    def __repr__(self) -> str:
        return f"<Inbound connections={len(self._by_key)} fleets={len(self._by_fleet)}>"


class ConnectionSource(InstanceSource):
    """The instances of one inbound target: the plugins connected for it right now."""

    def __init__(self, inbound: Inbound, fleet_key: str, name: str) -> None:
        super().__init__(name)
        self._inbound = inbound
        self._fleet_key = fleet_key

    async def run(self, report: Report) -> None:
        def counted(endpoints: Sequence[Endpoint]) -> None:
            self.reads += 1
            report(endpoints)

        await self._inbound.watch(self._fleet_key, counted)
