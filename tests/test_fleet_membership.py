"""A fleet's membership after its close: what retires an instance then leaves nothing
running behind (``dispatcher.fleet.membership``); and how the instances discovery brought
are detached (``dispatcher.fleet.discovered``): at once by the provider's queues, in turn
within one, a bounded number together, none lost to another's failure.

Real gRPC services that hang on their ``Stop`` show the time this saves
(``tests/test_detach_at_once.py``); here a provider whose detach fails or waits on cue
says what runs beside what, which no real provider can be made to do on cue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pytest

from dispatcher.fleet import Fleet
from dispatcher.fleet.discovered import DiscoveredAttachments
from dispatcher.fleet.membership import Membership
from providers.discovery import Endpoint, InstanceSource, Report
from providers.http import HttpProvider, HttpTarget
from providers.target import PluginInfo, TargetConfig
from tests.conftest import LOCAL_TARGET, echo_plugin, manifest
from tests.services import until


class _Listing(InstanceSource):
    """A source that lists one endpoint once, then waits to be cancelled."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__("one endpoint")
        self.endpoint = endpoint

    async def run(self, report: Report) -> None:
        report([self.endpoint])
        self.reads += 1
        await asyncio.Event().wait()


class _Recorded:
    """One discovered instance's fleet and membership, recording its attaches and detaches
    (a detach takes ``detach_takes`` seconds, and is recorded as begun and as ended)."""

    def __init__(self, detach_takes: float = 0.0, drain_timeout: float = 1.0) -> None:
        target = HttpTarget.model_validate(
            {"provider": "http", "instances": [{"dns": {"name": "echo.test", "type": "SRV"}}]}
        )
        self.fleet = Fleet(target, [], HttpProvider(), time.monotonic)
        self.attached: list[str] = []
        self.detaching: list[str] = []
        self.detached: list[str] = []
        #: Attaches and detaches, in the order they began.
        self.events: list[str] = []
        self.detach_takes = detach_takes
        self.membership = Membership(
            self.fleet,
            [_Listing(Endpoint("127.0.0.1", 9))],
            attach=self._attach,
            detach=self._detach,
            drain_timeout=drain_timeout,
        )

    async def _attach(self, instance: TargetConfig) -> Any:
        self.events.append("attach")
        self.attached.append(instance.key)

    async def _detach(self, instances: Sequence[TargetConfig]) -> Any:
        self.events.append("detach")
        self.detaching.extend(each.key for each in instances)
        await asyncio.sleep(self.detach_takes)
        self.detached.extend(each.key for each in instances)


async def test_an_instance_retired_after_the_close_starts_no_task_of_its_own() -> None:
    # A reload's attach of a new version to a discovered instance can fail while the
    # dispatcher closes (FleetRuntime.attach_found awaits the attach, then retires the
    # instance): the retirement came after the membership had gathered its tasks, and
    # left one that nothing owned or awaited.
    recorded = _Recorded()
    membership = recorded.membership
    await membership.start(first_read_timeout=1.0)
    (member,) = recorded.fleet.instances
    assert recorded.attached == [member.key]
    await membership.aclose()
    await membership.detach_all()
    assert recorded.detached == [member.key]
    before = asyncio.all_tasks()

    membership.retire_member(member.key)

    started = asyncio.all_tasks() - before
    assert not started, f"tasks left running after the close: {started}"
    assert recorded.detached == [member.key]  # detached once, by detach_all


class _Late(_Listing):
    """A source whose first read answers only once ``answer`` is set."""

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self.answer = asyncio.Event()

    async def run(self, report: Report) -> None:
        await self.answer.wait()
        await super().run(report)


async def test_a_start_given_up_in_its_wait_for_the_first_read_still_lets_the_fleet_fill() -> None:
    # The reconciling task makes its first pass once start's wait for the first read is
    # over. A start cancelled in that wait (a reload's caller giving up after its swap)
    # left the task waiting for good: the fleet stayed empty whatever its source read.
    recorded = _Recorded()
    late = _Late(Endpoint("127.0.0.1", 9))
    membership = Membership(
        recorded.fleet, [late], attach=recorded._attach, detach=recorded._detach, drain_timeout=1
    )
    starting = asyncio.ensure_future(membership.start(first_read_timeout=5.0))
    await asyncio.sleep(0.1)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    late.answer.set()
    try:
        await until(lambda: recorded.fleet.instances, "the instance its source read")
    finally:
        await membership.aclose()
        await membership.detach_all()


async def test_a_close_lets_a_retired_instance_s_detach_under_way_end() -> None:
    # An instance retired while the dispatcher runs is detached by a task of its own once
    # its calls are done. A close that came during that detach cancelled it half-way, and
    # detach_all no longer knew the instance (the task had taken it off the list): its
    # plugins were never detached from it (a gRPC plugin's Stop cut off, no Destroy).
    recorded = _Recorded(detach_takes=0.2)
    membership = recorded.membership
    await membership.start(first_read_timeout=1.0)
    (member,) = recorded.fleet.instances
    membership.retire_member(member.key)
    for _ in range(100):
        if recorded.detaching:
            break
        await asyncio.sleep(0.01)
    assert recorded.detaching == [member.key]

    await membership.aclose()
    await membership.detach_all()

    assert recorded.detached == [member.key]


async def test_an_attach_waits_for_the_detach_of_an_instance_that_left() -> None:
    # Detaches of instances that left run together, but never beside an attach or a
    # version added or released: those take the fleet alone, once they end.
    recorded = _Recorded(detach_takes=0.2)
    membership = recorded.membership
    await membership.start(first_read_timeout=1.0)
    (member,) = recorded.fleet.instances
    membership.retire_member(member.key)
    await until(lambda: recorded.detaching, "the detach under way")

    async def alone() -> list[str]:
        return list(recorded.detached)

    assert await membership.exclusively(alone) == [member.key]
    await membership.aclose()
    await membership.detach_all()


# -- DiscoveredAttachments: detaching the instances discovery brought ----------------------


class _Cued(HttpProvider):
    """An HTTP provider whose detaches wait for ``go`` and fail for the instances named in
    ``failing``, recording which run at once; ``queue_of`` is its ``detach_queue``."""

    def __init__(self, queue_of: Callable[[TargetConfig], Hashable]) -> None:
        super().__init__()
        self.queue_of = queue_of
        self.go = asyncio.Event()
        self.failing: set[str] = set()
        self.under_way: list[str] = []
        self.detached: list[str] = []
        self.most_at_once = 0

    def detach_queue(self, plugin: PluginInfo, target: Any) -> Hashable:
        return self.queue_of(target)

    async def detach(self, plugin: PluginInfo, target: Any) -> None:
        where = target.describe()
        self.under_way.append(where)
        self.most_at_once = max(self.most_at_once, len(self.under_way))
        try:
            await self.go.wait()
            if where in self.failing:
                raise RuntimeError(f"{where} would not stop")
            self.detached.append(where)
        finally:
            self.under_way.remove(where)


def _instances(count: int) -> list[TargetConfig]:
    return [
        HttpTarget.model_validate({"provider": "http", "url": f"http://127.0.0.{n + 2}:9"})
        for n in range(count)
    ]


async def _attached(provider: _Cued, count: int, **at_once: int) -> Any:
    discovered = DiscoveredAttachments(provider, **at_once)
    discovered.serving.append(manifest(echo_plugin("echo", LOCAL_TARGET)).plugins[0])
    instances = _instances(count)
    for each in instances:
        await discovered.attach(each)
    return discovered, instances


def _apart(target: TargetConfig) -> Hashable:
    return target.key


async def test_a_failed_detach_loses_none_of_the_others(caplog: pytest.LogCaptureFixture) -> None:
    provider = _Cued(_apart)
    discovered, instances = await _attached(provider, 5)
    provider.failing = {instances[2].describe()}
    provider.go.set()

    await discovered.detach(instances)

    assert sorted(provider.detached) == sorted(
        each.describe() for each in instances if each is not instances[2]
    )
    (failure,) = [each for each in caplog.records if each.levelno >= logging.WARNING]
    assert failure.getMessage() == f"detaching echo@1.0.0 from {instances[2].describe()} failed"
    assert failure.exc_info is not None  # logged with its traceback, as the close does


async def test_detaches_that_share_nothing_run_at_once_a_bounded_number_together() -> None:
    provider = _Cued(_apart)
    discovered, instances = await _attached(provider, 5, at_once=2)
    detaching = asyncio.create_task(discovered.detach(instances))
    await until(lambda: len(provider.under_way) == 2, "two detaches under way")
    await asyncio.sleep(0.05)  # a third would have begun by now, were it let
    assert len(provider.under_way) == 2
    provider.go.set()
    await detaching
    assert len(provider.detached) == 5
    assert provider.most_at_once == 2


async def test_detaches_of_one_queue_go_in_turn_newest_first_even_from_two_calls() -> None:
    # A close while an instance that left is detached: the two calls share the queue.
    provider = _Cued(lambda target: "one service")
    discovered, instances = await _attached(provider, 3)
    first, second, third = (each.describe() for each in instances)
    leaving = asyncio.create_task(discovered.detach(instances[:1]))
    await until(lambda: provider.under_way == [first], "the first detach under way")
    closing = asyncio.create_task(discovered.detach(instances[1:]))
    await asyncio.sleep(0.05)  # the others would have begun by now, were they let
    assert provider.under_way == [first]
    provider.go.set()
    await asyncio.gather(leaving, closing)
    assert provider.detached == [first, third, second]
    assert provider.most_at_once == 1
    assert "detach_queues=0" in repr(discovered)  # a queue no detach waits for is let go


async def test_a_cancel_lets_the_detaches_under_way_end_and_starts_no_other() -> None:
    # The loop ending while a close detaches a thousand instances, ``at_once`` at a time:
    # what runs ends (a Stop with its Destroy), what waits for a slot never starts.
    provider = _Cued(_apart)
    discovered, instances = await _attached(provider, 4, at_once=2)
    detaching = asyncio.create_task(discovered.detach(instances))
    await until(lambda: len(provider.under_way) == 2, "two detaches under way")
    detaching.cancel()
    await asyncio.sleep(0.05)
    assert not detaching.done()  # the two under way are not cut off
    provider.go.set()
    with pytest.raises(asyncio.CancelledError):
        await detaching
    assert len(provider.detached) == 2
    assert provider.most_at_once == 2


async def test_an_instance_listed_again_while_it_drains_joins_once_detached() -> None:
    # An instance that left (a source that flapped, one sent out to take a reload's new
    # entry afresh) still drains its calls, attached. A pass that found it listed again
    # attached it a second time over the live attachment (a gRPC service got a second
    # Init and Start), and its drain then skipped the detach: the first attach was never
    # undone. Now it stays out until detached, then joins again, attached anew.
    recorded = _Recorded(drain_timeout=30.0)
    events = recorded.events
    membership = recorded.membership
    await membership.start(first_read_timeout=1.0)
    (member,) = recorded.fleet.instances
    member.in_flight += 1  # a call it still answers
    membership.retire_member(member.key)
    await asyncio.sleep(1.2)  # passes come 0.5 s and 1 s after: the source lists it still
    assert events == ["attach"]
    assert recorded.fleet.member(member.key) is None
    member.in_flight -= 1  # the call ended
    await until(lambda: recorded.fleet.member(member.key) is not None, "the instance back")
    assert events == ["attach", "detach", "attach"]
    await membership.aclose()
    await membership.detach_all()
    assert events == ["attach", "detach", "attach", "detach"]


class _Flapping(InstanceSource):
    """A source whose listing the test changes (``list``), reported at once."""

    def __init__(self, *endpoints: Endpoint) -> None:
        super().__init__("flapping")
        self._listed = list(endpoints)
        self._report: Report | None = None

    async def run(self, report: Report) -> None:
        self._report = report
        report(self._listed)
        self.reads += 1
        await asyncio.Event().wait()

    def list(self, *endpoints: Endpoint) -> None:
        assert self._report is not None
        self._report(list(endpoints))


async def test_an_instance_a_source_lists_again_while_it_drains_takes_calls_again_as_it_is() -> (
    None
):
    # The only instance listed flaps: listed as "b", then as "a" instead (b drains a
    # call), then as "b" again. Before, the pass that listed b again left it out until
    # its call ended and its detach was done (so as not to attach it twice), and retired
    # a: the fleet had no instance, and every call failed TargetUnavailable meanwhile.
    # Now b takes calls again as it is: no second attach, no detach.
    recorded = _Recorded(drain_timeout=30.0)
    a, b = Endpoint("127.0.0.2", 9), Endpoint("127.0.0.3", 9)
    source = _Flapping(b)
    membership = Membership(
        recorded.fleet,
        [source],
        attach=recorded._attach,
        detach=recorded._detach,
        drain_timeout=30.0,
    )
    await membership.start(first_read_timeout=1.0)
    (first_b,) = recorded.fleet.instances
    first_b.in_flight += 1  # a call it still answers
    source.list(a)
    await until(
        lambda: len(recorded.attached) == 2 and recorded.fleet.member(first_b.key) is None,
        "a in, b out",
    )
    source.list(b)
    await until(lambda: recorded.fleet.member(first_b.key) is not None, "b back")
    assert [each.key for each in recorded.fleet.instances] == [first_b.key]
    await until(lambda: recorded.detached, "a detached")
    first_b.in_flight -= 1  # its call ended: its drain finds it back, and leaves it
    await asyncio.sleep(0.2)
    assert recorded.events == ["attach", "attach", "detach"]  # b once, a in and out
    assert recorded.detached == [recorded.attached[1]]
    await membership.aclose()
    await membership.detach_all()
    assert sorted(recorded.detached) == sorted(recorded.attached)


async def test_an_instance_that_flaps_twice_is_detached_once_its_last_calls_end() -> None:
    # b leaves with a call in flight, is listed again and takes another call, and leaves
    # again. The first drain must not detach it under the second call, which came after.
    recorded = _Recorded(drain_timeout=30.0)
    a, b = Endpoint("127.0.0.2", 9), Endpoint("127.0.0.3", 9)
    source = _Flapping(b)
    membership = Membership(
        recorded.fleet,
        [source],
        attach=recorded._attach,
        detach=recorded._detach,
        drain_timeout=30.0,
    )
    await membership.start(first_read_timeout=1.0)
    (first_b,) = recorded.fleet.instances
    first_b.in_flight += 1
    source.list(a)
    await until(lambda: recorded.fleet.member(first_b.key) is None, "b out")
    source.list(b)
    await until(lambda: recorded.fleet.member(first_b.key) is not None, "b back")
    second_b = recorded.fleet.member(first_b.key)
    assert second_b is not None and second_b is not first_b
    second_b.in_flight += 1
    source.list(a)
    await until(lambda: recorded.fleet.member(first_b.key) is None, "b out again")
    first_b.in_flight -= 1  # the first call ends: the second still runs on b
    await asyncio.sleep(0.3)
    assert first_b.key not in recorded.detaching
    second_b.in_flight -= 1
    await until(lambda: first_b.key in recorded.detached, "b detached")
    assert recorded.detaching.count(first_b.key) == 1
    await membership.aclose()
    await membership.detach_all()
