"""A fleet: the instances of one target, which of them are in service, and picking one.

An instance is *in service* unless an active health check has marked it down or the
outlier detector has ejected it. ``pick`` hands the balancer the instances in service;
when none is, it hands it every instance (panic mode, as Envoy does): a call tried on an
instance believed unwell may still succeed, a call refused outright cannot. The hot path
(every instance in service, nothing to avoid) reads no clock and builds no list.

Synchronous and free of I/O: the step that calls the provider (``step``) and the task
that probes instances (``health``) report what they saw through ``record_*``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.fleet.balancer import new_balancer
from dispatcher.fleet.instances import Instance, InstanceState
from dispatcher.fleet.outlier import OutlierDetector
from providers.base import Provider
from providers.target import FleetSettings, TargetConfig

__all__ = ["Fleet"]

log = logging.getLogger("dispatcher.fleet")


class Fleet:
    """The instances of one target (``TargetConfig.instance_targets()``)."""

    def __init__(
        self,
        target: TargetConfig,
        instances: Sequence[TargetConfig],
        provider: Provider[Any],
        clock: Callable[[], float],
        settings: FleetSettings | None = None,
    ) -> None:
        self.target = target
        self.name = target.describe()
        self.provider = provider
        self.settings = settings or target.fleet_settings()
        self.instances = tuple(Instance(index, each) for index, each in enumerate(instances))
        self.balancer = new_balancer(self.settings.balance)
        outlier = self.settings.outlier
        self.outliers = OutlierDetector(
            self.name,
            len(self.instances),
            consecutive_failures=outlier.consecutive_failures,
            base_ejection=outlier.base_ejection_ms / 1000,
            max_ejection=outlier.max_ejection_ms / 1000,
            max_ejected_percent=outlier.max_ejected_percent,
            clock=clock,
        )
        #: Instances marked down by active health checks.
        self.down = 0
        #: Attempts moved to another instance because they never reached the first.
        self.failovers = 0

    # -- choosing --------------------------------------------------------------------

    def pick(self, avoid: Sequence[int] | None = None) -> Instance | None:
        """An instance for the next attempt, none of ``avoid`` (indices); None if none is left."""
        if avoid is None and not self.down and not self.outliers.ejected:
            return self.balancer.choose(self.instances)
        return self._pick_among_some(avoid or ())

    def _pick_among_some(self, avoid: Sequence[int]) -> Instance | None:
        allowed = [instance for instance in self.instances if instance.index not in avoid]
        if not allowed:
            return None
        in_service = [instance for instance in allowed if self.in_service(instance)]
        return self.balancer.choose(in_service or allowed)

    def in_service(self, instance: Instance) -> bool:
        return not instance.down and not self.outliers.is_ejected(instance.index)

    def state_of(self, instance: Instance) -> InstanceState:
        if instance.down:
            return InstanceState.DOWN
        if self.outliers.is_ejected(instance.index):
            return InstanceState.EJECTED
        return InstanceState.HEALTHY

    # -- what calls and probes saw ------------------------------------------------------

    def record_success(self, instance: Instance) -> None:
        self.outliers.failures[instance.index] = 0

    def record_failure(self, instance: Instance) -> None:
        """A health failure (``is_health_failure``) of a call sent to ``instance``."""
        instance.failures += 1
        if self.outliers.record_failure(instance.index):
            instance.probe_successes = 0  # only probes after the ejection may end it early

    def record_probe(
        self, instance: Instance, serving: bool, unhealthy_after: int, healthy_after: int
    ) -> None:
        """What an active health check of ``instance`` found.

        ``unhealthy_after`` failed probes in a row mark it down; ``healthy_after`` passed
        probes in a row bring it back, and end an ejection too: the instance answers its
        probes again, so its calls should have their chance (Envoy's default).
        """
        if serving:
            instance.probe_failures = 0
            instance.probe_successes += 1
            if instance.probe_successes >= healthy_after:
                if instance.down:
                    instance.down = False
                    self.down -= 1
                    log.info("%s: instance %s is up again", self.name, instance.target.describe())
                self.outliers.release(instance.index)
        else:
            instance.probe_successes = 0
            instance.probe_failures += 1
            if instance.probe_failures >= unhealthy_after and not instance.down:
                instance.down = True
                self.down += 1
                log.warning("%s: instance %s is down", self.name, instance.target.describe())

    def stats(self) -> dict[str, Any]:
        return {
            "balance": self.settings.balance,
            "failovers": self.failovers,
            "ejections": self.outliers.total_ejections,
            "instances": [
                {
                    "target": instance.target.describe(),
                    "state": str(self.state_of(instance)),
                    "in_flight": instance.in_flight,
                    "calls": instance.calls,
                    "failures": instance.failures,
                    "ejected_for_s": round(self.outliers.ejection_left(instance.index), 3),
                }
                for instance in self.instances
            ],
        }

    def __repr__(self) -> str:
        states = ", ".join(str(self.state_of(instance)) for instance in self.instances)
        return f"<Fleet {self.name} [{states}] failovers={self.failovers}>"
