"""Batching: concurrent calls of one method coalesce into one invocation of the target.

A batch is sent when it holds ``max_size`` calls, ``max_wait_ms`` after its first call,
or earlier when a call in it has a tight deadline: no call spends more than a quarter of
its remaining time waiting, so the target gets the rest. Each caller gets its own
item's outcome; one failed item fails only its caller; a batch that fails as a whole fails
each of its callers. The batcher owns its flush tasks: ``aclose`` sends what is queued,
waits for batches in flight (bounded by their deadlines and a grace period) and fails
whatever is left, so no caller hangs and no task outlives the dispatcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dispatcher.config import BatchPolicy
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, TargetUnavailable
from providers.invocation import Invocation, Outcome

__all__ = ["Batcher"]

SendBatch = Callable[[Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]

CLOSE_GRACE_SECONDS = 5.0
#: The share of a call's remaining time it may spend waiting for its batch to fill.
WAIT_SHARE_OF_DEADLINE = 0.25


class Batcher:
    def __init__(self, name: str, policy: BatchPolicy, send: SendBatch) -> None:
        self.name = name
        self.max_size = policy.max_size
        self.max_wait = policy.max_wait_ms / 1000
        self._send = send
        # The calls waiting for the next batch and their callers' futures, side by side:
        # two lists rather than a list of pairs, one object less per call in flight for
        # the garbage collector to walk (with 10,000 callers its passes were most of a
        # batched call's CPU: README, "Batching").
        self._invocations: list[Invocation] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flush_at = 0.0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0
        self.items = 0
        # Why batches went out (for metrics): full, at the end of the window, a drain or close.
        self.timed_flushes = 0
        self.full_flushes = 0
        self.drain_flushes = 0

    def __call__(self, invocation: Invocation) -> asyncio.Future[Any]:
        """The future of ``invocation``'s outcome, which its caller awaits. A plain
        function, not a coroutine: a coroutine per call in flight was one more object
        for the collector to walk, and the future already is what the caller waits on
        (cancelling the caller cancels it, which ``_flush`` reads as a caller gone)."""
        if self._closed:
            raise TargetUnavailable(f"{self.name}: the dispatcher is closing")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._invocations.append(invocation)
        self._futures.append(future)
        waiting = len(self._futures)
        if waiting >= self.max_size:
            self.full_flushes += 1
            self._flush()
        else:
            flush_by = self._latest_flush(loop.time(), invocation.deadline)
            if waiting == 1 or flush_by < self._flush_at:
                self._schedule(loop, flush_by)
        return future

    def _latest_flush(self, now: float, deadline: float) -> float:
        """When the batch must go out for a call due at ``deadline`` to make it.

        A call waits at most ``max_wait`` and at most a share of the time it has left, so
        the target always gets the larger part of a tight deadline; a call joining a
        waiting batch brings the flush forward if it needs to.
        """
        return now + min(self.max_wait, (deadline - now) * WAIT_SHARE_OF_DEADLINE)

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._flush_at = when
        self._timer = loop.call_at(when, self._flush_on_timer)

    def _flush_on_timer(self) -> None:
        self._timer = None
        self.timed_flushes += 1
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        invocations, self._invocations = self._invocations, []
        futures, self._futures = self._futures, []
        loop = asyncio.get_running_loop()
        now = loop.time()
        live_invocations: list[Invocation] = []
        live_futures: list[asyncio.Future[Any]] = []
        for invocation, future in zip(invocations, futures, strict=True):
            if future.done():  # its caller gave up
                continue
            if invocation.deadline <= now:
                future.set_exception(
                    DeadlineExceeded(f"{self.name}: deadline passed while batching")
                )
            else:
                live_invocations.append(invocation)
                live_futures.append(future)
        if live_futures:
            task = loop.create_task(self._deliver(live_invocations, live_futures))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _deliver(
        self, invocations: list[Invocation], futures: list[asyncio.Future[Any]]
    ) -> None:
        self.batches += 1
        self.items += len(futures)
        try:
            outcomes = await self._send(invocations)
        except DispatchError as error:
            _fail_all(futures, error)
            return
        except asyncio.CancelledError:
            _fail_all(futures, TargetUnavailable(f"{self.name}: the dispatcher closed mid-batch"))
            raise
        for future, outcome in zip(futures, outcomes, strict=True):
            if future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.result)

    def flush_now(self) -> None:
        """Send what is queued now, not at the end of its window (the dispatcher drains)."""
        if self._futures:
            self.drain_flushes += 1
            self._flush()

    async def aclose(self, *, grace: float | None = None) -> None:
        """Send what is queued, wait ``grace`` seconds (default ``CLOSE_GRACE_SECONDS``)
        for batches in flight, then cancel the rest: their callers get ``TargetUnavailable``."""
        self._closed = True
        if self._futures:
            self.drain_flushes += 1
            self._flush()
        if self._in_flight:
            bound = CLOSE_GRACE_SECONDS if grace is None else grace
            _, late = await asyncio.wait(self._in_flight, timeout=bound)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def __repr__(self) -> str:
        return (
            f"<Batcher {self.name} queued={len(self._futures)} in_flight={len(self._in_flight)} "
            f"batches={self.batches} mean_size={self.mean_batch_size:.1f}>"
        )


def _fail_all(futures: list[asyncio.Future[Any]], error: DispatchError) -> None:
    for future in futures:
        if not future.done():
            # One exception object per caller: raising a shared one in many tasks would
            # chain every caller's traceback onto it.
            future.set_exception(error.clone())
