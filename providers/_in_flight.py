"""``InFlightLimit``: at most so many requests in flight, the rest waiting in turn.

The ``reqwest`` client's bound on a target's requests in flight (``pool.max_connections``),
kept here in Python rather than by pyreqwest's own ``max_connections``. pyreqwest waits for
its slot under ``tokio::time::timeout`` whenever the request has a timeout, and every call
of ours has one (its deadline). Against this class, that cost 0.26-0.41 µs of CPU a call
and 1.1-1.5 % of the calls/s at concurrency 64 on the fixed-reply server (0.28-0.51 µs and
0.7-1.8 % with nine more clients in the process; four runs of ``bench in_flight``,
docs/architecture.md, "Requests in flight on reqwest").

What it keeps of pyreqwest's bound:

* A call takes a slot before its request is built and gives it back when the answer has
  been read (or the call failed), so at most ``limit`` requests, and connections, are open
  to the target at once.
* Callers that find no slot wait first come, first served, each until its own deadline,
  and then get ``TimeoutError`` (the provider's ``DeadlineExceeded``); a waiter that gives
  up hands on a slot it was just given.
* **A cancelled call holds its slot until its request's timeout has passed.** pyreqwest
  detaches, rather than aborts, the request of a call whose awaiting side is cancelled:
  it stays open until the plugin answers or its timeout fires. Giving the slot back at
  once would let a burst of cancelled calls (hedges that lost, callers that gave up) open
  more connections than the bound; holding it until the timeout keeps the bound exact,
  at the price of capacity while such requests could still be open.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["InFlightLimit"]

#: Futures of callers who gave up that the queue may hold beyond twice those still
#: waiting: past that, the queue is rebuilt without them (a pass per so many give-ups).
_MOST_GONE = 1024


class InFlightLimit:
    """``limit`` slots; ``take`` one without waiting, or ``wait`` for one."""

    __slots__ = ("_waiters", "_waiting", "free", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Slots nobody holds.
        self.free = limit
        #: Futures of the callers waiting, in the order they came. One whose caller gave
        #: up stays until ``give_back`` reaches it: taking it out of the middle would cost
        #: a pass over the queue per caller giving up, quadratic when many do at once.
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Callers still waiting (futures in ``_waiters`` not yet done).
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def take(self) -> bool:
        """Take a slot if one is free and nobody waits for one (no await)."""
        if self.free and not self._waiting:
            self.free -= 1
            return True
        return False

    async def wait(self, timeout: float) -> float:
        """Take a slot, waiting at most ``timeout`` seconds for one after those who waited
        before this call; returns the seconds left of ``timeout``, ``TimeoutError`` if no
        slot came in time."""
        if self.take():
            return timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = loop.create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # the slot came as this call gave up: the next one's
            else:
                waiter.cancel()  # give_back skips it
                self._waiting -= 1
                if len(self._waiters) > 2 * self._waiting + _MOST_GONE:
                    self._waiters = deque(w for w in self._waiters if not w.done())
            raise
        return deadline - loop.time()

    def give_back(self) -> None:
        """Hand the slot to the first caller still waiting, or free it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self._waiting -= 1
                waiter.set_result(None)
                return
        self.free += 1

    def give_back_after(self, seconds: float) -> None:
        """Give the slot back ``seconds`` from now: what a cancelled call does, whose
        request pyreqwest lets run until its timeout (the module docstring)."""
        asyncio.get_running_loop().call_later(max(0.0, seconds), self.give_back)

    def __repr__(self) -> str:
        return f"<InFlightLimit {self.limit - self.free}/{self.limit} waiting={self._waiting}>"
