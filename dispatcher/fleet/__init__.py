"""Fleets: a target with several instances, balanced, watched, failed over.

The layer between the policies and the providers (``docs/architecture.md``, "Fleets"):

    policies ─► FleetStep ─► pick an instance ─► its breaker ─► provider.invoke(instance)

* ``sources``: where instances come from besides the manifest's list (``InstanceSource``:
  DNS, an etcd registry), and ``membership``: keeping the set in step with them while
  calls run (attach, join; leave, finish in-flight calls, detach);
* ``instances``, ``fleet``: the instance set and each instance's state
  (healthy / ejected / down / leaving), and picking one (``balancer``: least_request,
  round_robin, weighted);
* ``outlier``: passive health, ejecting an instance that keeps failing calls (I/O-free);
* ``health``: active health checks, one task per fleet;
* ``breaker``: the circuit breaker of one instance (I/O-free);
* ``step``: the step a fleet target's chain ends with, and failover.

A target with one fixed instance and no discovery source is not a fleet: its chain calls
the provider as before, with no step added. ``FleetRuntime`` holds the fleets of one
dispatcher (one per target, shared by every method and plugin calling it) and owns their
tasks (health checks, sources, membership): ``start`` starts them, ``aclose`` ends them,
``detach_all`` detaches the instances discovery brought: every fleet's at once, and
within one fleet at once where they share nothing (``DiscoveredAttachments``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from dispatcher.fleet.balancer import Balancer, LeastRequest, RoundRobin, Weighted
from dispatcher.fleet.breaker import BreakerState, CircuitBreaker, is_health_failure
from dispatcher.fleet.discovered import DiscoveredAttachments
from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.health import HealthChecker
from dispatcher.fleet.instances import Instance, InstanceState
from dispatcher.fleet.membership import Detached, Membership
from dispatcher.fleet.outlier import OutlierDetector
from dispatcher.fleet.sources import InstanceSource, new_source
from dispatcher.fleet.step import FleetStep, never_sent
from providers.base import Provider
from providers.target import PluginInfo, TargetConfig

__all__ = [
    "Balancer",
    "BreakerState",
    "CircuitBreaker",
    "Fleet",
    "FleetCheckpoint",
    "FleetRuntime",
    "FleetStep",
    "HealthChecker",
    "Instance",
    "InstanceSource",
    "InstanceState",
    "LeastRequest",
    "Membership",
    "OutlierDetector",
    "RoundRobin",
    "Weighted",
    "is_health_failure",
    "never_sent",
]


@dataclass(frozen=True, slots=True)
class FleetCheckpoint:
    """The fleets there were, and which versions served each (target key, plugin key)."""

    fleets: frozenset[str]
    serving: frozenset[tuple[str, str]]


class FleetRuntime:
    """The fleets of one dispatcher and the tasks that watch them."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        drain_timeout: float = 30.0,
        detached: Detached | None = None,
    ) -> None:
        self.clock = clock
        self.fleets: dict[str, Fleet] = {}
        self.checkers: list[HealthChecker] = []
        self.memberships: dict[str, Membership] = {}
        #: How long an instance that left waits for its calls before it is detached.
        self.drain_timeout = drain_timeout
        #: Told when a discovered instance that left its fleet is detached.
        self.detached = detached
        #: Who serves each fleet, and each discovered instance's attachments, by target key.
        self._discovered: dict[str, DiscoveredAttachments] = {}
        #: Health-check tasks by fleet (target key); fleets being watched.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watched: set[str] = set()
        #: Set by ``aclose``: a reload the close overtook starts no more watching.
        self._closed = False

    def fleet_of(self, target: TargetConfig, provider: Provider[Any]) -> Fleet | None:
        """The fleet of ``target`` (made on first use), or None when it is not a fleet."""
        fleet = self.fleets.get(target.key)
        if fleet is not None:
            return fleet
        if not target.is_fleet():
            return None
        weighted = target.weighted_instances()
        fleet = self.fleets[target.key] = Fleet(
            target,
            [each for each, _ in weighted],
            provider,
            self.clock,
            weights=[weight for _, weight in weighted],
        )
        return fleet

    def get(self, target: TargetConfig) -> Fleet | None:
        return self.fleets.get(target.key)

    def serve(self, plugin: PluginInfo, target: TargetConfig) -> None:
        """``plugin`` calls the fleet of ``target``: instances discovery brings are
        attached for it too (a new entry of a version serving already takes its place)."""
        discovered = self._discovered_of(target)
        if discovered is not None:
            discovered.serve(plugin)

    def unserve(self, plugin: PluginInfo, target: TargetConfig) -> None:
        """``plugin`` no longer calls the fleet of ``target`` (a reload removed it):
        instances discovery brings from now on are not attached for it. Those attached
        for it already are detached for it by ``release``, when they leave, or when
        ``forget`` ends the fleet."""
        discovered = self._discovered.get(target.key)
        if discovered is not None:
            discovered.stop_serving(plugin)

    async def attach_found(self, plugin: PluginInfo, target: TargetConfig) -> None:
        """Before a reload's routes swap: attach ``plugin`` (a version the reload adds)
        to the instances discovery already brought to the fleet of ``target``. An
        instance it cannot be attached to leaves the fleet, and joins again (for every
        version) at the next pass of the fleet's membership."""
        discovered = self._discovered.get(target.key)
        membership = self.memberships.get(target.key)
        if self._closed or discovered is None or membership is None:
            return
        if discovered.serves(plugin):
            return
        failed = await membership.exclusively(partial(discovered.add, plugin))
        for key in failed:
            membership.retire_member(key)

    def update(self, plugin: PluginInfo, target: TargetConfig) -> None:
        """Once a reload's routes swap: the entry of ``plugin``, a version the reload
        changed that still calls the fleet of ``target``, goes to the instances discovery
        brought (``Provider.update``), as ``Attachments.update`` hands it to those the
        manifest lists. An instance whose provider fails to take it (logged as for
        those) leaves the fleet, and joins again at the next pass with the new entry."""
        discovered = self._discovered.get(target.key)
        membership = self.memberships.get(target.key)
        if self._closed or discovered is None:
            return
        for key in discovered.update(plugin):
            if membership is not None:
                membership.retire_member(key)

    def make_for(self, plugin: PluginInfo, target: TargetConfig, provider: Provider[Any]) -> None:
        """Before a reload's routes swap: make the fleet of ``target`` if no running
        version calls it yet, served by ``plugin``, for ``watch_new`` to fill before calls
        reach it (made with the routes, it had no instance until after the swap)."""
        if target.key not in self.fleets and self.fleet_of(target, provider) is not None:
            self.serve(plugin, target)

    def checkpoint(self) -> FleetCheckpoint:
        """What ``roll_back`` returns to: taken before a reload's first step."""
        serving = {
            (key, plugin.key)
            for key, discovered in self._discovered.items()
            for plugin in discovered.serving
        }
        return FleetCheckpoint(frozenset(self.fleets), frozenset(serving))

    async def roll_back(self, checkpoint: FleetCheckpoint) -> None:
        """Undo a reload's first step, which went no further (it failed, or its caller
        gave up): the versions it added to fleets stop serving them and are detached from
        the instances found, and the fleets it made end."""
        added: dict[str, frozenset[str]] = {}
        for key, discovered in self._discovered.items():
            added[key] = frozenset(
                plugin.key
                for plugin in discovered.serving
                if (key, plugin.key) not in checkpoint.serving
            )
            for plugin in list(discovered.serving):
                if plugin.key in added[key]:
                    discovered.stop_serving(plugin)
        # Those alone: a version an earlier reload retired may still be attached, its
        # calls in flight (that reload's caller gave up during its wait); the next
        # reload's wait covers them, then ``release`` detaches it.
        for key, keys in added.items():
            found = self._discovered.get(key)
            membership = self.memberships.get(key)
            if keys and found is not None and membership is not None:
                await membership.exclusively(partial(found.release, only=keys))
        await self.forget(set(checkpoint.fleets))

    async def release(self) -> None:
        """After a reload's calls in flight ended: detach the discovered instances of the
        fleets still used from the versions that no longer call them."""
        # A copy: a detach awaits, and nothing must change the dict under the loop.
        for key, discovered in list(self._discovered.items()):
            membership = self.memberships.get(key)
            if membership is not None:
                await membership.exclusively(discovered.release)

    def _discovered_of(self, target: TargetConfig) -> DiscoveredAttachments | None:
        fleet = self.fleets.get(target.key)
        if fleet is None:
            return None
        discovered = self._discovered.get(target.key)
        if discovered is None:
            discovered = self._discovered[target.key] = DiscoveredAttachments(fleet.provider)
        return discovered

    async def start(self, *, first_read_timeout: float = 5.0) -> None:
        """Start watching every fleet: discovery sources (waiting until each has answered
        once, at most ``first_read_timeout``) and active health checks."""
        await self.watch_new(first_read_timeout=first_read_timeout)

    async def watch_new(self, *, first_read_timeout: float = 5.0) -> None:
        """Start watching the fleets not watched yet: all of them at start, those a reload
        made since."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        fresh = [fleet for key, fleet in self.fleets.items() if key not in self._watched]
        self._watched.update(fleet.target.key for fleet in fresh)
        memberships = [
            self._membership(fleet, sources)
            for fleet in fresh
            if (sources := self._sources_of(fleet))
        ]
        for membership in memberships:
            self._inherit(membership)
        await asyncio.gather(*(each.start(first_read_timeout) for each in memberships))
        for fleet in fresh:
            settings = fleet.settings.health_check
            if settings is None:
                continue
            checker = HealthChecker(fleet, settings)
            self.checkers.append(checker)
            self._tasks[fleet.target.key] = loop.create_task(
                checker.run(), name=f"health checks of {fleet.name}"
            )

    def _inherit(self, membership: Membership) -> None:
        """A fleet a reload made (another balance, another timeout: another target) whose
        source reads the place a running fleet's source reads starts from what that one
        listed last: a source that cannot read as the reload comes (etcd or DNS down) keeps
        those instances, as the running fleet's did. Made empty, the fleet had no instance
        and every call failed until the source read again. A first read in time replaces
        them before anything is attached (``Membership.start``)."""
        for index, spec in enumerate(membership.fleet.target.instance_sources()):
            for other in self.memberships.values():
                if other is not membership and (listed := other.listed_from(spec)):
                    membership.inherit(index, listed)
                    break

    def instance_keys(self) -> set[str]:
        """The keys of every instance of every fleet: its members, and those that left
        and still drain their calls, attached."""
        keys = {instance.key for fleet in self.fleets.values() for instance in fleet.instances}
        for membership in self.memberships.values():
            keys.update(membership.attached)
        return keys

    @property
    def retiring(self) -> bool:
        """Whether some discovered instance is still attached for a version that no
        longer calls its fleet (a reload given up in its wait left it): ``release``
        detaches it."""
        return any(each.retiring for each in self._discovered.values())

    def unused(self, used: set[str]) -> bool:
        """Whether some fleet's target key is not in ``used`` (``forget`` would end it)."""
        return any(key not in used for key in self.fleets)

    async def forget(self, used: set[str]) -> None:
        """Stop watching the fleets whose target key is not in ``used`` (a reload removed
        every plugin calling them): their health checks and discovery end, and the
        instances discovery attached are detached: the fleets' at once."""
        tasks: list[asyncio.Task[None]] = []
        memberships: list[Membership] = []
        for key in [key for key in self.fleets if key not in used]:
            fleet = self.fleets.pop(key)
            self._watched.discard(key)
            self._discovered.pop(key, None)
            self.checkers = [each for each in self.checkers if each.fleet is not fleet]
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()
                tasks.append(task)
            membership = self.memberships.pop(key, None)
            if membership is not None:
                memberships.append(membership)
        await asyncio.gather(*tasks, return_exceptions=True)
        await _each_at_once(memberships, Membership.aclose)
        await _each_at_once(memberships, Membership.detach_all)

    async def aclose(self) -> None:
        """End every task; discovered instances stay attached until ``detach_all``."""
        self._closed = True
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _each_at_once(list(self.memberships.values()), Membership.aclose)

    async def detach_all(self) -> None:
        """Detach the instances discovery brought to every fleet, the fleets at once (a
        failure is logged, and the other detaches go on)."""
        await _each_at_once(list(self.memberships.values()), Membership.detach_all)

    def stats(self) -> dict[str, Any]:
        return {fleet.name: fleet.stats() for fleet in self.fleets.values()}

    @staticmethod
    def _sources_of(fleet: Fleet) -> list[InstanceSource]:
        """The manifest's discovery sources of ``fleet``, and its provider's own, if any."""
        sources = [new_source(spec) for spec in fleet.target.instance_sources()]
        own = fleet.provider.instance_source(fleet.target)
        return sources if own is None else [*sources, own]

    def _membership(self, fleet: Fleet, sources: list[InstanceSource]) -> Membership:
        discovered = self._discovered_of(fleet.target)
        assert discovered is not None  # the fleet is in self.fleets
        membership = self.memberships[fleet.target.key] = Membership(
            fleet,
            sources,
            attach=discovered.attach,
            detach=discovered.detach,
            drain_timeout=self.drain_timeout,
            detached=self.detached,
        )
        return membership

    def __repr__(self) -> str:
        return f"<FleetRuntime fleets={len(self.fleets)} tasks={len(self._tasks)}>"


async def _each_at_once(
    memberships: list[Membership], step: Callable[[Membership], Awaitable[None]]
) -> None:
    """``step`` of each of ``memberships`` at once, each to its end before anything is
    raised: a provider must not close under a detach still running in another fleet. A
    cancel reaches each one's detaches (``in_queues``: those under way end, no other
    starts), and is raised once they have ended."""
    outcomes = await asyncio.gather(*(step(each) for each in memberships), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
