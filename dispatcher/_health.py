"""``Dispatcher.health``: every target of every plugin probed, one report each.

A fleet reports each of its instances as they are now (discovered ones included), with
the instance's state in the fleet, its breaker and where it came from, and one report per
discovery source: ``serving`` when its last read succeeded, ``not_serving`` with the
reason when it failed (the fleet keeps calling the instances it listed before). A probe that times out is ``not_serving``; one that fails in a way its provider
did not translate is ``unknown`` (providers must not raise from ``health``).

A target that serves is asked, within what is left of the same timeout, which methods its
plugin serves (``Provider.served_methods``); the methods the manifest routes there and the
plugin lacks are ``missing_methods`` (``dispatcher._served``). They leave ``health`` as
the probe said (the plugin serves its other methods) but make the report not ``ok``. A
plugin that cannot say, or does not answer in time, has none: never a false alarm.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from dispatcher._served import methods_routed_to, missing_methods
from dispatcher.config import Manifest, PluginSpec
from dispatcher.fleet import Fleet, FleetRuntime, Instance, InstanceSource
from dispatcher.policies import PolicyRuntime
from providers.base import Health, Provider
from providers.target import TargetConfig

__all__ = ["TargetHealth", "probe_targets"]

log = logging.getLogger("dispatcher")


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
    #: Methods the manifest routes to this target that its plugin says it does not serve
    #: (their calls fail ``method_not_found``).
    missing_methods: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Serving, and serving every method the manifest routes here."""
        return self.health.ok and not self.missing_methods


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
    checks: list[_Check] = []
    sources: list[TargetHealth] = []
    for plugin in manifest.plugins:
        for target in plugin.targets():
            routed = methods_routed_to(plugin, target)
            fleet = fleets.get(target) if fleets is not None else None
            if fleet is None:
                checks += [_Check(plugin, each, routed) for each in target.instance_targets()]
                continue
            checks += [
                _Check(plugin, each.target, routed, (fleet, each)) for each in fleet.instances
            ]
            sources += [_source_report(plugin, fleet, source, draining) for source in fleet.sources]
    reports = await asyncio.gather(
        *(_probe(providers[check.target.provider], check, timeout) for check in checks)
    )
    return [
        TargetHealth(
            check.plugin.id,
            check.plugin.version,
            check.target.describe(),
            health,
            _circuit_state(policies, check.target),
            *_fleet_state(check.member),
            draining=draining,
            unenforced=_unenforced(providers[check.target.provider], check.plugin, check.target),
            missing_methods=missing,
        )
        for check, (health, missing) in zip(checks, reports, strict=True)
    ] + sources


@dataclass(frozen=True, slots=True)
class _Check:
    """One concrete target to probe, and the methods the manifest routes to it."""

    plugin: PluginSpec[Any]
    target: TargetConfig
    routed: tuple[str, ...]
    member: tuple[Fleet, Instance] | None = None


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


async def _probe(
    provider: Provider[Any], check: _Check, timeout: float
) -> tuple[Health, tuple[str, ...]]:
    """The target's health and, when it serves, the routed methods its plugin lacks; both
    within ``timeout`` in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    health = await _health_of(provider, check.target, timeout)
    if not health.ok or not check.routed:
        return health, ()
    served = await _served_of(provider, check, deadline - loop.time())
    return health, missing_methods(check.routed, served)


async def _health_of(provider: Provider[Any], target: TargetConfig, timeout: float) -> Health:
    try:
        async with asyncio.timeout(timeout):
            return await provider.health(target)
    except TimeoutError:
        return Health("not_serving", f"no health answer within {timeout:.1f} s")
    except Exception as error:
        return Health("unknown", f"health probe failed: {type(error).__name__}")


async def _served_of(
    provider: Provider[Any], check: _Check, timeout: float
) -> frozenset[str] | None:
    """What the plugin says it serves; None when it cannot say, does not in time, or the
    provider fails to ask (it must not raise: a bug there costs the report, not health)."""
    if timeout <= 0:
        return None
    try:
        async with asyncio.timeout(timeout):
            return await provider.served_methods(check.plugin, check.target, timeout=timeout)
    except TimeoutError:
        return None
    except Exception:
        log.exception("%s: asking %s what it serves failed", check.plugin.key, provider.name)
        return None


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
    return policies.circuit_state(target) if policies is not None else None
