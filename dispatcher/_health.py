"""``Dispatcher.health``: every target of every plugin probed, one report each.

A fleet reports each of its instances as they are now (discovered ones included), with
the instance's state in the fleet, its breaker and where it came from, and one report per
discovery source: ``serving`` when its last read succeeded, ``not_serving`` with the
reason when it failed (the fleet keeps calling the instances it listed before). A probe that times out is ``not_serving``; one that fails in a way its provider
did not translate is ``unknown`` (providers must not raise from ``health``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from dispatcher.config import Manifest, PluginSpec
from dispatcher.fleet import Fleet, FleetRuntime, Instance, InstanceSource
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
    #: Where a fleet's instance came from: ``manifest`` or a discovery source; for the
    #: report of a source itself, ``source``.
    source: str | None = None
    #: True while the dispatcher drains (``Dispatcher.drain``): it takes no new calls, so a
    #: load balancer should send them to another replica, whatever the target's health.
    draining: bool = False
    #: What the target's provider cannot enforce of the plugin's capabilities on this
    #: machine (``Provider.sandbox``): reported, never skipped silently.
    unenforced: tuple[str, ...] = ()


async def probe_targets(
    manifest: Manifest[Any],
    providers: dict[str, Provider[Any]],
    policies: PolicyRuntime | None,
    fleets: FleetRuntime | None,
    *,
    timeout: float,
    draining: bool,
) -> list[TargetHealth]:
    """One report per target (per instance and per source, for a fleet), probed concurrently."""
    checks: list[tuple[PluginSpec[Any], TargetConfig, tuple[Fleet, Instance] | None]] = []
    sources: list[TargetHealth] = []
    for plugin in manifest.plugins:
        for target in plugin.targets():
            fleet = fleets.get(target) if fleets is not None else None
            if fleet is None:
                checks += [(plugin, each, None) for each in target.instance_targets()]
                continue
            checks += [(plugin, each.target, (fleet, each)) for each in fleet.instances]
            sources += [_source_report(plugin, fleet, source, draining) for source in fleet.sources]
    reports = await asyncio.gather(
        *(_probe(providers[each.provider], each, timeout) for _, each, _ in checks)
    )
    return [
        TargetHealth(
            plugin.id,
            plugin.version,
            target.describe(),
            report,
            _circuit_state(policies, target),
            *_fleet_state(member),
            draining=draining,
            unenforced=_unenforced(providers[target.provider], plugin, target),
        )
        for (plugin, target, member), report in zip(checks, reports, strict=True)
    ] + sources


def _source_report(
    plugin: PluginSpec[Any], fleet: Fleet, source: InstanceSource, draining: bool
) -> TargetHealth:
    listed = sum(1 for instance in fleet.instances if instance.source == source.name)
    if source.error is not None:
        health = Health("not_serving", f"{source.error}; keeping the {listed} instances it listed")
    elif not source.reads:
        health = Health("unknown", "not read yet")
    else:
        health = Health("serving", f"lists {listed} instances")
    return TargetHealth(
        plugin.id,
        plugin.version,
        source.name,
        health,
        None,
        fleet.name,
        "source",
        "source",
        draining=draining,
    )


async def _probe(provider: Provider[Any], target: TargetConfig, timeout: float) -> Health:
    try:
        async with asyncio.timeout(timeout):
            return await provider.health(target)
    except TimeoutError:
        return Health("not_serving", f"no health answer within {timeout:.1f} s")
    except Exception as error:
        return Health("unknown", f"health probe failed: {type(error).__name__}")


def _unenforced(
    provider: Provider[Any], plugin: PluginSpec[Any], target: TargetConfig
) -> tuple[str, ...]:
    translation = provider.sandbox(plugin, target)
    return tuple(translation.unenforced) if translation is not None else ()


def _fleet_state(
    member: tuple[Fleet, Instance] | None,
) -> tuple[str | None, str | None, str | None]:
    """The fleet, state and source of an instance; all None for a target that is no fleet."""
    if member is None:
        return None, None, None
    fleet, instance = member
    return fleet.name, str(fleet.state_of(instance)), instance.source


def _circuit_state(policies: PolicyRuntime | None, target: TargetConfig) -> str | None:
    breaker = policies.breaker_of(target) if policies is not None else None
    return str(breaker.state) if breaker is not None else None
