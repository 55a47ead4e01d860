"""Rate limits (aiolimiter's leaky bucket) per method, per target or per caller.

A limit of ``rate`` calls/s with ``burst`` B is a bucket of capacity B draining at
``rate``: over T seconds at most ``B + rate·T`` calls pass. ``mode: reject`` fails a call
over the limit at once with ``RateLimited`` and a ``retry_after``; ``mode: wait`` queues it
until the bucket has room or the call's deadline passes. Cache hits never get here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiolimiter import AsyncLimiter
from cachetools import TTLCache

from dispatcher.config import RateLimit
from linchkit_plugin.errors import RateLimited
from providers.invocation import Invocation

__all__ = ["Limit", "LimitLike", "RateLimitStep", "new_limiter"]

Next = Callable[[Invocation], Awaitable[Any]]

#: Per-caller buckets are forgotten after this long unused, so callers cannot grow memory.
CALLER_BUCKET_IDLE_SECONDS = 600.0
MAX_CALLER_BUCKETS = 100_000


class LimitLike(Protocol):
    """A limit as the chain and gates use it: this process's ``Limit`` or a shared one."""

    name: str

    async def acquire(self, invocation: Invocation) -> None: ...


def new_limiter(limit: RateLimit) -> AsyncLimiter:
    return AsyncLimiter(limit.capacity, limit.capacity / limit.rate)


def _seconds_until_room(bucket: AsyncLimiter) -> float:
    """How long until ``bucket`` has room for one more call (after ``has_capacity``).

    aiolimiter computes the same figure to wake its own waiters but does not expose it;
    its level and leak rate are read here, after ``has_capacity`` brought them up to date.
    """
    excess = bucket._level + 1 - bucket.max_rate
    return max(excess / bucket._rate_per_sec, 0.0)


class Limit:
    """One configured limit and its bucket(s)."""

    def __init__(self, name: str, spec: RateLimit, shared: AsyncLimiter | None = None) -> None:
        self.name = name
        self.spec = spec
        self.reject = spec.mode == "reject"
        self._single = (
            shared
            if shared is not None
            else (None if spec.scope == "caller" else new_limiter(spec))
        )
        self._per_caller: TTLCache[str, AsyncLimiter] | None = (
            TTLCache(MAX_CALLER_BUCKETS, CALLER_BUCKET_IDLE_SECONDS)
            if spec.scope == "caller"
            else None
        )
        self.rejected = 0
        self.waited = 0

    def bucket(self, invocation: Invocation) -> AsyncLimiter:
        if self._per_caller is None:
            assert self._single is not None
            return self._single
        caller = invocation.caller or ""
        try:
            return self._per_caller[caller]
        except KeyError:
            limiter = self._per_caller[caller] = new_limiter(self.spec)
            return limiter

    async def acquire(self, invocation: Invocation) -> None:
        bucket = self.bucket(invocation)
        if bucket.has_capacity():
            await bucket.acquire()  # returns at once: there is room
            return
        if self.reject:
            self.rejected += 1
            raise RateLimited(
                f"{self.name} is over its limit of {self.spec.rate:g}/s ({self.spec.scope})",
                retry_after=_seconds_until_room(bucket),
            )
        self.waited += 1
        remaining = invocation.remaining()
        try:
            async with asyncio.timeout(remaining):
                await bucket.acquire()
        except TimeoutError:
            self.rejected += 1
            raise RateLimited(
                f"{self.name}: queued {remaining * 1000:.0f} ms for its {self.spec.rate:g}/s limit "
                "and the deadline passed",
                retry_after=0.0 if bucket.has_capacity() else _seconds_until_room(bucket),
            ) from None

    def __repr__(self) -> str:
        return (
            f"<Limit {self.name} {self.spec.rate:g}/s burst={self.spec.capacity} "
            f"{self.spec.scope} {self.spec.mode} rejected={self.rejected} waited={self.waited}>"
        )


class RateLimitStep:
    __slots__ = ("limits", "next")

    def __init__(self, limits: Sequence[LimitLike], next_step: Next) -> None:
        self.limits = tuple(limits)
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        for limit in self.limits:
            await limit.acquire(invocation)
        return await self.next(invocation)
