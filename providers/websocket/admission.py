"""Reverse mode, the gateway's side: which plugin that dials in becomes an instance of which
inbound fleets, and what a reload does to those it admitted (``InboundAdmission``).

    admit (token or principal) ─► accept: hello checked ─► welcome ─► registered ─► served
        … goaway or closed ─► unregistered ─► closed
    reload leaves a target out ─► close_connections: 1012 (its id still connects) or 1001
    reload gives a version other targets ─► retarget_connections: goaway, then 1012

The gateway admits a plugin (``admit``: its token or principal) and hands the upgraded
connection to ``accept``, which checks the plugin's ``hello`` and registers it as an
instance of the fleet of each of its targets (``Inbound``, which ``instance_source``
reports to the fleet layer). An inbound target names its plugin version
(``WebSocketTarget.plugin``): its fleet holds that version's connections only.

A reload that leaves such a target out closes its connections once their calls are done
(``close_connections``): 1012 when the plugin's id still takes connections (dial again),
1001 when it is gone. One that gives a version other inbound targets, keeping some, closes
its connections with 1012 too, once their calls are done (``retarget_connections``): each
joined the fleets of the targets it was admitted to, and is admitted to the new ones when
it dials again. Either reload is remembered until a reload makes those fleets anew
(``instance_source``): a connection admitted before it whose ``hello`` comes after is
closed as the connections open then were, as soon as it has said it.

A plugin whose ``hello`` is not that of the plugin admitted is refused with a close frame
(4400 for a malformed one, 4403 for another plugin, version or protocol) and dropped at
once, not waiting for its close frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from linchkit_plugin.errors import DispatchError, Forbidden, TargetUnavailable, Unauthorized
from linchkit_plugin.wire import PROTOCOL_VERSION
from linchkit_plugin.ws_protocol import (
    CLOSE_BAD_HELLO,
    CLOSE_GOING_AWAY,
    CLOSE_SERVICE_RESTART,
    CLOSE_WRONG_PLUGIN,
    UnknownProtocol,
    encode_frame,
)
from providers.discovery import InstanceSource
from providers.served import served_names
from providers.target import connection_heartbeat
from providers.websocket.events import EventSink
from providers.websocket.inbound import ConnectionSource, Inbound, InboundConnection
from providers.websocket.target import WebSocketTarget

if TYPE_CHECKING:
    from providers.target import PluginInfo
    from providers.websocket.writer import Socket

__all__ = ["InboundAdmission", "ReportServed"]

log = logging.getLogger("dispatcher.providers.websocket")

#: The code and reason of a close frame.
CloseFrame = tuple[int, str]


class ReportServed(Protocol):
    """``Provider.report_served``: tell the dispatcher what a connection's ``hello`` listed."""

    def __call__(
        self,
        plugin: PluginInfo,
        target: WebSocketTarget,
        served: frozenset[str] | None,
        *,
        place: str | None = None,
    ) -> None: ...


class InboundAdmission:
    """The plugins that dial in: admitted, served as instances of their targets' fleets
    (``connections``) until they close, and closed when a reload changes their targets."""

    def __init__(
        self,
        connections: Inbound,
        *,
        report_served: ReportServed,
        sink_of: Callable[[PluginInfo], EventSink | None],
    ) -> None:
        """``report_served``: told what each connection's ``hello`` listed; ``sink_of``:
        where the events of a plugin at its version go (None: ignored), asked as each
        connection is accepted."""
        self.connections = connections
        self._report_served = report_served
        self._sink_of = sink_of
        #: Inbound targets a reload left out, by key: the close their connections got, for
        #: one whose handshake ends after that (``close_connections``).
        self._left_out: dict[str, CloseFrame] = {}
        #: Plugin versions a reload gave other inbound targets, by ``id@version``: the
        #: keys of those targets, which a connection must have been admitted to
        #: (``retarget_connections``), until a reload makes their fleets anew.
        self._retargeted: dict[str, frozenset[str]] = {}

    def instance_source(self, target: WebSocketTarget) -> InstanceSource | None:
        """The connections of ``target``'s fleet, or None if it takes none."""
        if not target.accepts_connections():
            return None
        # Its fleet is watched (again): a reload that left the target out was undone,
        # and one that adds the target, or its version again, says its targets anew.
        self._left_out.pop(target.key, None)
        if target.plugin is not None:
            self._retargeted.pop(target.plugin, None)
        return ConnectionSource(
            self.connections, target.key, f"inbound connections ({target.describe()})"
        )

    def admit(self, target: WebSocketTarget, *, bearer: str | None, principal: str | None) -> None:
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

    # -- a connection, from its hello to its close -----------------------------------------

    async def accept(
        self,
        plugin: PluginInfo,
        targets: Sequence[WebSocketTarget],
        socket: Socket,
        peer: tuple[str, int],
    ) -> None:
        """Serve an admitted, upgraded connection as an instance of each of ``targets``
        until it closes. Its first frame must be the ``hello`` of ``plugin``. ``targets``
        are ``plugin``'s own (each names it: ``WebSocketTarget.plugin``), so the
        connection joins that version's fleets and no other's."""
        hello = await _checked_hello(socket, plugin, peer)
        if hello is None:
            return
        connection = self._new_connection(plugin, targets, socket, peer, hello)
        await _welcome(connection)
        # No await from here to the registration: a reload's ``close_connections`` (or
        # ``retarget_connections``) either ran before (and is read here) or finds the
        # connection registered.
        close = self._reload_close_of(plugin, targets, connection.fleets)
        if close is not None:
            # Admitted before a reload left its target out (or gave its version other
            # targets), said hello after: closed as the connections open then were, or
            # it would serve a fleet nothing calls (or miss one that is).
            await connection.channel.close(*close)
            log.info("%s closed at once: %s", connection.key, connection.channel.close_reason)
            return
        self._register(plugin, targets, connection)
        await self._serve(targets, connection)

    def _new_connection(
        self,
        plugin: PluginInfo,
        targets: Sequence[WebSocketTarget],
        socket: Socket,
        peer: tuple[str, int],
        hello: dict[str, Any],
    ) -> InboundConnection:
        """The connection of a plugin whose ``hello`` was checked, its channel made of the
        settings its targets share, not yet registered."""
        # aiohttp and the modules built on it load with the first connection, not with the
        # target model (the provider, and so this module, load with the manifest).
        from providers.websocket.channel import Channel

        first = targets[0]
        key = self.connections.new_key(plugin.id, peer)
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
            sink=self._sink_of(plugin),
        )
        channel.plugin_reads = hello.get("max_message_bytes")
        served = served_names(hello.get("methods", ()))
        fleets = frozenset(target.key for target in targets)
        return InboundConnection(
            key, channel, plugin.id, plugin.version, peer, hello, served, fleets=fleets
        )

    def _reload_close_of(
        self, plugin: PluginInfo, targets: Sequence[WebSocketTarget], fleets: frozenset[str]
    ) -> CloseFrame | None:
        """The close a reload gave the connections open when it ran, for a connection of
        ``plugin`` to ``targets`` (``fleets``) that said hello after it; None if none did."""
        left_out = next((self._left_out[t.key] for t in targets if t.key in self._left_out), None)
        if left_out is not None:
            return left_out
        retargeted = self._retargeted.get(plugin.key)
        if retargeted is not None and retargeted != fleets:
            # Admitted to the targets its version had before a reload gave it others:
            # it would be missing from the fleets of the targets added.
            return CLOSE_SERVICE_RESTART, _retargeted_reason(plugin.key)
        return None

    def _register(
        self, plugin: PluginInfo, targets: Sequence[WebSocketTarget], connection: InboundConnection
    ) -> None:
        """Join ``connection`` to its targets' fleets, telling what its ``hello`` listed."""
        place = f"websocket inbound {connection.key}"
        for target in targets:
            self._report_served(plugin, target, connection.served, place=place)
            self.connections.register(target.key, connection)
        log.info("%s connected as an instance of %s", connection.key, plugin.key)

    async def _serve(
        self, targets: Sequence[WebSocketTarget], connection: InboundConnection
    ) -> None:
        """Read the connection until it closes, or until the plugin says goaway and its
        calls in flight have finished; the fleets let it go first, then it closes."""
        channel = connection.channel
        reader = asyncio.get_running_loop().create_task(channel.run())
        try:
            # Closed, or the plugin said goaway: either way the fleet lets the instance
            # go now, and a goaway's calls in flight finish before the channel closes.
            await channel.leaving.wait()
            self._unregister(targets, connection)
            await asyncio.wait([reader])
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            self._unregister(targets, connection)
            await channel.close()
            log.info("%s left: %s", connection.key, channel.close_reason)

    def _unregister(
        self, targets: Sequence[WebSocketTarget], connection: InboundConnection
    ) -> None:
        for target in targets:
            self.connections.unregister(target.key, connection)

    # -- reloads ---------------------------------------------------------------------------

    def update(self, plugin: PluginInfo, target: WebSocketTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: what the ``hello`` of
        each of its connections on ``target`` listed is reported again."""
        for connection in self.connections.of_fleet(target.key):
            if connection.version == plugin.version:
                place = f"websocket inbound {connection.key}"
                self._report_served(plugin, target, connection.served, place=place)

    async def close_connections(self, target: WebSocketTarget, *, replaced: bool) -> None:
        """Close the connections of an inbound target a reload left out: 1012 (service
        restart) when ``replaced``, so the plugin dials again and is admitted as whatever
        the manifest serves now, or refused at the upgrade; 1001 (going away) when no
        version of its id takes connections any more."""
        code, reason = _left_out_close(target, replaced)
        self._left_out[target.key] = (code, reason)
        connections = self.connections.of_fleet(target.key)
        if connections:
            log.info(
                "%s: closing %d connection(s), %d: %s",
                target.describe(),
                len(connections),
                code,
                reason,
            )
        await asyncio.gather(*(each.channel.close(code, reason) for each in connections))

    def retarget_connections(self, plugin: PluginInfo, targets: Sequence[WebSocketTarget]) -> None:
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
        for each in self.connections.all():
            if (each.plugin_id, each.version) == (plugin.id, plugin.version) and (
                each.fleets != wanted and each.channel.usable
            ):
                each.channel.go_away(CLOSE_SERVICE_RESTART, reason)

    async def aclose(self) -> None:
        """Close every connection: the dispatcher is going away."""
        for connection in self.connections.all():
            await connection.channel.close(CLOSE_GOING_AWAY)

    def __repr__(self) -> str:
        return (
            f"<InboundAdmission {self.connections!r} left_out={len(self._left_out)}"
            f" retargeted={len(self._retargeted)}>"
        )


# -- the hello -----------------------------------------------------------------------------


async def _checked_hello(
    socket: Socket, plugin: PluginInfo, peer: tuple[str, int]
) -> dict[str, Any] | None:
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
        await _refuse(socket, peer, plugin, CLOSE_WRONG_PLUGIN, refusal)
        return None
    except DispatchError as error:
        await _refuse(socket, peer, plugin, CLOSE_BAD_HELLO, error.message)
        return None
    wrong = _wrong_plugin(hello, plugin)
    if wrong is not None:
        await _refuse(socket, peer, plugin, CLOSE_WRONG_PLUGIN, wrong)
        return None
    return hello


def _wrong_plugin(hello: dict[str, Any], plugin: PluginInfo) -> str | None:
    """How ``hello`` is not that of ``plugin`` (its id, then its version); None if it is."""
    if hello["id"] != plugin.id:
        return f"admitted as {plugin.id!r}, said it is {hello['id']!r:.60}"
    if hello["version"] != plugin.version:
        return f"admitted as version {plugin.version}, said {hello['version']!r:.40}"
    return None


async def _refuse(
    socket: Socket, peer: tuple[str, int], plugin: PluginInfo, code: int, reason: str
) -> None:
    """Refuse a connection's hello: the close frame handed over, the connection dropped.
    Said in the log too: a hello over the target's cap has had the socket closed (1009)
    before the reason could reach the plugin, which then knows no more than the code."""
    from providers.websocket.closing import close_message, hang_up

    log.info("%s:%d refused as %s: %s", *peer, plugin.key, reason)
    await hang_up(socket, code, reason)
    await socket.close(code=code, message=close_message(reason))  # returns at once now


async def _welcome(connection: InboundConnection) -> None:
    """Tell the plugin the name of its instance and the largest message the gateway reads
    of it (a larger answer it refuses itself, typed, rather than have the connection
    closed under every call on it); the channel closed if that fails."""
    channel = connection.channel
    welcome = {
        "type": "welcome",
        "instance": connection.key,
        "max_message_bytes": channel.max_message_bytes,
    }
    try:
        await channel.send_event(encode_frame(welcome))
    except TargetUnavailable:
        await channel.close()  # and its writer with it
        raise


# -- reload closes -------------------------------------------------------------------------


def _retargeted_reason(plugin_key: str) -> str:
    """The close reason of a connection whose version a reload gave other inbound targets."""
    return f"a reload changed the inbound targets of {plugin_key}; connect again"


def _left_out_close(target: WebSocketTarget, replaced: bool) -> CloseFrame:
    """The close code and reason of a connection whose target a reload left out."""
    plugin = target.plugin or target.describe()
    if replaced:
        return CLOSE_SERVICE_RESTART, f"a reload replaced {plugin}; connect again"
    return CLOSE_GOING_AWAY, f"a reload removed {plugin}; no version of it takes connections here"
