"""Hedged calls: when an attempt is slow, send another to a different instance; the first
answer wins.

    retry ─► HedgeStep ─► FleetStep ─► instance
                 └── after the delay, if the budget allows ──► FleetStep ─► another instance

Only for idempotent methods on a fleet target, never batched (``dispatcher.config``
refuses the rest at load). Each attempt runs as a task in a copy of the caller's context
holding one shared list (``dispatcher.fleet.hedge.HEDGE_TRIED``): ``FleetStep`` avoids the
instances already in it and appends its own, so a hedge never goes where another attempt
of the call went, and none is sent when no other instance is left.

* **The first answer wins**: a result, or an error that is not retryable (the plugin
  said no: asking another instance would get the same). A retryable error of one attempt
  waits for the others; when all have failed the last error goes up to the retry step.
  An attempt that fails before any hedge was sent ends the call at once: the retry step
  decides about another attempt, with its backoff.
* **Losers are cancelled** and awaited before the call returns: ``FleetStep`` gives back
  their in-flight count and charges neither their breaker nor the outlier detector (a
  cancelled attempt proves nothing about its instance). Nothing is left running.
* **The winner's context comes back**: context variables the winning attempt set (the
  fleet step's note of the instance that failed, which steers the retry's next attempt
  elsewhere) are set in the caller's context, as if the attempt had run inline.
* **Budget and deadline**: every hedge spends a token of the target's retry budget (the
  one retries spend; first attempts fill it, ``budget_ratio`` of a token each). No token,
  no hedge. No hedge is sent once the call's deadline has passed, and every attempt
  carries the call's deadline.

**The delay.** ``after_ms``, or with ``after_percentile`` that percentile of the latency of
the method's recent calls: ``LatencyWindow`` keeps the last ``WINDOW`` samples in a ring
and re-sorts them every ``REFRESH_EVERY`` samples (a few µs, so well under 1 µs per call);
until ``MIN_SAMPLES`` are in, the delay is ``after_ms`` (default 50 ms). Never below
``min_after_ms``. A sample is the first attempt's latency when it answered; when a hedge
beat it, the time it had run (it took at least that long). Recording only the winners
would hide the slow tail the hedges cut off and pull the delay down, so more and more
calls would be hedged.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dispatcher.config import HedgePolicy
from dispatcher.fleet import Fleet
from dispatcher.fleet.hedge import HEDGE_TRIED
from dispatcher.policies.retry import RetryBudget
from linchkit_plugin.errors import DispatchError
from providers.invocation import Invocation

__all__ = ["DEFAULT_AFTER_MS", "HedgeStep", "LatencyWindow"]

Next = Callable[[Invocation], Awaitable[Any]]

#: The delay of a percentile-driven hedge until the window holds ``MIN_SAMPLES``, unless
#: the policy sets ``after_ms``: a few times a typical in-datacenter call.
DEFAULT_AFTER_MS = 50.0


class LatencyWindow:
    """The latencies of a method's recent calls, and one percentile of them."""

    WINDOW = 256
    REFRESH_EVERY = 16
    MIN_SAMPLES = 20

    __slots__ = ("count", "percentile", "samples", "value")

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.samples: list[float] = []
        self.count = 0
        #: The percentile at the last refresh, in seconds; None until MIN_SAMPLES.
        self.value: float | None = None

    def record(self, seconds: float) -> None:
        count = self.count
        if count < self.WINDOW:
            self.samples.append(seconds)
        else:
            self.samples[count % self.WINDOW] = seconds
        self.count = count = count + 1
        if count >= self.MIN_SAMPLES and (count % self.REFRESH_EVERY == 0 or self.value is None):
            ordered = sorted(self.samples)
            rank = round(self.percentile / 100 * (len(ordered) - 1))
            self.value = ordered[rank]

    def __repr__(self) -> str:
        value = "?" if self.value is None else f"{self.value * 1000:.1f} ms"
        return (
            f"<LatencyWindow p{self.percentile:g}={value} samples={min(self.count, self.WINDOW)}>"
        )


class _NoInstanceLeft(Exception):
    """A hedge found every instance taken by the call's other attempts: it was not sent."""


class HedgeStep:
    """Hedged attempts of one method of a fleet target."""

    __slots__ = (
        "budget",
        "deposits",
        "fleet",
        "floor",
        "initial",
        "latencies",
        "max_attempts",
        "name",
        "next",
        "refused",
        "sent",
        "won",
    )

    def __init__(
        self,
        name: str,
        policy: HedgePolicy,
        fleet: Fleet,
        budget: RetryBudget,
        next_step: Next,
        *,
        deposits: bool,
    ) -> None:
        self.name = name
        self.fleet = fleet
        self.budget = budget
        #: True when no retry step fills the budget for this method's calls.
        self.deposits = deposits
        self.next = next_step
        self.max_attempts = policy.max_attempts
        self.floor = policy.min_after_ms / 1000
        after_ms = policy.after_ms if policy.after_ms is not None else DEFAULT_AFTER_MS
        self.initial = max(after_ms / 1000, self.floor)
        self.latencies = (
            LatencyWindow(policy.after_percentile) if policy.after_percentile is not None else None
        )
        self.sent = 0
        self.won = 0
        self.refused = 0

    @property
    def delay(self) -> float:
        """Seconds to wait for an attempt before sending the next one."""
        latencies = self.latencies
        if latencies is None or latencies.value is None:
            return self.initial
        value = latencies.value
        return value if value > self.floor else self.floor

    async def __call__(self, invocation: Invocation) -> Any:
        if self.deposits:
            self.budget.deposit()
        loop = asyncio.get_running_loop()
        tried: list[int] = []
        started = loop.time()
        first, first_context = self._start(loop, invocation, tried, first=True)
        attempts: dict[asyncio.Task[Any], contextvars.Context] = {first: first_context}
        pending = {first}
        error: DispatchError | None = None
        next_hedge: float | None = started + self.delay
        try:
            while True:
                timeout = None if next_hedge is None else next_hedge - loop.time()
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the delay passed with no answer: hedge, if allowed
                    next_hedge = self._hedge(loop, invocation, tried, attempts, pending)
                    continue
                for task in done:
                    failure = task.exception()
                    if isinstance(failure, _NoInstanceLeft):
                        continue
                    if failure is None or (
                        isinstance(failure, DispatchError) and not failure.retryable
                    ):
                        self._won(task, first, started, loop.time())
                        _adopt(attempts[task])
                        return task.result()
                    if not isinstance(failure, DispatchError):
                        raise failure
                    error = failure
                    _adopt(attempts[task])
                if not pending:
                    assert error is not None
                    raise error
                if len(attempts) == 1:
                    next_hedge = None  # the first attempt failed before a hedge: retry's job
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def _start(
        self, loop: asyncio.AbstractEventLoop, invocation: Invocation, tried: list[int], first: bool
    ) -> tuple[asyncio.Task[Any], contextvars.Context]:
        context = contextvars.copy_context()
        context.run(HEDGE_TRIED.set, tried)
        attempt = self._attempt(invocation) if first else self._hedged(invocation, tried)
        return loop.create_task(attempt, context=context), context

    async def _attempt(self, invocation: Invocation) -> Any:
        return await self.next(invocation)

    async def _hedged(self, invocation: Invocation, tried: list[int]) -> Any:
        # Checked again as the task starts: another attempt may have failed over to the
        # last free instance since the hedge was decided.
        if not self._other_instance_left(tried):
            raise _NoInstanceLeft
        self.sent += 1
        return await self.next(invocation)

    def _hedge(
        self,
        loop: asyncio.AbstractEventLoop,
        invocation: Invocation,
        tried: list[int],
        attempts: dict[asyncio.Task[Any], contextvars.Context],
        pending: set[asyncio.Task[Any]],
    ) -> float | None:
        """Send the next attempt if the deadline, the instances and the budget allow;
        when to send the one after it (None: no more)."""
        now = loop.time()
        if now >= invocation.deadline or not self._other_instance_left(tried):
            return None
        if not self.budget.withdraw():
            self.refused += 1
            return None
        task, context = self._start(loop, invocation, tried, first=False)
        attempts[task] = context
        pending.add(task)
        if len(attempts) >= self.max_attempts:
            return None
        return now + self.delay

    def _other_instance_left(self, tried: Sequence[int]) -> bool:
        # By index, not by count: the set may have changed since an attempt went out.
        return any(instance.index not in tried for instance in self.fleet.instances)

    def _won(
        self, task: asyncio.Task[Any], first: asyncio.Task[Any], started: float, now: float
    ) -> None:
        if task is not first:
            self.won += 1
        if self.latencies is not None and task.exception() is None:
            # The first attempt's latency, or how long it had run when a hedge beat it.
            self.latencies.record(now - started)

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "won": self.won,
            "refused_by_budget": self.refused,
            "delay_ms": round(self.delay * 1000, 3),
        }

    def __repr__(self) -> str:
        return (
            f"<HedgeStep {self.name} delay={self.delay * 1000:.1f}ms sent={self.sent}"
            f" won={self.won} refused={self.refused}>"
        )


def _adopt(context: contextvars.Context) -> None:
    """Set in the current context what ``context`` (an attempt's) changed: as if the
    attempt had run inline, so the steps around hedging see what it left behind."""
    for variable, value in context.items():
        if variable is HEDGE_TRIED:
            continue
        if variable.get(_MISSING) is not value:
            variable.set(value)


_MISSING: Any = object()
