"""One instance of a fleet, and the states the balancer reads."""

from __future__ import annotations

from enum import StrEnum

from providers.target import TargetConfig

__all__ = ["Instance", "InstanceState"]


class InstanceState(StrEnum):
    """Where an instance stands, as ``Dispatcher.health`` and ``dispatcher health`` show it.

    ``down`` comes from active health checks (``unhealthy_after`` failed probes in a row,
    until ``healthy_after`` pass), ``ejected`` from the calls themselves (the outlier
    detector). A down instance is reported down even while also ejected.
    """

    HEALTHY = "healthy"
    EJECTED = "ejected"
    DOWN = "down"


class Instance:
    """One concrete target of a fleet and its counters; the fleet keeps its state."""

    __slots__ = (
        "calls",
        "down",
        "failures",
        "in_flight",
        "index",
        "key",
        "probe_failures",
        "probe_successes",
        "target",
    )

    def __init__(self, index: int, target: TargetConfig) -> None:
        self.index = index
        self.target = target
        self.key = target.key
        #: Calls sent and not answered yet: what least_request balances on.
        self.in_flight = 0
        #: Attempts sent to it, and how many ended with a health failure.
        self.calls = 0
        self.failures = 0
        #: Set by active health checks.
        self.down = False
        self.probe_failures = 0
        self.probe_successes = 0

    def __repr__(self) -> str:
        state = " down" if self.down else ""
        return (
            f"<Instance {self.index} {self.target.describe()}{state} in_flight={self.in_flight}"
            f" calls={self.calls} failures={self.failures}>"
        )
