"""Retries of retryable errors, for idempotent methods, bounded by the call's deadline.

The backoff is tenacity's ``wait_random_exponential`` (exponential with full jitter);
a ``retry_after`` from the target or a policy is honoured when it asks for longer. The
loop itself is written here rather than handed to ``AsyncRetrying`` because each attempt
is decided by three things only the dispatcher knows — the deadline (no retry that could
not finish in time), the retry budget, and ``retry_after`` — and because the first attempt
must cost nothing on the hot path.

When the step right inside is the target's breaker (``BreakerStep``, the usual chain of a
single target), this step guards each attempt with that breaker itself: the breaker's
accounting is the same, and a call passes one coroutine layer fewer (a coroutine made,
awaited and resumed on every call): the retry and breaker steps together went from 0.5 to
0.3 µs of CPU per call in-process, 1.1 to 0.2 µs with calls interleaving as with I/O
(``bench/compare_chain.py``, 2026-12-02).

The retry budget keeps a failing target from receiving more than ``budget_ratio`` extra
load: every first attempt deposits ``budget_ratio`` of a token, every retry spends one.
(A Finagle-style budget; no maintained Python library offers one.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.config import RetryPolicy
from dispatcher.fleet.breaker import BreakerStep, CircuitBreaker, is_health_failure
from linchkit_plugin.errors import DispatchError
from providers.invocation import Invocation

__all__ = ["RetryBudget", "RetryStep"]

Next = Callable[[Invocation], Awaitable[Any]]

#: Retries a budget can save up: the burst allowed after a quiet period.
BUDGET_RESERVE_CALLS = 100


class RetryBudget:
    """Tokens for retries, earned by first attempts."""

    def __init__(self, name: str, ratio: float) -> None:
        self.name = name
        self.ratio = ratio
        self.capacity = max(1.0, ratio * BUDGET_RESERVE_CALLS)
        self.tokens = self.capacity
        self.spent = 0
        self.refused = 0

    def configure(self, ratio: float) -> None:
        """A new ratio (a reload changed it): the tokens held stay, up to the new capacity."""
        self.ratio = ratio
        self.capacity = max(1.0, ratio * BUDGET_RESERVE_CALLS)
        self.tokens = min(self.tokens, self.capacity)

    def deposit(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.capacity else self.capacity

    def withdraw(self) -> bool:
        if self.tokens >= 1:
            self.tokens -= 1
            self.spent += 1
            return True
        self.refused += 1
        return False

    def __repr__(self) -> str:
        return (
            f"<RetryBudget {self.name} tokens={self.tokens:.1f}/{self.capacity:g} "
            f"spent={self.spent} refused={self.refused}>"
        )


class _AttemptNumber:
    """The one field of tenacity's ``RetryCallState`` its wait strategies read."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


class RetryStep:
    __slots__ = ("attempt", "attempts", "backoff", "breaker", "budget", "next", "retries")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget, next_step: Next) -> None:
        from tenacity import wait_random_exponential  # only methods that retry pay its import

        self.attempts = policy.attempts
        self.backoff = wait_random_exponential(
            multiplier=policy.initial_backoff_ms / 1000, max=policy.max_backoff_ms / 1000
        )
        self.budget = budget
        #: What one attempt is: ``next_step`` whole (retries go through it).
        self.attempt = next_step
        #: The first attempt: with a breaker step inside, its breaker and what it guards
        #: (``__call__`` does the breaker step's work in its own coroutine).
        self.breaker: CircuitBreaker | None = None
        self.next = next_step
        if type(next_step) is BreakerStep:
            self.breaker = next_step.breaker
            self.next = next_step.next
        self.retries = 0

    async def __call__(self, invocation: Invocation) -> Any:
        # ``budget.deposit()`` written out: the first attempt is every call's, and a method
        # call is a fifth of what this step costs when nothing fails.
        budget = self.budget
        tokens = budget.tokens + budget.ratio
        budget.tokens = tokens if tokens < budget.capacity else budget.capacity
        breaker = self.breaker
        try:
            if breaker is None:
                return await self.next(invocation)
            # ``BreakerStep.__call__``, written out (see the module docstring).
            probe = breaker.admit()
            try:
                result = await self.next(invocation)
            except DispatchError as error:
                if is_health_failure(error):
                    breaker.record_failure(probe)
                else:
                    breaker.record_success(probe)
                raise
            except BaseException:
                breaker.record_nothing(probe)
                raise
            breaker.record_success(probe)
            return result
        except DispatchError as error:
            if not error.retryable:
                raise
            return await self._retry(invocation, error)

    async def _retry(self, invocation: Invocation, error: DispatchError) -> Any:
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts):
            backoff = self.backoff(_AttemptNumber(attempt))  # type: ignore[arg-type]
            delay = max(backoff, error.retry_after or 0.0)
            if loop.time() + delay >= invocation.deadline or not self.budget.withdraw():
                raise error
            self.retries += 1
            await asyncio.sleep(delay)
            try:
                return await self.attempt(invocation)
            except DispatchError as next_error:
                if not next_error.retryable:
                    raise
                error = next_error
        raise error
