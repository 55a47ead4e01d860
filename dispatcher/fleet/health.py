"""Active health checks: one task per fleet, probing every instance each interval.

The probe is the provider's own ``health(instance)`` (for HTTP: ``GET health_path``,
serving on a 200), bounded by ``timeout_ms``; a probe that raises or times out is a
failed one. What the probes mean for the instance (down after ``unhealthy_after``
failures, back after ``healthy_after`` passes) is decided by ``Fleet.record_probe``,
synchronously. The task belongs to ``FleetRuntime``, which the dispatcher closes in
``aclose``; instances are assumed serving until the first probes say otherwise.
"""

from __future__ import annotations

import asyncio
import logging

from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.instances import Instance
from providers.target import HealthCheck

__all__ = ["HealthChecker"]

log = logging.getLogger("dispatcher.fleet")


class HealthChecker:
    def __init__(self, fleet: Fleet, settings: HealthCheck) -> None:
        self.fleet = fleet
        self.settings = settings
        self.rounds = 0

    async def run(self) -> None:
        """Probe every instance, wait ``interval_ms``, again, until cancelled."""
        interval = self.settings.interval_ms / 1000
        while True:
            await self.probe_all()
            await asyncio.sleep(interval)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(instance) for instance in self.fleet.instances))
        self.rounds += 1

    async def _probe(self, instance: Instance) -> None:
        settings = self.settings
        try:
            async with asyncio.timeout(settings.timeout_ms / 1000):
                health = await self.fleet.provider.health(instance.target)
            serving = health.ok
        except TimeoutError:
            serving = False
        except Exception:  # a provider's health must not raise; if it does, it failed
            log.exception("%s: health probe of %s raised", self.fleet.name, instance.label)
            serving = False
        self.fleet.record_probe(instance, serving, settings.unhealthy_after, settings.healthy_after)

    def __repr__(self) -> str:
        return f"<HealthChecker {self.fleet.name} every {self.settings.interval_ms} ms rounds={self.rounds}>"
