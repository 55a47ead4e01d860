"""``InFlightLimit``, the reqwest client's bound on requests in flight: never more holders
than slots, waiters served in turn, each until its own deadline, and no slot lost to a
waiter that gave up or a call that was cancelled."""

from __future__ import annotations

import asyncio
import random

import pytest

from providers._in_flight import InFlightLimit


async def test_slots_are_taken_without_waiting_until_none_is_free() -> None:
    limit = InFlightLimit(2)
    assert limit.take() and limit.take()
    assert not limit.take()
    limit.give_back()
    assert limit.take()
    assert limit.free == 0


async def test_waiters_get_slots_in_the_order_they_came() -> None:
    limit = InFlightLimit(1)
    assert limit.take()
    served: list[int] = []

    async def wait(number: int) -> None:
        await limit.wait(10)
        served.append(number)

    waiters = [asyncio.create_task(wait(number)) for number in range(5)]
    await asyncio.sleep(0)
    assert limit.waiting == 5
    assert not limit.take(), "a free slot goes to those waiting, not to a newcomer"
    for expected in range(5):
        limit.give_back()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert served == list(range(expected + 1))
    await asyncio.gather(*waiters)
    limit.give_back()
    assert limit.free == 1


async def test_a_waiter_ends_at_its_deadline_and_leaves_no_slot_behind() -> None:
    limit = InFlightLimit(1)
    assert limit.take()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await limit.wait(0.05)
    assert loop.time() - started >= 0.04
    assert limit.waiting == 0
    limit.give_back()
    assert limit.free == 1  # the slot was not handed to the waiter that left


async def test_wait_returns_the_time_left_after_waiting() -> None:
    limit = InFlightLimit(1)
    assert limit.take()
    asyncio.get_running_loop().call_later(0.05, limit.give_back)
    left = await limit.wait(5.0)
    assert 4.0 < left < 4.96
    assert await InFlightLimit(1).wait(3.0) == 3.0  # a free slot: no time spent


async def test_a_cancelled_waiter_passes_on_the_slot_it_was_just_given() -> None:
    """The slot is handed over (the future's result set) and the waiter is cancelled before
    it runs: the slot must go to the next waiter, not vanish."""
    limit = InFlightLimit(1)
    assert limit.take()
    first = asyncio.create_task(limit.wait(10))
    second = asyncio.create_task(limit.wait(10))
    await asyncio.sleep(0)
    limit.give_back()  # to ``first``, which has not run since
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) > 0
    assert limit.free == 0 and limit.waiting == 0


async def test_give_back_after_frees_the_slot_only_once_the_time_has_passed() -> None:
    limit = InFlightLimit(1)
    assert limit.take()
    limit.give_back_after(0.1)
    await asyncio.sleep(0.02)
    assert limit.free == 0
    await asyncio.sleep(0.2)
    assert limit.free == 1


@pytest.mark.parametrize("seed", range(20))
async def test_never_more_holders_than_slots_and_every_slot_comes_back(seed: int) -> None:
    """Random holders, waiters that time out, and cancellations at random moments."""
    chance = random.Random(seed)
    limit = InFlightLimit(chance.randint(1, 4))
    holding = 0
    most = 0

    async def holder() -> None:
        nonlocal holding, most
        await limit.wait(chance.choice((0.001, 0.01, 1.0)))
        holding += 1
        most = max(most, holding)
        try:
            await asyncio.sleep(chance.random() * 0.005)
        finally:
            holding -= 1
            limit.give_back()

    tasks = [asyncio.create_task(holder()) for _ in range(60)]
    for task in chance.sample(tasks, 15):
        asyncio.get_running_loop().call_later(chance.random() * 0.02, task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert most <= limit.limit
    assert holding == 0
    assert limit.free == limit.limit
    assert limit.waiting == 0


async def test_callers_giving_up_in_any_order_cost_no_pass_over_the_queue_each() -> None:
    """3,000 waiters give up, the last to come first, while the one slot stays taken: none
    is taken out of the middle of the queue (a pass each, quadratic in all); the queue
    drops the gone ones in batches, and the next caller still gets the slot first."""
    limit = InFlightLimit(1)
    assert limit.take()
    count = 3000

    async def give_up(after: float) -> None:
        with pytest.raises(TimeoutError):
            await limit.wait(after)

    await asyncio.gather(*(give_up(0.05 + (count - n) * 1e-5) for n in range(count)))
    assert limit.waiting == 0
    assert len(limit._waiters) <= 1024  # rebuilt without the gone ones as they piled up
    latecomer = asyncio.create_task(limit.wait(10))
    await asyncio.sleep(0)
    assert not limit.take()
    limit.give_back()
    assert await asyncio.wait_for(latecomer, 5) > 0
    assert limit.free == 0 and limit.waiting == 0
