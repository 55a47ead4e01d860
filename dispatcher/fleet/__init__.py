"""Fleets: a target with several instances, balanced, watched, failed over.

The layer between the policies and the providers (``docs/architecture.md``, "Fleets"):

    policies ─► FleetStep ─► pick an instance ─► its breaker ─► provider.invoke(instance)

* ``sources``: where the instances come from (``InstanceSource``; static lists only, so far);
* ``instances``, ``fleet``: the instance set and each instance's state
  (healthy / ejected / down), and picking one (``balancer``: least_request, round_robin);
* ``outlier``: passive health, ejecting an instance that keeps failing calls (I/O-free);
* ``health``: active health checks, one task per fleet;
* ``breaker``: the circuit breaker of one instance (I/O-free);
* ``step``: the step a fleet target's chain ends with, and failover.

A target with one instance is not a fleet: its chain calls the provider as before, with
no step added. ``FleetRuntime`` holds the fleets of one dispatcher (one per target, shared
by every method calling it) and owns their health-check tasks: ``start`` starts them,
``aclose`` ends them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dispatcher.fleet.balancer import Balancer, LeastRequest, RoundRobin
from dispatcher.fleet.breaker import BreakerState, CircuitBreaker, is_health_failure
from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.health import HealthChecker
from dispatcher.fleet.instances import Instance, InstanceState
from dispatcher.fleet.outlier import OutlierDetector
from dispatcher.fleet.sources import InstanceSource
from dispatcher.fleet.step import FleetStep, never_sent
from providers.base import Provider
from providers.target import TargetConfig

__all__ = [
    "Balancer",
    "BreakerState",
    "CircuitBreaker",
    "Fleet",
    "FleetRuntime",
    "FleetStep",
    "HealthChecker",
    "Instance",
    "InstanceSource",
    "InstanceState",
    "LeastRequest",
    "OutlierDetector",
    "RoundRobin",
    "is_health_failure",
    "never_sent",
]


class FleetRuntime:
    """The fleets of one dispatcher and the tasks that watch them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.fleets: dict[str, Fleet] = {}
        self.checkers: list[HealthChecker] = []
        self._tasks: list[asyncio.Task[None]] = []

    def fleet_of(self, target: TargetConfig, provider: Provider[Any]) -> Fleet | None:
        """The fleet of ``target`` (made on first use), or None when it has one instance."""
        fleet = self.fleets.get(target.key)
        if fleet is not None:
            return fleet
        if not target.is_fleet():
            return None
        fleet = self.fleets[target.key] = Fleet(
            target, target.instance_targets(), provider, self.clock
        )
        return fleet

    def get(self, target: TargetConfig) -> Fleet | None:
        return self.fleets.get(target.key)

    def start(self) -> None:
        """Start the active health checks of every fleet that configures them."""
        for fleet in self.fleets.values():
            settings = fleet.settings.health_check
            if settings is None:
                continue
            checker = HealthChecker(fleet, settings)
            self.checkers.append(checker)
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    checker.run(), name=f"health checks of {fleet.name}"
                )
            )

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {fleet.name: fleet.stats() for fleet in self.fleets.values()}

    def __repr__(self) -> str:
        return f"<FleetRuntime fleets={len(self.fleets)} checks={len(self._tasks)}>"
