"""Host events to plugins: ``Dispatcher.publish`` sends one event to every target a plugin
version runs on — for a fleet, every instance it has now — each through its target's
event gate (the rate limits, bulkhead and breaker scoped to the target: an event belongs
to no method), the whole publish bounded by one deadline. The provider is told the plugin
version as well as the target (``Provider.send_event``): other plugins, or the other
version of a rollout, may run on an equal target and must not get the event."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher._routes import RouteTable, checked_timeout
from dispatcher._text import checked_text
from dispatcher.config import PluginSpec
from dispatcher.fleet import FleetRuntime
from dispatcher.policies import PolicyRuntime
from linchkit_plugin.errors import DeadlineExceeded
from providers.base import Provider
from providers.invocation import Invocation, new_request_id
from providers.target import TargetConfig

__all__ = ["EventSender"]


class EventSender:
    """Sends host events to the targets of a plugin version."""

    def __init__(
        self,
        providers: dict[str, Provider[Any]],
        policies: PolicyRuntime,
        fleets: FleetRuntime,
        clock: Callable[[], float],
    ) -> None:
        self._providers = providers
        self._policies = policies
        self._fleets = fleets
        self._clock = clock

    async def publish(
        self,
        routes: RouteTable,
        plugins: Sequence[PluginSpec[Any]],
        state: str,
        plugin: str,
        event: str,
        data: Any,
        version: str | None,
        timeout: float,
    ) -> None:
        """Send ``event`` to every target of the version of ``plugin`` that ``version``
        resolves to in ``routes`` (whose entries are ``plugins``)."""
        wanted = routes.version_of(plugin, version, state)
        checked_text(event, "event")  # sent in the plugin's own encoding, after this returns
        timeout = checked_timeout(timeout, f"publishing {event!r} to {plugin}")
        invocation = Invocation(
            plugin, wanted, event, data, self._clock() + timeout, new_request_id()
        )
        try:
            async with asyncio.timeout_at(invocation.deadline):
                for spec in plugins:
                    if spec.id == plugin and spec.version == wanted:
                        for target in spec.targets():
                            for instance in self._instances_of(target):
                                await self._send(spec, instance, invocation, event, data)
        except TimeoutError:
            raise DeadlineExceeded(
                f"publishing {event!r} to {plugin} took longer than {timeout:g} s"
            ) from None

    def _instances_of(self, target: TargetConfig) -> Sequence[TargetConfig]:
        """The concrete targets of ``target`` now: a fleet's current instances."""
        fleet = self._fleets.get(target)
        if fleet is None:
            return target.instance_targets()
        return [instance.target for instance in fleet.instances]

    async def _send(
        self,
        plugin: PluginSpec[Any],
        target: TargetConfig,
        invocation: Invocation,
        event: str,
        data: Any,
    ) -> None:
        send_event = self._providers[target.provider].send_event
        await self._policies.event_gate(target).send(
            invocation, lambda: send_event(plugin, target, event, data)
        )
