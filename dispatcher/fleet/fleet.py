"""A fleet: the instances of one target, which of them are in service, and picking one.

The set changes while calls run: ``join`` adds an instance (attached by then), ``leave``
takes one out of the set at once, so no new call picks it, while its calls in flight
finish (``dispatcher.fleet.membership`` decides who joins and leaves, and detaches those
that left once they are idle). ``instances`` is replaced, never mutated, so a call that
read it holds a consistent tuple.

An instance is *in service* unless an active health check has marked it down or the
outlier detector has ejected it. ``pick`` hands the balancer the instances in service;
when none is, it hands it every instance (panic mode, as Envoy does): a call tried on an
instance believed unwell may still succeed, a call refused outright cannot. The hot path
(every instance in service, nothing to avoid) reads no clock and builds no list. With
some out of service, the tuple of those in service is kept until the set, a health check
or an ejection changes it, or the earliest ejection ends: built on every pick, it cost
each call 88 µs with one instance down of 1,000 (109 µs weighted, whose running sums were
built again too; ``bench fleet``), just when a degraded fleet needs its capacity.

Synchronous and free of I/O: the step that calls the provider (``step``) and the task
that probes instances (``health``) report what they saw through ``record_*``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from dispatcher.fleet.balancer import new_balancer
from dispatcher.fleet.instances import FIXED, Instance, InstanceState, label
from dispatcher.fleet.outlier import OutlierDetector
from dispatcher.fleet.sources import InstanceSource
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
        *,
        weights: Sequence[int] | None = None,
    ) -> None:
        self.target = target
        self.name = target.describe()
        self.provider = provider
        self.settings = settings or target.fleet_settings()
        weights = weights or [1] * len(instances)
        self.instances = tuple(
            Instance(index, each, weight=weight)
            for index, (each, weight) in enumerate(zip(instances, weights, strict=True))
        )
        self._next_index = len(self.instances)
        self.balancer = new_balancer(self.settings.balance)
        self._clock = clock
        #: The instances in service when some are not (``_in_service_now``), for which
        #: tuple of ``instances`` they were found, and until when they hold: the earliest
        #: end of an ejection. ``None``: to be found again (a health check or an ejection
        #: changed them).
        self._serving: tuple[Instance, ...] | None = None
        self._serving_of: tuple[Instance, ...] = ()
        self._serving_until = math.inf
        outlier = self.settings.outlier
        self.outliers = OutlierDetector(
            self.name,
            len(self.instances),
            consecutive_failures=outlier.consecutive_failures,
            base_ejection=outlier.base_ejection_ms / 1000,
            max_ejection=outlier.max_ejection_ms / 1000,
            max_ejected_percent=outlier.max_ejected_percent,
            clock=clock,
            describe=self._label,
        )
        #: Instances marked down by active health checks.
        self.down = 0
        #: Attempts moved to another instance because they never reached the first.
        self.failovers = 0
        #: The discovery sources watched for this fleet (``membership``), for reports.
        self.sources: tuple[InstanceSource, ...] = ()

    # -- membership --------------------------------------------------------------------

    def member(self, key: str) -> Instance | None:
        """The instance whose target has ``key``, if it is in the set."""
        for instance in self.instances:
            if instance.key == key:
                return instance
        return None

    def join(self, target: TargetConfig, *, weight: int = 1, source: str = FIXED) -> Instance:
        """Add the instance of ``target`` (attached already); it takes calls at once."""
        instance = Instance(self._next_index, target, weight=weight, source=source)
        self._next_index += 1
        self.instances = (*self.instances, instance)
        self.outliers.resize(len(self.instances))
        log.info("%s: %s joined (%s)", self.name, instance.label, source)
        return instance

    def leave(self, instance: Instance) -> None:
        """Take ``instance`` out of the set: no new call picks it; calls in flight finish."""
        if instance.leaving:
            return
        instance.leaving = True
        self.instances = tuple(each for each in self.instances if each is not instance)
        if instance.down:
            instance.down = False
            self.down -= 1
        self.outliers.forget(instance.index)
        self.outliers.resize(len(self.instances))
        log.info("%s: %s left (%s)", self.name, instance.label, instance.source)

    def _label(self, index: int) -> str:
        """How log lines name the instance at ``index`` (the outlier detector's lines too)."""
        for instance in self.instances:
            if instance.index == index:
                return instance.label
        return label(index, "no longer in the fleet")

    def reweigh(self, instance: Instance, weight: int) -> None:
        instance.weight = weight
        self.instances = tuple(self.instances)  # a new tuple: balancers re-read weights

    def why_empty(self) -> str:
        """Why no instance is known, for the error a call then gets."""
        if not self.sources:
            return "the manifest lists none"
        return "; ".join(
            f"{source.name}: {source.error or ('listed none' if source.reads else 'not read yet')}"
            for source in self.sources
        )

    # -- choosing --------------------------------------------------------------------

    def pick(self, avoid: Sequence[int] | None = None) -> Instance | None:
        """An instance for the next attempt, none of ``avoid`` (indices); None if none is left."""
        instances = self.instances
        if not instances:
            return None
        if not self.down and not self.outliers.ejected:
            if not avoid:
                return self.balancer.choose(instances)
            serving: tuple[Instance, ...] = instances
        else:
            serving = self._in_service_now()
            if not avoid:
                return self.balancer.choose(serving or instances)
        allowed = [instance for instance in instances if instance.index not in avoid]
        if not allowed:
            return None
        if serving is instances:  # all in service: nothing more to leave out
            return self.balancer.choose(allowed)
        in_service = [instance for instance in serving if instance.index not in avoid]
        return self.balancer.choose(in_service or allowed)

    def _in_service_now(self) -> tuple[Instance, ...]:
        """The instances in service (some are not), found again only when they may differ."""
        serving = self._serving
        if (
            serving is None
            or self._serving_of is not self.instances
            or not self._clock() < self._serving_until
        ):
            instances = self.instances
            serving = self._serving = tuple(each for each in instances if self.in_service(each))
            self._serving_of = instances
            self._serving_until = min(self.outliers.ejected_until.values(), default=math.inf)
        return serving

    def in_service(self, instance: Instance) -> bool:
        return not instance.down and not self.outliers.is_ejected(instance.index)

    def state_of(self, instance: Instance) -> InstanceState:
        if instance.leaving:
            return InstanceState.LEAVING
        if instance.down:
            return InstanceState.DOWN
        if self.outliers.is_ejected(instance.index):
            return InstanceState.EJECTED
        return InstanceState.HEALTHY

    # -- what calls and probes saw ------------------------------------------------------

    def record_success(self, instance: Instance) -> None:
        if not instance.leaving:
            self.outliers.record_success(instance.index)

    def record_failure(self, instance: Instance) -> None:
        """A health failure (``is_health_failure``) of a call sent to ``instance``."""
        instance.failures += 1
        if not instance.leaving and self.outliers.record_failure(instance.index):
            instance.probe_successes = 0  # only probes after the ejection may end it early
            self._serving = None

    def record_probe(
        self, instance: Instance, serving: bool, unhealthy_after: int, healthy_after: int
    ) -> None:
        """What an active health check of ``instance`` found.

        ``unhealthy_after`` failed probes in a row mark it down; ``healthy_after`` passed
        probes in a row bring it back, and end an ejection too: the instance answers its
        probes again, so its calls should have their chance (Envoy's default).
        """
        if instance.leaving:
            return
        if serving:
            instance.probe_failures = 0
            instance.probe_successes += 1
            if instance.probe_successes >= healthy_after:
                if instance.down:
                    instance.down = False
                    self.down -= 1
                    self._serving = None
                    log.info("%s: %s is up again", self.name, instance.label)
                if instance.index in self.outliers.ejected_until:
                    self.outliers.release(instance.index)
                    self._serving = None
        else:
            instance.probe_successes = 0
            instance.probe_failures += 1
            if instance.probe_failures >= unhealthy_after and not instance.down:
                instance.down = True
                self.down += 1
                self._serving = None
                log.warning("%s: %s is down", self.name, instance.label)

    def stats(self) -> dict[str, Any]:
        return {
            "balance": self.settings.balance,
            "sources": [
                {
                    "source": source.name,
                    "reads": source.reads,
                    "failed_reads": source.failed_reads,
                    "error": source.error,
                }
                for source in self.sources
            ],
            "failovers": self.failovers,
            "ejections": self.outliers.total_ejections,
            "instances": [
                {
                    "target": instance.target.describe(),
                    "source": instance.source,
                    "weight": instance.weight,
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
