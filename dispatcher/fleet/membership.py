"""Who is in a fleet: its fixed instances plus what its discovery sources list, kept in step.

    source.run ─report─► Membership (per source: the targets it lists) ─► reconcile
        joined:  attach (every plugin on the fleet) ─► Fleet.join   ─► takes calls
        gone:    Fleet.leave (no new calls) ─► calls in flight finish ─► detach

Reports are synchronous and only record what a source lists; one task per fleet
reconciles, so attaches never race and a burst of reports costs one pass. Attaching, and
changing which versions the instances serve, take turns with everything else; the
detaches of instances that left take theirs together (``_Turns``), and detach at once
what shares nothing (``DiscoveredAttachments``): instances that leave together and hang
on their ``Stop`` cost about one stop timeout, as they do at a close (``detach_all``).
An instance listed by several sources (or also fixed) is one instance: the first to list
it names its source and weight. Fixed instances never leave; the dispatcher attached
them and detaches them. An endpoint the target cannot turn into a valid target, or that
the egress policy refuses, is skipped and logged once while its source lists it (what
each endpoint became is kept from one report to the next, so a report costs what
changed, not the whole list); an instance whose attach fails is left
out and tried again by a pass 0.5 s later, then 1 s, 2 s … up to 30 s while it fails
(sources report only changes: an instance listed before its server is up would
otherwise wait for the next one). An instance that left and is listed again while it
still drains its calls, attached, takes calls again as it is: a source that flaps costs
its calls nothing (before, a fleet whose one listed instance flapped had none until that
instance's calls ended, and every call failed meanwhile). One sent out to take a
reload's entry afresh (``retire_member``) joins again once its detach has ended,
attached anew. Neither is ever attached twice over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

from pydantic import ValidationError

from dispatcher.fleet.fleet import Fleet
from dispatcher.fleet.instances import FIXED, Instance
from dispatcher.fleet.sources import InstanceSource
from linchkit_plugin.errors import DispatchError
from providers.discovery import Endpoint
from providers.target import Discovery, TargetConfig

__all__ = ["Attach", "Detach", "Detached", "Membership", "same_place"]

log = logging.getLogger("dispatcher.fleet")

#: Attach every plugin on a fleet to one of its instances.
Attach = Callable[[TargetConfig], Awaitable[None]]
#: Detach every plugin on a fleet from some of its instances (in the order they were
#: attached), at once where they share nothing; a failure is logged, not raised.
Detach = Callable[[Sequence[TargetConfig]], Awaitable[None]]

#: Told that an instance which left its fleet is detached (its calls are over).
Detached = Callable[[], None]

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
        detach: Detach,
        drain_timeout: float,
        detached: Detached | None = None,
    ) -> None:
        self.fleet = fleet
        self.sources = tuple(sources)
        fleet.sources = self.sources
        self._attach = attach
        self._detach = detach
        self._detached = detached
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
        #: Set by ``start`` once each source has read once (or could not, or its time
        #: is up), then by the reconciling task once its first pass has ended.
        self._first_read = asyncio.Event()
        self._first_pass = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()
        #: Those of ``_retiring`` detaching now: the close lets them end, since the
        #: instance is off ``attached`` and ``detach_all`` would not detach it again.
        self._detaching: set[asyncio.Task[None]] = set()
        #: Attaches and detaches of this fleet take turns: an instance listed again while
        #: it is being detached attaches after the detach, not during it.
        self._turns = _Turns()
        #: The pass scheduled after one that left an instance out, and the wait before it.
        self._retry: asyncio.Task[None] | None = None
        self._retry_delay = _RETRY_FIRST
        #: Set by ``aclose``: a pass still to come (``start``'s, from a reload the close
        #: overtook) attaches nothing more, which no one would detach.
        self._closed = False
        #: Instances sent out to be attached anew (``retire_member``), by key: listed
        #: still, they join again only once detached.
        self._anew: set[str] = set()
        #: The instance that left last, by key, while it drains: an instance listed again
        #: and gone again has two drains, and only the last one's end may detach it.
        self._last_left: dict[str, Instance] = {}

    def listed_from(self, spec: Discovery) -> list[Endpoint]:
        """What this fleet's source reading the same place as ``spec`` listed last (its
        timing aside), or nothing when no source of it does."""
        for index, each in enumerate(self.fleet.target.instance_sources()):
            if same_place(each, spec):
                return list(self._made[index])
        return []

    def inherit(self, index: int, endpoints: Sequence[Endpoint]) -> None:
        """Before ``start``: source ``index`` lists ``endpoints`` until it reports a list
        of its own, as if it had read them (``FleetRuntime.watch_new``). Nothing is
        attached before the sources' first read, which replaces them if it comes in time."""
        self._reporter(index)(endpoints)

    async def start(self, first_read_timeout: float) -> None:
        """Watch every source; return once each has answered once (or the timeout passed),
        with the instances they listed in the fleet, so the first calls find them."""
        loop = asyncio.get_running_loop()
        for index, source in enumerate(self.sources):
            self._tasks.append(
                loop.create_task(source.run(self._reporter(index)), name=f"{source.name}")
            )
        reconciling = loop.create_task(
            self._reconcile_forever(), name=f"membership of {self.fleet.name}"
        )
        self._tasks.append(reconciling)
        deadline = loop.time() + first_read_timeout
        try:
            while any(not source.reads and not source.error for source in self.sources):
                if loop.time() >= deadline or self._closed:
                    break
                await asyncio.sleep(0.01)
        finally:  # a start given up in this wait must not leave the task waiting for good
            self._first_read.set()
        await self._first_pass_of(reconciling)

    async def _first_pass_of(self, reconciling: asyncio.Task[None]) -> None:
        """Return once the reconciling task's first pass has ended, or the task has (a
        close cancelled it: the close waits for it, so nothing it attached outlives
        ``detach_all``; a pass of ``start``'s own would not be waited for)."""
        passed = asyncio.ensure_future(self._first_pass.wait())
        try:
            await asyncio.wait([passed, reconciling], return_when=asyncio.FIRST_COMPLETED)
        finally:
            passed.cancel()
        if reconciling.done() and not reconciling.cancelled():
            reconciling.result()  # raises what ended it; it never ends otherwise

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
        async with self._turns.alone():
            return await action()

    def retire_member(self, key: str) -> None:
        """Take the discovered instance ``key`` out (detached once its calls are done); the
        next pass joins it again if a source still lists it."""
        instance = self.fleet.member(key)
        if instance is not None and instance.source != FIXED:
            self._anew.add(key)
            self._retire(instance)
            self._retry_soon()

    async def detach_all(self) -> None:
        """Detach every discovered instance still attached (the dispatcher is closing, or
        a reload removed the fleet): at once, but in turn within a queue of the provider
        (``DiscoveredAttachments``); a failure is logged and the others go on."""
        attached, self.attached = self.attached, {}
        if attached:
            targets = list(attached.values())
            await self._safely(partial(self._detach, targets), "detaching", targets)

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
        # Not before the first read: a list inherited from another fleet (``inherit``) is
        # what to call should the read fail, and attached at once it gave the instances
        # that left in between an Init and a Start for nothing.
        await self._first_read.wait()
        while True:
            self._changed.clear()
            await self._reconcile()
            self._first_pass.set()
            await self._changed.wait()

    async def _reconcile(self) -> None:
        """One pass, only ever run by the reconciling task: two passes at once would both
        find an instance absent while the other attaches it, and join it twice."""
        fleet = self.fleet
        wanted: dict[str, tuple[TargetConfig, int, str]] = {}
        for source, listed in zip(self.sources, self._listed, strict=True):
            for target, weight in listed:
                wanted.setdefault(target.key, (target, weight, source.name))
        present = {instance.key: instance for instance in fleet.instances}
        left_out = False
        for key, (target, weight, source_name) in wanted.items():
            instance = present.get(key)
            if instance is None and key in self.attached and key in self._anew:
                # Sent out to be attached anew, and still draining its calls: attached
                # again now, its plugins would get a second attach over the live one (a
                # gRPC service a second Init and Start). It joins again once its detach
                # has ended (``_detach_when_idle``).
                left_out = True
            elif instance is None and key in self.attached:
                # It left (a source flapped) and still drains its calls, attached for the
                # versions serving the fleet (a reload's add, update and release reach the
                # instances draining too): it takes calls again as it is, and its drain,
                # finding it back, does not detach it.
                self._last_left.pop(key, None)
                fleet.join(target, weight=weight, source=source_name)
            elif instance is None:
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
        if self._closed or not await self._safely(
            partial(self._attach, target), "attaching", [target]
        ):
            return False  # left out; the next pass tries again
        if self._closed:  # closed during the attach, after ``detach_all``
            await self._safely(partial(self._detach, [target]), "detaching", [target])
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
        self._last_left[instance.key] = instance
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
        if self._last_left.get(instance.key) is not instance:
            return  # back and gone again since: the last drain detaches it
        del self._last_left[instance.key]
        if self.attached.pop(instance.key, None) is not None:
            task = asyncio.current_task()
            assert task is not None
            self._detaching.add(task)
            try:
                # Beside the other instances that left, not after them (``_Turns``).
                await self._safely(
                    partial(self._detach, [instance.target]),
                    "detaching",
                    [instance.target],
                    together=True,
                )
            finally:
                self._detaching.discard(task)
            self._anew.discard(instance.key)
            self._changed.set()  # a source listing it still: it joins again, attached anew
        if self._detached is not None:
            self._detached()

    async def _safely(
        self,
        action: Callable[[], Awaitable[None]],
        doing: str,
        targets: Sequence[TargetConfig],
        *,
        together: bool = False,
    ) -> bool:
        """Run ``action`` in its turn (``together``: beside other detaches of instances
        that left); False, logged, if it failed."""
        try:
            async with self._turns.together() if together else self._turns.alone():
                await action()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            described = ", ".join(target.describe() for target in targets)
            log.warning("%s: %s %s failed: %s", self.fleet.name, doing, described, error)
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"<Membership {self.fleet.name} sources={len(self.sources)}"
            f" attached={len(self.attached)} retiring={len(self._retiring)} {self._turns!r}>"
        )


#: A source's settings of when and how long to read, not of what it reads.
_TIMING = {"timeout_ms", "retry_ms", "idle_probe_ms", "min_refresh_ms", "max_refresh_ms"}


def same_place(one: Discovery, other: Discovery) -> bool:
    """Whether two sources read the same place (the same etcd prefix, the same DNS
    records, asked of the same server), whatever their timing: they list the same."""
    return type(one) is type(other) and one.model_dump(exclude=_TIMING) == other.model_dump(
        exclude=_TIMING
    )


class _Turns:
    """Whose turn it is to change a fleet's attachments: one holder ``alone`` (an attach,
    a version added or released, the close's ``detach_all``), or any number of detaches
    of instances that left ``together``, never both.

    Instances that left are detached together: what must still go in order among them
    (the provider's queues) ``DiscoveredAttachments`` orders. One at a time, instances
    that left together and hang on their ``Stop`` cost one stop timeout each. A holder
    ``alone`` waits for the detaches under way, and none starts while it waits (a burst
    of instances leaving cannot hold off an attach for good)."""

    def __init__(self) -> None:
        self._alone = asyncio.Lock()
        self._together = 0
        #: Set while no detach runs ``together``.
        self._none_together = asyncio.Event()
        self._none_together.set()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._alone:
            await self._none_together.wait()
            yield

    @contextlib.asynccontextmanager
    async def together(self) -> AsyncIterator[None]:
        async with self._alone:  # waits for a holder alone, and for those waiting before
            self._together += 1
            self._none_together.clear()
        try:
            yield
        finally:
            self._together -= 1
            if not self._together:
                self._none_together.set()

    def __repr__(self) -> str:
        held = "alone" if self._alone.locked() else f"together={self._together}"
        return f"<turns {held}>"
