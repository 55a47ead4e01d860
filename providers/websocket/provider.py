"""``provider: websocket``: calls, streams and events in both directions over one WebSocket.

Dial mode (``url``): one ``DialedPlugin`` per plugin id and target keeps a connection to
the plugin's endpoint up, reconnecting with backoff and jitter. A connection is one
plugin id's (its ``hello`` must name it) and no one version's: the versions of a plugin
on equal targets (a rollout, a reload adding version 2 beside version 1) share it, and
it closes when the last of them is detached (``providers.websocket.sharing``).

Reverse mode (``mode: inbound``): the gateway admits a plugin (``admit``: its token or
principal) and hands the upgraded connection to ``accept``, which checks the plugin's
``hello`` and registers it as an instance of the target's fleet (``instance_source``);
the fleet layer balances over them. An inbound target names its plugin version
(``WebSocketTarget.plugin``): its fleet holds that version's connections only. A reload
that leaves such a target out closes its connections once their calls are done
(``close_connections``): 1012 when the plugin's id still takes connections (dial again),
1001 when it is gone. One that gives a version other inbound targets, keeping some, closes
its connections with 1012 too, once their calls are done (``retarget_connections``): each
joined the fleets of the targets it was admitted to, and is admitted to the new ones when
it dials again.

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

from linchkit_plugin.errors import (
    DispatchError,
    Forbidden,
    TargetUnavailable,
    Unauthorized,
)
from linchkit_plugin.wire import PROTOCOL_VERSION
from linchkit_plugin.ws_protocol import (
    CLOSE_BAD_HELLO,
    CLOSE_GOING_AWAY,
    CLOSE_SERVICE_RESTART,
    CLOSE_WRONG_PLUGIN,
    UnknownProtocol,
    encode_frame,
)
from providers.base import Health, Provider
from providers.discovery import InstanceSource
from providers.invocation import Invocation
from providers.served import served_names
from providers.target import connection_heartbeat
from providers.websocket.inbound import ConnectionSource, Inbound, InboundConnection
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
        self.inbound = Inbound()
        #: Inbound targets a reload left out, by key: the close code and reason their
        #: connections got, for one whose handshake ends after that (``close_connections``).
        self._left_out: dict[str, tuple[int, str]] = {}
        #: Plugin versions a reload gave other inbound targets, by ``id@version``: the
        #: keys of those targets, which a connection must have been admitted to
        #: (``retarget_connections``), until a reload makes their fleets anew.
        self._retargeted: dict[str, frozenset[str]] = {}

    async def start(self) -> None:
        # aiohttp and the modules built on it load here, not with the target model.
        from providers._aiohttp import open_session

        self._session = open_session(max_connections=1024, keepalive_seconds=15, egress=self.egress)

    async def aclose(self) -> None:
        dialed, self._dialed = self._dialed, {}
        for plugin in dialed.values():
            await plugin.close()
        for connection in self.inbound.all():
            await connection.channel.close(CLOSE_GOING_AWAY)
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
        for connection in self.inbound.of_fleet(target.key):
            if connection.version == plugin.version:
                place = f"websocket inbound {connection.key}"
                self.report_served(plugin, target, connection.served, place=place)

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

    # -- reverse mode ----------------------------------------------------------------------

    def instance_source(self, target: WebSocketTarget) -> InstanceSource | None:
        if not target.accepts_connections():
            return None
        # Its fleet is watched (again): a reload that left the target out was undone,
        # and one that adds the target, or its version again, says its targets anew.
        self._left_out.pop(target.key, None)
        if target.plugin is not None:
            self._retargeted.pop(target.plugin, None)
        return ConnectionSource(
            self.inbound, target.key, f"inbound connections ({target.describe()})"
        )

    async def admit(
        self, target: WebSocketTarget, *, bearer: str | None, principal: str | None
    ) -> None:
        """Whether a plugin with these credentials may connect as an instance of
        ``target``; raises ``Unauthorized`` (no or wrong credential) or ``Forbidden``
        (authenticated as someone else)."""
        if not target.accepts_connections():
            raise Forbidden(f"{target.describe()} takes no inbound connections")
        if target.admits(bearer, principal):
            return
        if principal is not None and target.token is None:
            raise Forbidden("this principal may not connect as this plugin")
        raise Unauthorized("missing or wrong credentials for this plugin")

    async def accept(
        self,
        plugin: PluginInfo,
        targets: Sequence[WebSocketTarget],
        connection: Any,
        peer: tuple[str, int],
    ) -> None:
        """Serve an admitted, upgraded connection as an instance of each of ``targets``
        until it closes. Its first frame must be the ``hello`` of ``plugin``. ``targets``
        are ``plugin``'s own (each names it: ``WebSocketTarget.plugin``), so the
        connection joins that version's fleets and no other's."""
        from providers.websocket.channel import Channel

        socket = connection
        first = targets[0]
        hello = await self._hello(socket, plugin)
        if hello is None:
            return
        key = self.inbound.new_key(plugin.id, peer)
        channel = Channel(
            socket,
            f"websocket inbound {key}",
            # The one the gateway pings the connection by (``Admission.heartbeat``).
            heartbeat=connection_heartbeat(targets) or first.heartbeat_ms / 1000,
            # The largest message the gateway reads of it (``Admission.max_message_bytes``);
            # each call is held to its own target's limits (``limits_of``).
            max_in_flight=max(target.max_in_flight for target in targets),
            max_message_bytes=max(target.max_message_bytes for target in targets),
            # One the targets agree on: the manifest refuses them otherwise.
            max_events_per_second=first.max_events_per_second,
            sink=self.event_sink_of(plugin),
        )
        served = served_names(hello.get("methods", ()))
        fleets = frozenset(target.key for target in targets)
        inbound = InboundConnection(
            key, channel, plugin.id, plugin.version, peer, hello, served, fleets=fleets
        )
        try:
            await channel.send_event(encode_frame({"type": "welcome", "instance": key}))
        except TargetUnavailable:
            await channel.close()  # and its writer with it
            raise
        # No await from here to the registration: a reload's ``close_connections`` (or
        # ``retarget_connections``) either ran before (and is read here) or finds the
        # connection registered.
        left_out = next((self._left_out[t.key] for t in targets if t.key in self._left_out), None)
        retargeted = self._retargeted.get(plugin.key)
        if left_out is None and retargeted is not None and retargeted != fleets:
            # Admitted to the targets its version had before a reload gave it others:
            # it would be missing from the fleets of the targets added.
            left_out = CLOSE_SERVICE_RESTART, _retargeted_reason(plugin.key)
        if left_out is not None:
            # Admitted before a reload left its target out (or gave its version other
            # targets), said hello after: closed as the connections open then were, or
            # it would serve a fleet nothing calls (or miss one that is).
            await channel.close(*left_out)
            log.info("%s closed at once: %s", key, channel.close_reason)
            return
        for target in targets:
            self.report_served(plugin, target, served, place=f"websocket inbound {key}")
            self.inbound.register(target.key, inbound)
        log.info("%s connected as an instance of %s", key, plugin.key)
        reader = asyncio.get_running_loop().create_task(channel.run())
        try:
            # Closed, or the plugin said goaway: either way the fleet lets the instance
            # go now, and a goaway's calls in flight finish before the channel closes.
            await channel.leaving.wait()
            for target in targets:
                self.inbound.unregister(target.key, inbound)
            await asyncio.wait([reader])
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            for target in targets:
                self.inbound.unregister(target.key, inbound)
            await channel.close()
            log.info("%s left: %s", key, channel.close_reason)

    async def close_connections(self, target: WebSocketTarget, *, replaced: bool) -> None:
        """Close the connections of an inbound target a reload left out: 1012 (service
        restart) when ``replaced``, so the plugin dials again and is admitted as whatever
        the manifest serves now, or refused at the upgrade; 1001 (going away) when no
        version of its id takes connections any more."""
        code, reason = _reload_close(target, replaced)
        self._left_out[target.key] = (code, reason)
        connections = self.inbound.of_fleet(target.key)
        if connections:
            log.info(
                "%s: closing %d connection(s), %d: %s",
                target.describe(),
                len(connections),
                code,
                reason,
            )
        await asyncio.gather(*(each.channel.close(code, reason) for each in connections))

    async def retarget_connections(
        self, plugin: PluginInfo, targets: Sequence[WebSocketTarget]
    ) -> None:
        """A reload gave ``plugin``'s version the inbound ``targets``, another set than its
        connections were admitted to. Each connection joined the fleets of its targets
        when it was admitted, and settled its heartbeat, message bound and compression
        from them: one left open would never be called through a target added (its
        fleet empty for as long as the plugin stays connected: every call failing "no
        instance"). So each goes away: it leaves its fleets now, its calls in flight
        finish (the targets it serves are still called, unlike one a reload leaves out:
        closed at once, a call made since the reload's swap would fail ``in_flight``),
        then it closes with 1012, and is admitted to ``targets`` when its plugin dials
        again. One admitted before the reload whose ``hello`` comes after is closed at
        once (``accept``): nothing was sent on it."""
        wanted = frozenset(target.key for target in targets)
        self._retargeted[plugin.key] = wanted
        reason = _retargeted_reason(plugin.key)
        for each in self.inbound.all():
            if (each.plugin_id, each.version) == (plugin.id, plugin.version) and (
                each.fleets != wanted and each.channel.usable
            ):
                each.channel.go_away(CLOSE_SERVICE_RESTART, reason)

    async def _hello(self, socket: Any, plugin: PluginInfo) -> dict[str, Any] | None:
        """The plugin's ``hello``, checked against the plugin admitted; None (and the
        connection closed with the reason) when it is not one."""
        from providers.websocket.hello import read_hello

        # A close frame holds 123 bytes of reason, and the reason quotes the plugin: cut in
        # characters, one not in ASCII made a frame the plugin refused (1002), unread
        # (``hang_up`` cuts it so). Each refusal drops the connection at once: a plugin that
        # sent a wrong hello and then neither reads nor closes held its socket and this
        # handler for aiohttp's close timeout (10 s).
        try:
            hello = await read_hello(socket)
        except UnknownProtocol as error:
            # A refusal, as a hello naming another plugin is: the SDKs dial a 4400 again
            # (a hello that came late may have been a slow link), which would send the same
            # hello for ever; a 4403 ends their dial with this reason in one line.
            spoken = error.details.get("protocol")
            refusal = f"this gateway speaks protocol {PROTOCOL_VERSION}; the hello said {spoken}"
            await _refuse(socket, CLOSE_WRONG_PLUGIN, refusal)
            return None
        except DispatchError as error:
            await _refuse(socket, CLOSE_BAD_HELLO, error.message)
            return None
        wrong = (
            f"admitted as {plugin.id!r}, said it is {hello['id']!r:.60}"
            if hello["id"] != plugin.id
            else f"admitted as version {plugin.version}, said {hello['version']!r:.40}"
            if hello["version"] != plugin.version
            else None
        )
        if wrong is not None:
            await _refuse(socket, CLOSE_WRONG_PLUGIN, wrong)
            return None
        return hello

    def __repr__(self) -> str:
        return (
            f"<WebSocketProvider 'websocket' dialed={len(self._dialed)} {self.inbound!r}"
            f" left_out={len(self._left_out)} retargeted={len(self._retargeted)}>"
        )


async def _refuse(socket: Any, code: int, reason: str) -> None:
    """Refuse a connection's hello: the close frame handed over, the connection dropped."""
    from providers.websocket.closing import close_message, hang_up

    await hang_up(socket, code, reason)
    await socket.close(code=code, message=close_message(reason))  # returns at once now


def _retargeted_reason(plugin_key: str) -> str:
    """The close reason of a connection whose version a reload gave other inbound targets."""
    return f"a reload changed the inbound targets of {plugin_key}; connect again"


def _reload_close(target: WebSocketTarget, replaced: bool) -> tuple[int, str]:
    """The close code and reason of a connection whose target a reload left out."""
    plugin = target.plugin or target.describe()
    if replaced:
        return CLOSE_SERVICE_RESTART, f"a reload replaced {plugin}; connect again"
    return CLOSE_GOING_AWAY, f"a reload removed {plugin}; no version of it takes connections here"
