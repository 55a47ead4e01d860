"""gRPC plugin services: the ``PluginService`` of ``proto/plugin.proto`` at an address.

One ``grpc.aio`` channel per target, reused by every call (``providers/_grpc/`` holds the
calling code and the status mapping, shared with the subprocess provider). The call's deadline is the gRPC deadline; ``x-request-id``, ``x-caller`` and
``traceparent`` travel as call metadata; a batch is one ``CallBatch``; the plugin's
``Events`` stream is kept open and its events reach ``Dispatcher.on`` handlers.

With ``lifecycle: dispatcher`` the dispatcher runs the plugin's ``Init`` (with the
manifest's ``config``) and ``Start`` when it attaches, ``Stop`` and ``Destroy`` when it
detaches (the sequence of ``providers._grpc.lifecycle``, as for subprocess plugins); with
``remote`` (the default) the service runs its own lifecycle. With ``dispatcher``, a
service found again after its connection was lost (a redeploy at the same address) gets
``Describe``, ``Init`` and ``Start`` again before calls go to it, and what that
``Describe`` lists is reported as at a start: a redeploy may bring a build serving other
methods (``providers._grpc.restarts``; docs/grpc-and-subprocess.md says what is left).

Instances: ``instances: [{address: …, weight: …}, {dns: …}, {registry: …}]`` (instead of
``address``, or besides it: ``address`` is then the first instance) makes the target a
fleet, as for HTTP (``providers.instances``): the dispatcher attaches every instance, so
each has its own channel, and with ``lifecycle: dispatcher`` each gets its own
``Init``/``Start`` and ``Stop``/``Destroy``. Such a fleet starts only when every fixed
instance answers its ``Init``: an instance the dispatcher owns the lifecycle of cannot
be left uninitialised. A call that provably never reached the plugin (the channel could
not connect: ``providers._grpc.status``) carries ``details["stage"] == "connect"``, so
the fleet sends it to another instance, whatever the method.

grpcio is imported when a connection is opened, not when this module loads.

One address is one service: entries of the manifest that name it share it, and a reload
that puts a new version where the old one ran attaches the new one before the old one
leaves. Neither's detach ends what the other uses: a connection closes when its last
entry leaves, the service gets ``Stop``/``Destroy`` when the last entry at its address
leaves, and its config stays that of an entry still attached
(``providers._grpc.sharing``).

Egress: before a channel is created (``attach``), ``address`` is checked against the
manifest's ``egress`` policy: a ``unix:`` socket must be in ``unix_socket_dirs``, and a
name is resolved and every address checked (``EgressPolicy.check_connect``); a refusal
fails ``attach`` with ``EgressRefused``, an unresolvable name with ``TargetUnavailable``.
What stays unchecked: grpc resolves the name again itself, and again on every reconnect,
so a name whose DNS answer changes after ``attach`` (rebinding) is not re-checked; pin
such targets to address literals or an ``egress.allow`` of networks you trust. Metadata
values are masked wherever a target prints.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, Coroutine, Hashable, Sequence
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING, Any

from linchkit_plugin.errors import DispatchError, ProviderError, TargetUnavailable
from providers._grpc import lifecycle
from providers._grpc.connection import PluginConnection
from providers._grpc.sharing import ConnectionUsers, EventSink, ServiceUsers, Use
from providers._grpc.target import GrpcInstance, GrpcTarget
from providers.base import Health, Provider
from providers.invocation import Invocation, Outcome

if TYPE_CHECKING:
    from providers.target import PluginInfo

__all__ = ["GrpcInstance", "GrpcProvider", "GrpcTarget"]

log = logging.getLogger("dispatcher.providers.grpc")


class GrpcProvider(Provider[GrpcTarget]):
    name = "grpc"
    target_model = GrpcTarget
    native_batch = True

    def delivers_events_on(self, target: GrpcTarget) -> bool:
        return target.events

    def __init__(self) -> None:
        # By ``target.key``: equal targets (of several methods or plugins) share a channel.
        self._connections: dict[str, PluginConnection] = {}
        #: Who is attached over each connection, by ``target.key`` (``_grpc.sharing``).
        self._users: dict[str, ConnectionUsers] = {}
        #: Who reaches the service at each address (``connect_address()``).
        self._services: dict[str, ServiceUsers] = {}
        #: Plugins told once that their config reaches no service (``attach``).
        self._config_unsent: set[str] = set()
        #: This host's ``linchkit-host``: services attached by other hosts too (replicas)
        #: run their stop hooks only when the last host leaves.
        self.host_id = secrets.token_hex(8)

    async def attach(self, plugin: PluginInfo, target: GrpcTarget) -> None:
        if target.key not in self._connections:
            for destination in target.destinations():
                await self.egress.check_connect(destination)
        connection = self._open(target)
        users = self._users.setdefault(target.key, ConnectionUsers())
        address = target.connect_address()
        service = self._services.setdefault(address, ServiceUsers())
        users.under_way += 1
        service.under_way += 1
        try:
            await self._take_turn(plugin, target, connection, users, service)
        except BaseException:
            await self._leave(target, users, service)  # opened for this attach alone?
            raise
        users.under_way -= 1
        service.under_way -= 1
        users.plugins[plugin.key] = plugin
        use = Use(plugin, target.key, runs_lifecycle=target.lifecycle == "dispatcher")
        service.uses[(plugin.key, target.key)] = use

    async def _take_turn(
        self,
        plugin: PluginInfo,
        target: GrpcTarget,
        connection: PluginConnection,
        users: ConnectionUsers,
        service: ServiceUsers,
    ) -> None:
        """Start ``plugin`` on the service once no other lifecycle step is under way there;
        if its start fails, give the service back the config of the entry it ran with."""
        sink = self.event_sink_of(plugin) if target.events else None
        if sink is not None:
            users.sinks[plugin.key] = sink
        async with service.steps:
            running = service.initialised if service.uses else None
            inits_sent = connection.inits_sent
            try:
                await self._begin(plugin, target, connection, service, users.emit if sink else None)
            except BaseException:
                users.sinks.pop(plugin.key, None)
                if running is not None and connection.inits_sent > inits_sent:
                    await self._restore(service, running, plugin)
                raise

    async def _begin(
        self,
        plugin: PluginInfo,
        target: GrpcTarget,
        connection: PluginConnection,
        service: ServiceUsers,
        sink: EventSink | None,
    ) -> None:
        if target.lifecycle == "dispatcher":
            await lifecycle.begin(
                connection,
                plugin,
                ready_timeout=target.connect_timeout_ms / 1000,
                event_sink=sink,
                # Another entry's calls run there: a failed Start is undone by ``_restore``.
                destroy_on_failed_start=not service.uses,
            )
            service.initialised = plugin
            self.report_served(plugin, target, connection.served)
            connection.restarts.watch(partial(self._again, connection, service, plugin, target))
            return
        if plugin.config and plugin.key not in self._config_unsent:
            # Not a manifest problem: the service may have its own copy; but a config
            # nobody receives is most often a missing ``lifecycle: dispatcher``.
            self._config_unsent.add(plugin.key)
            log.warning(
                "%s: its config is not sent to %s: with lifecycle: remote the service "
                "runs its own lifecycle (lifecycle: dispatcher sends it with Init)",
                plugin.key,
                target.describe(),
            )
        if sink is not None:
            connection.open_events(sink)

    async def _again(
        self,
        connection: PluginConnection,
        service: ServiceUsers,
        plugin: PluginInfo,
        target: GrpcTarget,
    ) -> None:
        """A service found again: ``Init`` and ``Start`` with the config of the entry that
        had the last ``Init`` once no other step is under way (a new version's start may
        be, on the same service). What its ``Describe`` listed is reported for every entry
        over the connection, as at their start: a redeploy may have brought a build that
        serves other methods, or none it says (None: the dispatcher says it no longer
        knows). Reported whether or not ``Init`` and ``Start`` succeeded: it is what
        answers at the address now; not when cancelled (the connection is closing)."""
        async with service.steps:
            try:
                await lifecycle.again(connection, service.initialised or plugin)
            except DispatchError:
                self._report_served_over(connection, target)
                raise
            self._report_served_over(connection, target)

    def _report_served_over(self, connection: PluginConnection, target: GrpcTarget) -> None:
        """Report what ``connection``'s plugin last listed for each entry attached over it."""
        users = self._users.get(target.key)
        if users is not None and self._connections.get(target.key) is connection:
            for plugin in list(users.plugins.values()):
                self.report_served(plugin, target, connection.served)

    def update(self, plugin: PluginInfo, target: GrpcTarget) -> None:
        """A reload changed ``plugin``'s entry and kept ``target``: the connection's and
        the address's records hold the new entry, and what the plugin's ``Describe`` at
        start listed is reported again (``lifecycle: dispatcher``, as ``_begin`` does; a
        service running its own lifecycle is asked by health alone). Its config is the
        same (a reload refuses another): the service is sent nothing."""
        users = self._users.get(target.key)
        if users is None or plugin.key not in users.plugins:
            return  # not attached here
        users.plugins[plugin.key] = plugin
        service = self._services.get(target.connect_address())
        if service is not None:
            use = service.uses.get((plugin.key, target.key))
            if use is not None:
                service.uses[(plugin.key, target.key)] = Use(
                    plugin, target.key, runs_lifecycle=use.runs_lifecycle
                )
            if service.initialised is not None and service.initialised.key == plugin.key:
                service.initialised = plugin
        connection = self._connections.get(target.key)
        if target.lifecycle == "dispatcher" and connection is not None:
            self.report_served(plugin, target, connection.served)

    def detach_queue(self, plugin: PluginInfo, target: GrpcTarget) -> Hashable:
        # One address is one service: the order its entries leave in decides the config
        # it keeps (``_hand_over``), so they leave one after another; services at other
        # addresses are stopped meanwhile.
        return target.connect_address()

    async def detach(self, plugin: PluginInfo, target: GrpcTarget) -> None:
        users = self._users.get(target.key)
        if users is None or users.plugins.pop(plugin.key, None) is None:
            return
        users.sinks.pop(plugin.key, None)
        service = self._services[target.connect_address()]
        del service.uses[(plugin.key, target.key)]
        # Under way until its end is sent: another detach over the connection, or a
        # failed attach, must not close it first (the service would get no Stop).
        users.under_way += 1
        service.under_way += 1
        try:
            async with service.steps:
                # Who else uses the service is read once this has its turn: an attach
                # that had the turn before it may have joined meanwhile.
                if service.uses:  # another entry still calls the service: it keeps running
                    await self._hand_over(service, plugin)
                elif service.initialised is not None:
                    # None: the provider closed while this waited its turn (its close
                    # ends every connection; there is nothing left to send Stop over).
                    connection = self._connections.get(target.key)
                    if connection is not None:
                        await self._end(connection, service.initialised, target)
        finally:
            # An attach that came meanwhile keeps the record, and starts after this end.
            await self._leave(target, users, service)

    async def _leave(
        self, target: GrpcTarget, users: ConnectionUsers, service: ServiceUsers
    ) -> None:
        """An attach or detach is over: drop the address's record and close the
        connection when nothing uses them any more (nor is about to)."""
        users.under_way -= 1
        service.under_way -= 1
        address = target.connect_address()
        if service.unused() and self._services.get(address) is service:
            del self._services[address]
        # Another record by now: the provider closed, and ended this connection.
        if users.unused() and self._users.get(target.key) is users:
            await self._close(target)

    async def _hand_over(self, service: ServiceUsers, leaving: PluginInfo) -> None:
        """Keep the service's config that of an entry still attached (``_grpc.sharing``)."""
        if service.initialised is None or service.initialised.key != leaving.key:
            return
        heir = service.heir()
        connection = None if heir is None else self._connections.get(heir.target_key)
        if heir is None or connection is None:
            return  # the rest run their own lifecycle (the last to leave ends it), or closed
        try:
            await lifecycle.hand_over(connection, heir.plugin, leaving)
        except DispatchError as error:
            log.error("%s on %s: %s", heir.plugin.key, connection.describe, error)
        service.initialised = heir.plugin

    async def _restore(
        self, service: ServiceUsers, running: PluginInfo, failed: PluginInfo
    ) -> None:
        """Give the service ``running``'s config back after ``failed``'s start there failed."""
        for use in reversed(service.uses.values()):
            connection = self._connections.get(use.target_key)  # None: the provider closed
            if use.plugin.key == running.key and connection is not None:
                await lifecycle.restore(connection, running, failed)
                return

    async def _end(
        self, connection: PluginConnection, plugin: PluginInfo, target: GrpcTarget
    ) -> None:
        await connection.restarts.stop()  # a connection lost from now on is no restart
        if connection.restarts.restart_owed:
            log.info(
                "%s on %s: no Stop or Destroy: the plugin there has not had its Init",
                plugin.key,
                target.describe(),
            )
            return
        await lifecycle.end(connection, plugin)

    async def _close(self, target: GrpcTarget) -> None:
        self._users.pop(target.key, None)
        connection = self._connections.pop(target.key, None)
        if connection is not None:
            await connection.close()

    async def aclose(self) -> None:
        connections, self._connections = self._connections, {}
        self._users.clear()
        self._services.clear()
        for connection in connections.values():
            await connection.close()

    def invoke(self, target: GrpcTarget, invocation: Invocation) -> Coroutine[Any, Any, Any]:
        # Not a coroutine of its own: the connection's call is the awaitable, one frame
        # less on every call (docs/architecture.md, gRPC). Errors still come when awaited.
        connection = self._connections.get(target.key)
        if connection is None:
            return self._not_attached(target)
        return connection.call(invocation)

    async def _not_attached(self, target: GrpcTarget) -> Any:
        raise TargetUnavailable(f"{target.describe()} is not attached")

    async def invoke_batch(
        self, target: GrpcTarget, invocations: Sequence[Invocation]
    ) -> list[Outcome[Any]]:
        if not target.batch or not invocations:
            return await super().invoke_batch(target, invocations)
        return await self._connection(target).call_batch(invocations)

    async def stream(self, target: GrpcTarget, invocation: Invocation) -> AsyncGenerator[Any, None]:
        # Closed with this stream, not left to the garbage collector: its RPC stays open,
        # the plugin streaming, until the connection's stream ends.
        async with aclosing(self._connection(target).stream(invocation)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def send_event(
        self, plugin: PluginInfo, target: GrpcTarget, event: str, data: Any
    ) -> None:
        """Queue the host event on the ``Events`` stream of the target's channel. The
        address is one plugin service, whichever entries of the manifest name it (they
        share the channel): sending on it is sending to ``plugin``, and reaches no other
        address."""
        self._connection(target).send_event(event, data)

    async def health(self, target: GrpcTarget) -> Health:
        try:
            connection = self._connection(target)
        except ProviderError as error:
            return Health("not_serving", str(error))
        return await connection.health(service=target.health_service)

    async def served_methods(
        self, plugin: PluginInfo, target: GrpcTarget, *, timeout: float
    ) -> frozenset[str] | None:
        """What the plugin's last ``Describe`` listed (``lifecycle: dispatcher``: at start
        and each time its connection is found again), asked again when it said nothing;
        a service that runs its own lifecycle may be redeployed under the dispatcher
        unseen, so it is asked again each time. A list first had here is reported as a
        start's is (``report_served``): its gap is warned of, not only in the report."""
        connection = self._connections.get(target.key)
        if connection is None:
            return None
        managed = target.lifecycle == "dispatcher"
        if managed and connection.served is not None:
            return connection.served
        try:
            await connection.identify(timeout)
        except DispatchError:
            return None
        if managed and connection.served is not None:
            self._report_served_over(connection, target)
        return connection.served

    def _open(self, target: GrpcTarget) -> PluginConnection:
        connection = self._connections.get(target.key)
        if connection is None:
            connection = self._connections[target.key] = PluginConnection(
                target.connect_address(),
                security=target.security(),
                metadata=tuple(target.metadata.items()),
                describe=target.describe(),
                compress_min_bytes=target.compression.threshold(target.connect_address()),
                host_id=self.host_id,
                max_events_per_second=target.max_events_per_second,
            )
        return connection

    def _connection(self, target: GrpcTarget) -> PluginConnection:
        connection = self._connections.get(target.key)
        if connection is None:
            raise TargetUnavailable(f"{target.describe()} is not attached")
        return connection

    def __repr__(self) -> str:
        return f"<GrpcProvider 'grpc' connections={len(self._connections)}>"
