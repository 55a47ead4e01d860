"""A fleet's membership after its close: what retires an instance then leaves nothing
running behind (``dispatcher.fleet.membership``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dispatcher.fleet import Fleet
from dispatcher.fleet.membership import Membership
from providers.discovery import Endpoint, InstanceSource, Report
from providers.http import HttpProvider, HttpTarget
from providers.target import TargetConfig


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

    def __init__(self, detach_takes: float = 0.0) -> None:
        target = HttpTarget.model_validate(
            {"provider": "http", "instances": [{"dns": {"name": "echo.test", "type": "SRV"}}]}
        )
        self.fleet = Fleet(target, [], HttpProvider(), time.monotonic)
        self.attached: list[str] = []
        self.detaching: list[str] = []
        self.detached: list[str] = []
        self.detach_takes = detach_takes
        self.membership = Membership(
            self.fleet,
            [_Listing(Endpoint("127.0.0.1", 9))],
            attach=self._attach,
            detach=self._detach,
            drain_timeout=1.0,
        )

    async def _attach(self, instance: TargetConfig) -> Any:
        self.attached.append(instance.key)

    async def _detach(self, instance: TargetConfig) -> Any:
        self.detaching.append(instance.key)
        await asyncio.sleep(self.detach_takes)
        self.detached.append(instance.key)


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
