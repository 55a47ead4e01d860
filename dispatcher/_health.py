"""``Dispatcher.health``: every target of every plugin probed, one report each.

A fleet reports each of its instances, with the instance's state in the fleet and its
breaker. A probe that times out is ``not_serving``; one that fails in a way its provider
did not translate is ``unknown`` (providers must not raise from ``health``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from dispatcher.config import Manifest, PluginSpec
from dispatcher.fleet import FleetRuntime
from dispatcher.policies import PolicyRuntime
from providers.base import Health, Provider
from providers.target import TargetConfig

__all__ = ["TargetHealth", "probe_targets"]


@dataclass(frozen=True, slots=True)
class TargetHealth:
    plugin: str
    version: str
    target: str
    health: Health
    #: The state of the target's circuit breaker, when one is configured.
    circuit: str | None = None
    #: For an instance of a fleet: the fleet (its target's description) and the
    #: instance's state in it (``healthy``, ``ejected``, ``down``); None otherwise.
    fleet: str | None = None
    state: str | None = None
    #: True while the dispatcher drains (``Dispatcher.drain``): it takes no new calls, so a
    #: load balancer should send them to another replica, whatever the target's health.
    draining: bool = False


async def probe_targets(
    manifest: Manifest[Any],
    providers: dict[str, Provider[Any]],
    policies: PolicyRuntime | None,
    fleets: FleetRuntime | None,
    *,
    timeout: float,
    draining: bool,
) -> list[TargetHealth]:
    """One report per target (per instance, for a fleet), probed concurrently."""
    checks: list[tuple[PluginSpec[Any], TargetConfig, TargetConfig]] = [
        (plugin, target, instance)
        for plugin in manifest.plugins
        for target in plugin.targets()
        for instance in target.instance_targets()
    ]
    reports = await asyncio.gather(
        *(_probe(providers[each.provider], each, timeout) for _, _, each in checks)
    )
    return [
        TargetHealth(
            plugin.id,
            plugin.version,
            instance.describe(),
            report,
            _circuit_state(policies, instance),
            *_fleet_state(fleets, target, instance),
            draining=draining,
        )
        for (plugin, target, instance), report in zip(checks, reports, strict=True)
    ]


async def _probe(provider: Provider[Any], target: TargetConfig, timeout: float) -> Health:
    try:
        async with asyncio.timeout(timeout):
            return await provider.health(target)
    except TimeoutError:
        return Health("not_serving", f"no health answer within {timeout:.1f} s")
    except Exception as error:
        return Health("unknown", f"health probe failed: {type(error).__name__}")


def _fleet_state(
    fleets: FleetRuntime | None, target: TargetConfig, instance: TargetConfig
) -> tuple[str | None, str | None]:
    fleet = fleets.get(target) if fleets is not None else None
    if fleet is None:
        return None, None
    for member in fleet.instances:
        if member.key == instance.key:
            return fleet.name, str(fleet.state_of(member))
    return fleet.name, None


def _circuit_state(policies: PolicyRuntime | None, target: TargetConfig) -> str | None:
    breaker = policies.breaker_of(target) if policies is not None else None
    return str(breaker.state) if breaker is not None else None
