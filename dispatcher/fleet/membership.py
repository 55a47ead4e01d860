"""Who is in a fleet: its fixed instances plus what its discovery sources list, kept in step.

    source.run ─report─► Membership (per source: the targets it lists) ─► reconcile
        joined:  attach (every plugin on the fleet) ─► Fleet.join   ─► takes calls
        gone:    Fleet.leave (no new calls) ─► calls in flight finish ─► detach

Reports are synchronous and only record what a source lists; one task per fleet
reconciles, so attaches and detaches never race and a burst of reports costs one pass.
An instance listed by several sources (or also fixed) is one instance: the first to list
it names its source and weight. Fixed instances never leave; the dispatcher attached
them and detaches them. An endpoint the target cannot turn into a valid target, or that
the egress policy refuses, is skipped and logged once while its source lists it (what
each endpoint became is kept from one report to the next, so a report costs what
changed, not the whole list); an instance whose attach fails is left
out and tried again by a pass 0.5 s later, then 1 s, 2 s … up to 30 s while it fails
(sources report only changes: an instance listed before its server is up would
otherwise wait for the next one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from pydantic import ValidationError

from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.instances import FIXED, Instance
from dispatcher.fleet.sources import InstanceSource
from linchkit_plugin.errors import DispatchError
from providers.discovery import Endpoint
from providers.target import TargetConfig

__all__ = ["Attach", "Membership"]

log = logging.getLogger("dispatcher.fleet")

#: Attach (or detach) every plugin on a fleet to (from) one of its instances.
Attach = Callable[[TargetConfig], Awaitable[None]]

#: How often a leaving instance is checked for calls still in flight.
_IDLE_POLL = 0.05
#: After a pass that left an instance out (its attach failed), the next pass comes this
#: long after, doubling up to ``_RETRY_LONGEST``: sources report only changes, and an
#: instance listed before its server is up would otherwise wait for the next change.
_RETRY_FIRST = 0.5
_RETRY_LONGEST = 30.0

T = TypeVar("T")


class Membership:
    """Keeps one fleet's set in step with its discovery sources."""

    def __init__(
        self,
        fleet: Fleet,
        sources: Sequence[InstanceSource],
        *,
        attach: Attach,
        detach: Attach,
        drain_timeout: float,
    ) -> None:
        self.fleet = fleet
        self.sources = tuple(sources)
        fleet.sources = self.sources
        self._attach = attach
        self._detach = detach
        self._drain_timeout = drain_timeout
        #: What each source lists now, as (target, weight), by source.
        self._listed: list[list[tuple[TargetConfig, int]]] = [[] for _ in self.sources]
        #: What each endpoint a source listed last became: its target and weight, or None
        #: (skipped), by source. A source reports its whole list at every change, and
        #: making a target of an endpoint and checking it against the egress policy (both
        #: fixed while the fleet lives) costs ~45 µs: done again for every endpoint, one
        #: registration put over and over held the loop for seconds at 1,000 instances.
        self._made: list[dict[Endpoint, tuple[TargetConfig, int] | None]] = [
            {} for _ in self.sources
        ]
        #: Discovered instances attached and not yet detached, by key.
        self.attached: dict[str, TargetConfig] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        #: Those of ``_retiring`` detaching now: the close lets them end, since the
        #: instance is off ``attached`` and ``detach_all`` would not detach it again.
        self._detaching: set[asyncio.Task[None]] = set()
        #: Attaches and detaches of this fleet happen one at a time: an instance listed
        #: again while it is being detached attaches after the detach, not during it.
        self._lock = asyncio.Lock()
        #: One pass at a time: ``start``'s own pass and the task's would otherwise both
        #: find an instance absent while the other attaches it, and join it twice.
        self._reconciling = asyncio.Lock()
        #: The pass scheduled after one that left an instance out, and the wait before it.
        self._retry: asyncio.Task[None] | None = None
        self._retry_delay = _RETRY_FIRST
        #: Set by ``aclose``: a pass still to come (``start``'s, from a reload the close
        #: overtook) attaches nothing more, which no one would detach.
        self._closed = False

    async def start(self, first_read_timeout: float) -> None:
        """Watch every source; return once each has answered once (or the timeout passed),
        with the instances they listed in the fleet, so the first calls find them."""
        loop = asyncio.get_running_loop()
        for index, source in enumerate(self.sources):
            self._tasks.append(
                loop.create_task(source.run(self._reporter(index)), name=f"{source.name}")
            )
        self._tasks.append(
            loop.create_task(self._reconcile_forever(), name=f"membership of {self.fleet.name}")
        )
        deadline = loop.time() + first_read_timeout
        while any(not source.reads and not source.error for source in self.sources):
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        await self._reconcile()

    async def aclose(self) -> None:
        """Stop watching; instances stay attached until ``detach_all``. A retired
        instance's detach under way ends first (cut off, its plugins would never be
        detached from it); a retired instance still waiting for its calls stays attached."""
        self._closed = True
        detaching = [task for task in self._retiring if task in self._detaching]
        tasks = [
            *self._tasks,
            *(task for task in self._retiring if task not in self._detaching),
            *([self._retry] if self._retry else []),
        ]
        self._tasks, self._retry = [], None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *detaching, return_exceptions=True)
        for source in self.sources:
            try:
                await source.aclose()
            except Exception:
                log.exception("closing %s failed", source.name)

    async def exclusively(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` while no instance of this fleet is being attached or detached."""
        async with self._lock:
            return await action()

    def retire_member(self, key: str) -> None:
        """Take the discovered instance ``key`` out (detached once its calls are done); the
        next pass joins it again if a source still lists it."""
        instance = self.fleet.member(key)
        if instance is not None and instance.source != FIXED:
            self._retire(instance)
            self._retry_soon()

    async def detach_all(self) -> None:
        """Detach every discovered instance still attached (the dispatcher is closing)."""
        attached, self.attached = self.attached, {}
        for target in attached.values():
            await self._safely(self._detach, target, "detaching")

    # -- reports -------------------------------------------------------------------------

    def _reporter(self, index: int) -> Callable[[Sequence[Endpoint]], None]:
        def report(endpoints: Sequence[Endpoint]) -> None:
            source, made = self.sources[index], self._made[index]
            now: dict[Endpoint, tuple[TargetConfig, int] | None] = {}
            for endpoint in endpoints:
                now[endpoint] = (
                    made[endpoint] if endpoint in made else self._target(source, endpoint)
                )
            self._made[index] = now  # only what is listed: bounded by the source's bound
            self._listed[index] = [each for each in now.values() if each is not None]
            self._changed.set()

        return report

    def _target(
        self, source: InstanceSource, endpoint: Endpoint
    ) -> tuple[TargetConfig, int] | None:
        """The target and weight of ``endpoint``, or None (logged) when it cannot be one."""
        try:
            target = self.fleet.target.instance_at(endpoint)
            for destination in target.destinations():
                self.fleet.provider.egress.check(destination)
        except (ValidationError, DispatchError, ValueError) as error:
            first_line = str(error).splitlines()[0]
            log.warning(
                "%s: skipping %s listed by %s: %s",
                self.fleet.name,
                endpoint,
                source.name,
                first_line,
            )
            return None
        return target, endpoint.weight

    # -- reconciling ---------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._reconcile()

    async def _reconcile(self) -> None:
        async with self._reconciling:
            if not self._closed:
                await self._reconcile_now()

    async def _reconcile_now(self) -> None:
        fleet = self.fleet
        wanted: dict[str, tuple[TargetConfig, int, str]] = {}
        for source, listed in zip(self.sources, self._listed, strict=True):
            for target, weight in listed:
                wanted.setdefault(target.key, (target, weight, source.name))
        present = {instance.key: instance for instance in fleet.instances}
        left_out = False
        for key, (target, weight, source_name) in wanted.items():
            instance = present.get(key)
            if instance is None:
                left_out |= not await self._join(target, weight, source_name)
            elif instance.source != FIXED and instance.weight != weight:
                fleet.reweigh(instance, weight)
        for key, instance in present.items():
            if instance.source != FIXED and key not in wanted:
                self._retire(instance)
        if left_out:
            self._retry_soon()
        else:
            self._retry_delay = _RETRY_FIRST

    async def _join(self, target: TargetConfig, weight: int, source_name: str) -> bool:
        if self._closed or not await self._safely(self._attach, target, "attaching"):
            return False  # left out; the next pass tries again
        if self._closed:  # closed during the attach, after ``detach_all``
            await self._safely(self._detach, target, "detaching")
            return False
        self.attached[target.key] = target
        self.fleet.join(target, weight=weight, source=source_name)
        return True

    def _retry_soon(self) -> None:
        """Run a pass again after ``_retry_delay`` (doubled each time, while instances stay
        left out), unless one is already due."""
        if self._closed or (self._retry is not None and not self._retry.done()):
            return
        delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, _RETRY_LONGEST)
        self._retry = asyncio.get_running_loop().create_task(
            self._pass_after(delay), name=f"next membership pass of {self.fleet.name}"
        )

    async def _pass_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._changed.set()

    def _retire(self, instance: Instance) -> None:
        self.fleet.leave(instance)
        if self._closed:  # ``detach_all`` detaches it; a task now would be nobody's
            return
        task = asyncio.get_running_loop().create_task(
            self._detach_when_idle(instance), name=f"retiring {instance.target.describe()}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _detach_when_idle(self, instance: Instance) -> None:
        """Detach a leaving instance once its calls are answered (or ``drain_timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        # Polled: in_flight is a bare counter on the hot path; an event set by every call
        # that ends would cost every call for the sake of the rare instance that leaves.
        while instance.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_IDLE_POLL)
        if self.fleet.member(instance.key) is not None:
            return  # listed again meanwhile: a new instance of the same target took over
        if self.attached.pop(instance.key, None) is not None:
            task = asyncio.current_task()
            assert task is not None
            self._detaching.add(task)
            try:
                await self._safely(self._detach, instance.target, "detaching")
            finally:
                self._detaching.discard(task)

    async def _safely(self, action: Attach, target: TargetConfig, doing: str) -> bool:
        try:
            async with self._lock:
                await action(target)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("%s: %s %s failed: %s", self.fleet.name, doing, target.describe(), error)
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"<Membership {self.fleet.name} sources={len(self.sources)}"
            f" attached={len(self.attached)} retiring={len(self._retiring)}>"
        )
