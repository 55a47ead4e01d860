"""Balancers: which of the instances in service gets the next call.

``least_request`` (the default) is the power of two random choices on calls in flight:
two instances drawn at random, the one with fewer unanswered calls wins. It needs no
global scan, and it steers away from a slow instance (its calls pile up) without the herd
behaviour of always picking the single least loaded one. ``round_robin`` takes them in
turn. ``weighted`` draws at random in proportion to each instance's ``weight`` (the
manifest's, an SRV record's, a registration's). All see only the instances handed to
them; the fleet decides which are in service. ``least_request`` and ``round_robin``
ignore weights.
"""

from __future__ import annotations

import abc
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from random import random

from dispatcher.fleet.instances import Instance
from providers.target import Balance

__all__ = ["Balancer", "LeastRequest", "RoundRobin", "Weighted", "new_balancer"]


class Balancer(abc.ABC):
    @abc.abstractmethod
    def choose(self, instances: Sequence[Instance]) -> Instance:
        """One of ``instances`` (never empty)."""


class LeastRequest(Balancer):
    __slots__ = ()

    def choose(self, instances: Sequence[Instance]) -> Instance:
        count = len(instances)
        if count == 1:
            return instances[0]
        first = int(random() * count)
        second = int(random() * (count - 1))
        if second >= first:  # two distinct draws without a retry loop
            second += 1
        one = instances[first]
        other = instances[second]
        return other if other.in_flight < one.in_flight else one

    def __repr__(self) -> str:
        return "<LeastRequest>"


class RoundRobin(Balancer):
    __slots__ = ("_turn",)

    def __init__(self) -> None:
        self._turn = -1

    def choose(self, instances: Sequence[Instance]) -> Instance:
        self._turn = turn = self._turn + 1
        return instances[turn % len(instances)]

    def __repr__(self) -> str:
        return f"<RoundRobin turn={self._turn}>"


class Weighted(Balancer):
    """Random in proportion to weight: O(log n) per pick over running sums kept per set."""

    __slots__ = ("_for", "_sums")

    def __init__(self) -> None:
        self._for: Sequence[Instance] | None = None
        self._sums: list[int] = []

    def choose(self, instances: Sequence[Instance]) -> Instance:
        if instances is not self._for:  # the fleet replaces its tuple when the set changes
            self._sums = list(accumulate(instance.weight for instance in instances))
            self._for = instances
        sums = self._sums
        return instances[bisect_right(sums, random() * sums[-1])]

    def __repr__(self) -> str:
        return f"<Weighted total={self._sums[-1] if self._sums else 0}>"


def new_balancer(balance: Balance) -> Balancer:
    if balance == "round_robin":
        return RoundRobin()
    if balance == "weighted":
        return Weighted()
    return LeastRequest()
