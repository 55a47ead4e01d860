"""One instance of a fleet, and the states the balancer reads."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from providers.target import TargetConfig

if TYPE_CHECKING:
    from dispatcher.fleet.breaker import CircuitBreaker
    from dispatcher.fleet.shared_breaker import SharedBreaker

__all__ = ["FIXED", "Instance", "InstanceState", "label"]


class InstanceState(StrEnum):
    """Where an instance stands, as ``Dispatcher.health`` and ``dispatcher health`` show it.

    ``down`` comes from active health checks (``unhealthy_after`` failed probes in a row,
    until ``healthy_after`` pass), ``ejected`` from the calls themselves (the outlier
    detector). A down instance is reported down even while also ejected.
    """

    HEALTHY = "healthy"
    EJECTED = "ejected"
    DOWN = "down"
    #: No longer listed by its source: finishing its calls, then detached.
    LEAVING = "leaving"


#: Where a fixed instance (one the manifest lists) comes from, for ``dispatcher health``.
FIXED = "manifest"


def label(index: int, description: str) -> str:
    """An instance as log lines name it: ``instance 1 (http http://127.0.0.3:18181/invoke)``."""
    return f"instance {index} ({description})"


class Instance:
    """One concrete target of a fleet and its counters; the fleet keeps its state.

    ``index`` names the instance within its fleet for as long as the dispatcher runs:
    never reused, so an instance that leaves and one that joins are never confused (a
    retry avoiding "index 2" avoids that instance, not whichever took its place).
    """

    __slots__ = (
        "breaker",
        "calls",
        "down",
        "failures",
        "in_flight",
        "index",
        "key",
        "leaving",
        "probe_failures",
        "probe_successes",
        "shared_breaker",
        "source",
        "target",
        "weight",
    )

    def __init__(
        self, index: int, target: TargetConfig, *, weight: int = 1, source: str = FIXED
    ) -> None:
        self.index = index
        self.target = target
        self.key = target.key
        self.weight = weight
        #: Where the fleet learnt of it: ``manifest`` or a discovery source's name.
        self.source = source
        #: The instance's circuit breaker, made by the first method that configures one.
        self.breaker: CircuitBreaker | None = None
        #: With ``state: redis``, the breaker every replica shares, wrapping ``breaker``.
        #: Both are the instance's: one that leaves takes them along, and the policies'
        #: tables drop theirs once it is detached (``PolicyRuntime.forget_targets``).
        self.shared_breaker: SharedBreaker | None = None
        #: Its source no longer lists it: it takes no new call, and detaches once idle.
        self.leaving = False
        #: Calls sent and not answered yet: what least_request balances on.
        self.in_flight = 0
        #: Attempts sent to it, and how many ended with a health failure.
        self.calls = 0
        self.failures = 0
        #: Set by active health checks.
        self.down = False
        self.probe_failures = 0
        self.probe_successes = 0

    @property
    def label(self) -> str:
        """How every log line names it: its index and where it is, e.g. ``instance 1 (http
        http://127.0.0.3:18181/invoke)``, so an ejection matches the probe that saw it down."""
        return label(self.index, self.target.describe())

    def __repr__(self) -> str:
        state = " down" if self.down else " leaving" if self.leaving else ""
        return (
            f"<Instance {self.index} {self.target.describe()}{state} in_flight={self.in_flight}"
            f" calls={self.calls} failures={self.failures}>"
        )
