"""Bulkheads: a bound on the calls in flight to a method or target, and on those waiting.

A call over ``max_in_flight`` waits (up to its deadline) if fewer than ``max_waiting``
are already waiting, else fails at once with ``Overloaded``: a slow target cannot make the
host pile up unbounded work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from linchkit_plugin.errors import Overloaded
from providers.invocation import Invocation

__all__ = ["Bulkhead", "BulkheadStep"]

Next = Callable[[Invocation], Awaitable[Any]]


class Bulkhead:
    def __init__(self, name: str, max_in_flight: int, max_waiting: int) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_in_flight)
        #: Slots calls hold beyond ``max_in_flight`` since ``resize`` lowered it: given
        #: back as those calls end, not to the semaphore.
        self._owed = 0
        self.waiting = 0
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        return self.max_in_flight + self._owed - self._slots._value

    def resize(self, max_in_flight: int, max_waiting: int) -> None:
        """New limits (a reload changed them). More slots let waiting calls in at once;
        fewer take free slots away now and the rest from calls as they end: calls in
        flight are never cut, and none starts until the count is under the new limit."""
        change = max_in_flight - self.max_in_flight
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        slots = self._slots
        if change > 0:
            forgiven = min(change, self._owed)
            self._owed -= forgiven
            for _ in range(change - forgiven):
                slots.release()
        elif change < 0:
            taken = min(-change, slots._value)
            slots._value -= taken  # free slots: no waiter can be woken for them
            self._owed += -change - taken

    async def acquire(self, invocation: Invocation) -> None:
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # returns at once: a slot is free
            return
        if self.waiting >= self.max_waiting:
            self.rejected += 1
            raise Overloaded(
                f"{self.name} has {self.max_in_flight} calls in flight and "
                f"{self.waiting} waiting; try again later"
            )
        self.waiting += 1
        remaining = invocation.remaining()
        try:
            async with asyncio.timeout(remaining):
                await slots.acquire()
        except TimeoutError:
            self.rejected += 1
            raise Overloaded(
                f"{self.name}: waited {remaining * 1000:.0f} ms for a free slot; the deadline passed"
            ) from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        if self._owed:
            self._owed -= 1
        else:
            self._slots.release()

    def __repr__(self) -> str:
        return (
            f"<Bulkhead {self.name} in_flight={self.in_flight}/{self.max_in_flight} "
            f"waiting={self.waiting}/{self.max_waiting} rejected={self.rejected}>"
        )


class BulkheadStep:
    __slots__ = ("bulkhead", "next")

    def __init__(self, bulkhead: Bulkhead, next_step: Next) -> None:
        self.bulkhead = bulkhead
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        await self.bulkhead.acquire(invocation)
        try:
            return await self.next(invocation)
        finally:
            self.bulkhead.release()
