"""``provider: websocket``: calls, streams and events in both directions over one WebSocket.

Dial mode (``url``): one ``DialedPlugin`` per plugin id and target keeps a connection to
the plugin's endpoint up, reconnecting with backoff and jitter. A connection is one
plugin id's (its ``hello`` must name it) and no one version's: the versions of a plugin
on equal targets (a rollout, a reload adding version 2 beside version 1) share it, and
it closes when the last of them is detached (``providers.websocket.sharing``).

Reverse mode (``mode: inbound``): the gateway admits a plugin (``admit``: its token or
principal) and hands the upgraded connection to ``accept``, which checks the plugin's
``hello`` and registers it as an instance of the target's fleet (``instance_source``);
the fleet layer balances over them. A reload that leaves such a target out, or gives a
plugin version other inbound targets, closes their connections once their calls are done
(``close_connections``, ``retarget_connections``). Admission and reloads are
``providers.websocket.admission``'s; the provider hands them over and calls through the
connections it registers (``Inbound``).

Errors, as every provider maps them here and nowhere else:

* not connected (never sent) → ``TargetUnavailable``, ``details.stage == "connect"``;
* the connection dropped with the call in flight → ``TargetUnavailable``, ``stage
  "in_flight"`` (retryable; only an idempotent method's retry policy resends it);
* deadline → ``DeadlineExceeded`` (and a ``cancel`` frame to the plugin);
* ``max_in_flight`` calls already on the connection → ``Overloaded``;
* a call over ``max_message_bytes`` → ``InvalidParams``; the plugin's own errors come back
  in the response envelope, as on every transport;
* an answer over its target's ``max_message_bytes`` but not the connection's (a plugin
  dialling in, whose other targets allow more) → ``ProviderError``.

A plugin dialling in serves all its inbound targets over one connection: a call is held
to the ``max_in_flight`` and ``max_message_bytes`` of the target it came through
(``InboundConnection.limits_of``), the connection to the shortest ``heartbeat_ms`` and the
largest ``max_message_bytes`` of them, and to their ``max_events_per_second`` and
``compress`` (the gateway's answer to a plugin offering permessage-deflate), which the
manifest refuses unless they agree (``WebSocketTarget.connection_settings``).

A plugin connected in may not call the host: a ``call`` frame from it is answered with a
``forbidden`` error frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from linchkit_plugin.errors import DispatchError, TargetUnavailable
from linchkit_plugin.ws_protocol import encode_frame
from providers.base import Health, Provider
from providers.discovery import InstanceSource
from providers.invocation import Invocation
from providers.websocket.admission import InboundAdmission
from providers.websocket.inbound import Inbound, InboundConnection
from providers.websocket.sharing import DialUsers
from providers.websocket.target import WebSocketTarget

if TYPE_CHECKING:
    import aiohttp

    from providers.target import PluginInfo
    from providers.websocket.channel import Channel
    from providers.websocket.dialer import DialedPlugin

__all__ = ["WebSocketProvider"]

log = logging.getLogger("dispatcher.providers.websocket")


class WebSocketProvider(Provider[WebSocketTarget]):
    name = "websocket"
    target_model = WebSocketTarget

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        #: Dial mode, by plugin id and ``target.key``: the versions of a plugin on equal
        #: targets share one connection (``DialedPlugin.users``).
        self._dialed: dict[tuple[str, str], DialedPlugin] = {}
        #: Reverse mode: the plugins connected in, by the key of each fleet they serve.
        self.inbound = Inbound()
        self._admission = InboundAdmission(
            self.inbound, report_served=self.report_served, sink_of=self.event_sink_of
        )

    @property
    def dialed(self) -> tuple[DialedPlugin, ...]:
        """Dial mode's connections, one per plugin id and target, as they are now."""
        return tuple(self._dialed.values())

    async def start(self) -> None:
        # aiohttp and the modules built on it load here, not with the target model.
        from providers._aiohttp import open_session

        self._session = open_session(max_connections=1024, keepalive_seconds=15, egress=self.egress)

    async def aclose(self) -> None:
        dialed, self._dialed = self._dialed, {}
        for plugin in dialed.values():
            await plugin.close()
        await self._admission.aclose()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def attach(self, plugin: PluginInfo, target: WebSocketTarget) -> None:
        # No await: who uses a connection changes at once with it (a detach on another
        # task sees all of this attach or none).
        if target.mode != "dial":
            return  # an inbound connection attaches by connecting
        key = (plugin.id, target.key)
        dialed = self._dialed.get(key)
        if dialed is None:
            dialed = self._dial(plugin.id, target)
            self._dialed[key] = dialed
            dialed.start()
        elif dialed.served is not None:
            # Joining an open connection: told what its hello listed, as the others were.
            self.report_served(plugin, target, dialed.served)
        dialed.users.join(plugin, self.event_sink_of(plugin))

    def update(self, plugin: PluginInfo, target: WebSocketTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: the dialled connection
        holds the new entry, and what its last ``hello`` listed is reported again; each
        inbound connection's ``hello`` is reported again for it."""
        if target.mode == "dial":
            dialed = self._dialed.get((plugin.id, target.key))
            if dialed is not None and dialed.users.update(plugin) and dialed.served is not None:
                self.report_served(plugin, target, dialed.served)
            return
        self._admission.update(plugin, target)

    def _dial(self, plugin_id: str, target: WebSocketTarget) -> DialedPlugin:
        for destination in target.destinations():
            self.egress.check(destination)  # names are checked again as they resolve
        if self._session is None:
            raise TargetUnavailable(f"{target.describe()}: the provider is not started")
        from providers.websocket.dialer import DialedPlugin

        def report(plugin: PluginInfo, served: frozenset[str] | None) -> None:
            self.report_served(plugin, target, served)

        users = DialUsers(plugin_id, report)
        return DialedPlugin(target, self._session, users, events=self.event_sink is not None)

    async def detach(self, plugin: PluginInfo, target: WebSocketTarget) -> None:
        # One detach queue will do: a detach that leaves another version on the
        # connection awaits nothing, and the last one's close waits on no plugin (its
        # readers are cancelled, the close aborts).
        if target.mode != "dial":
            return
        key = (plugin.id, target.key)
        dialed = self._dialed.get(key)
        if dialed is None or not dialed.users.leave(plugin):
            return  # not attached here (detached already, or never dialled)
        if dialed.users:
            return  # another version still calls over it
        del self._dialed[key]  # before the await: an attach from now on dials anew
        await dialed.close()

    # -- calls -----------------------------------------------------------------------------

    async def _channel(self, target: WebSocketTarget, invocation: Invocation) -> Channel:
        """The dialled connection the call's plugin has on ``target``."""
        dialed = self._dialed.get((invocation.plugin, target.key))
        if dialed is None:
            raise TargetUnavailable(f"{target.describe()} is not attached")
        return await dialed.ready(invocation)

    def _connected(self, target: WebSocketTarget) -> InboundConnection:
        """The inbound connection a concrete inbound target names."""
        connection = self.inbound.get(target.connection) if target.connection else None
        if connection is None:
            raise TargetUnavailable(
                f"{target.describe()}: no such plugin connected", details={"stage": "connect"}
            )
        return connection

    async def invoke(self, target: WebSocketTarget, invocation: Invocation) -> Any:
        if target.mode == "dial":
            channel = await self._channel(target, invocation)
            return await channel.call(invocation)
        connection = self._connected(target)
        return await connection.channel.call(invocation, connection.limits_of(target))

    async def stream(
        self, target: WebSocketTarget, invocation: Invocation
    ) -> AsyncGenerator[Any, None]:
        if target.mode == "dial":
            chunks = (await self._channel(target, invocation)).stream(invocation)
        else:
            connection = self._connected(target)
            chunks = connection.channel.stream(invocation, connection.limits_of(target))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Now, when this stream is closed, not when the garbage collector finds the
            # channel's: until it ends it counts against its target's max_in_flight,
            # and the plugin, which its end sends a cancel, goes on streaming.
            await chunks.aclose()

    async def send_event(
        self, plugin: PluginInfo, target: WebSocketTarget, event: str, data: Any
    ) -> None:
        """Send the host event to ``plugin`` over the target's connection. A dialled URL
        is one plugin process, whichever versions of it name the URL (they share the
        connection): sending on it is sending to ``plugin``. An inbound connection is
        one plugin process too, admitted as ``plugin``: the fleet of an inbound target
        is that of one plugin version (``WebSocketTarget.plugin``), so its connections
        are all ``plugin``'s."""
        if target.mode == "dial":
            dialed = self._dialed.get((plugin.id, target.key))
            if dialed is None:
                raise TargetUnavailable(f"{target.describe()} is not attached")
            await dialed.send_event(event, data)
            return
        await self._connected(target).channel.send_event(
            encode_frame({"type": "event", "event": event, "data": data})
        )

    async def health(self, target: WebSocketTarget) -> Health:
        timeout = max(target.heartbeat_ms / 1000, 1.0)
        if target.mode == "dial":
            return await self._dialed_health(target, timeout)
        if target.connection is None:
            connected = len(self.inbound.of_fleet(target.key))
            detail = f"{connected} plugin(s) connected"
            if connected:
                return Health("serving", detail, extra={"connected": connected})
            return Health("not_serving", detail, extra={"connected": connected})
        try:
            channel = self._connected(target).channel
        except DispatchError as error:
            return Health("not_serving", error.message)
        return await channel.health(timeout)

    async def _dialed_health(self, target: WebSocketTarget, timeout: float) -> Health:
        dialed = [each for (_, key), each in self._dialed.items() if key == target.key]
        if not dialed:
            return Health("not_serving", "not attached")
        if len(dialed) == 1:
            return await dialed[0].health(timeout)
        healths = await asyncio.gather(*(each.health(timeout) for each in dialed))
        # Plugins of several ids dial this URL, each its own connection: one hello names
        # one id, so one of them at most is served. The target is not, as a whole.
        for each, health in zip(dialed, healths, strict=True):
            if not health.ok:
                detail = f"as plugin {each.plugin_id}: {health.detail}"
                return Health(health.status, detail, health.latency_ms, health.extra)
        return healths[0]

    async def served_methods(
        self, plugin: PluginInfo, target: WebSocketTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """What the ``hello`` of the target's connection listed (dialled: the last one;
        inbound: that connection's)."""
        if target.mode == "dial":
            dialed = self._dialed.get((plugin.id, target.key))
            return None if dialed is None else dialed.served
        connection = self.inbound.get(target.connection) if target.connection else None
        return None if connection is None else connection.served

    # -- reverse mode (``providers.websocket.admission``) ------------------------------------

    def instance_source(self, target: WebSocketTarget) -> InstanceSource | None:
        return self._admission.instance_source(target)

    async def admit(
        self, target: WebSocketTarget, *, bearer: str | None, principal: str | None
    ) -> None:
        self._admission.admit(target, bearer=bearer, principal=principal)

    async def accept(
        self,
        plugin: PluginInfo,
        targets: Sequence[WebSocketTarget],
        connection: Any,
        peer: tuple[str, int],
    ) -> None:
        # ``connection``: the gateway's upgraded aiohttp WebSocket.
        await self._admission.accept(plugin, targets, connection, peer)

    async def close_connections(self, target: WebSocketTarget, *, replaced: bool) -> None:
        await self._admission.close_connections(target, replaced=replaced)

    async def retarget_connections(
        self, plugin: PluginInfo, targets: Sequence[WebSocketTarget]
    ) -> None:
        self._admission.retarget_connections(plugin, targets)

    def __repr__(self) -> str:
        return f"<WebSocketProvider 'websocket' dialed={len(self._dialed)} {self._admission!r}>"
