"""Rate limits (aiolimiter's leaky bucket) per method, per target or per caller.

A limit of ``rate`` calls/s with ``burst`` B is a bucket of capacity B draining at
``rate``: over T seconds at most ``B + rate·T`` calls pass. ``mode: reject`` fails a call
over the limit at once with ``RateLimited`` and a ``retry_after``; ``mode: wait`` queues it
until the bucket has room or the call's deadline passes. Cache hits never get here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

from dispatcher.config import RateLimit
from linchkit_plugin.errors import RateLimited
from providers.invocation import Invocation

__all__ = ["Limit", "LimitLike", "RateLimitStep", "new_limiter"]

Next = Callable[[Invocation], Awaitable[Any]]

#: Per-caller buckets are forgotten after this long unused (once drained), so callers
#: cannot grow memory; at most ``MAX_CALLER_BUCKETS`` are kept (``_room_for_one``).
CALLER_BUCKET_IDLE_SECONDS = 600.0
MAX_CALLER_BUCKETS = 100_000
#: With ``MAX_CALLER_BUCKETS`` kept, how many of the least recently used a new caller's
#: first call looks at for one that has drained: a bounded cost per new caller.
FULL_SCAN = 32


class LimitLike(Protocol):
    """A limit as the chain and gates use it: this process's ``Limit`` or a shared one."""

    name: str

    async def acquire(self, invocation: Invocation) -> None: ...


class Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket, with the one look a call that finds room needs.

    aiolimiter is kept for what it does well (queueing waiters in order and waking each
    when the bucket has drained enough for it). A call finding room used to ask
    ``has_capacity()`` and then ``acquire()``, which drains the bucket and checks the
    amount again and re-arms the waker: ``take_if_room`` drains once and takes the unit.
    The rate-limit step went from ~7.7 µs to ~2 µs of CPU per call (bench_policies
    ablation); the state read and written is exactly the one ``acquire`` uses.
    """

    __slots__ = ()

    def take_if_room(self) -> bool:
        """Take one unit if the bucket has room for it now; False (nothing taken) if not."""
        # ``self._leak()`` written out (the same arithmetic on the same state): every call
        # of a limited method comes here. With the buckets found at build time, the step
        # went from 0.6-0.9 to 0.6 µs per call (bench/compare_chain.py, 2026-12-02).
        # The loop read from aiolimiter's slot, not its ``_loop`` property (which also
        # checks, on every call, that the loop is not closed: a bucket used by a later
        # loop, which ``acquire`` and the waker still recover from), and no ``max``:
        # 335 → 179 ns per call in a tight loop.
        try:
            loop = self._event_loop
        except AttributeError:  # the bucket's first use
            loop = self._loop
        now = loop.time()
        level = self._level
        if level:
            level -= (now - self._last_check) * self._rate_per_sec
            if level < 0:
                level = 0
            self._level = level
        self._last_check = now
        if level + 1 > self.max_rate:
            return False
        self._level = level + 1
        if self._waiters:  # as ``acquire`` does: the waker re-arms for the new level
            self._wake_next()
        return True

    def forgettable(self, now: float, idle: float) -> bool:
        """Whether nobody has used it for ``idle`` seconds and nothing waits on it, and it
        has drained by ``now``: a new bucket would be the same (empty), so forgetting it
        gives its caller nothing."""
        quiet = now - self._last_check
        return not self._waiters and quiet >= idle and self._level <= quiet * self._rate_per_sec

    def seconds_until_room(self) -> float:
        """How long until the bucket has room for one more call (after ``take_if_room``
        or ``has_capacity`` brought its level up to date).

        aiolimiter computes the same figure to wake its own waiters but does not expose it.
        """
        excess = self._level + 1 - self.max_rate
        return max(excess / self._rate_per_sec, 0.0)


def new_limiter(limit: RateLimit) -> Bucket:
    return Bucket(limit.capacity, limit.capacity / limit.rate)


class Limit:
    """One configured limit and its bucket(s)."""

    def __init__(self, name: str, spec: RateLimit, shared: Bucket | None = None) -> None:
        self.name = name
        self.spec = spec
        self.reject = spec.mode == "reject"
        self._single = (
            shared
            if shared is not None
            else (None if spec.scope == "caller" else new_limiter(spec))
        )
        #: Least recently used first. Not cachetools' ``TTLCache``: it forgets an item a
        #: time after it was stored, however often it is read since, and a caller kept at
        #: its limit got a new, empty bucket (its burst again) every 600 s.
        self._per_caller: OrderedDict[str, Bucket] | None = (
            OrderedDict() if spec.scope == "caller" else None
        )
        #: The one bucket new callers share while every kept bucket still holds what its
        #: caller spent (``_room_for_one``); made when first needed.
        self._overflow: Bucket | None = None
        self.rejected = 0
        self.waited = 0

    def bucket(self, invocation: Invocation) -> Bucket:
        if self._per_caller is None:
            assert self._single is not None
            return self._single
        caller = invocation.caller or ""
        buckets = self._per_caller
        bucket = buckets.get(caller)
        if bucket is not None:
            buckets.move_to_end(caller)
            return bucket
        if not _room_for_one(buckets):
            overflow = self._overflow
            if overflow is None:
                overflow = self._overflow = new_limiter(self.spec)
            return overflow
        bucket = buckets[caller] = new_limiter(self.spec)
        return bucket

    async def acquire(self, invocation: Invocation) -> None:
        bucket = self.bucket(invocation)
        if bucket.take_if_room():
            return
        if self.reject:
            self.rejected += 1
            raise RateLimited(
                f"{self.name} is over its limit of {self.spec.rate:g}/s ({self.spec.scope})",
                retry_after=bucket.seconds_until_room(),
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
                retry_after=0.0 if bucket.has_capacity() else bucket.seconds_until_room(),
            ) from None

    def __repr__(self) -> str:
        callers = ""
        if self._per_caller is not None:
            shared = "" if self._overflow is None else " overflow"
            callers = f" callers={len(self._per_caller)}{shared}"
        return (
            f"<Limit {self.name} {self.spec.rate:g}/s burst={self.spec.capacity} "
            f"{self.spec.scope} {self.spec.mode}{callers} rejected={self.rejected}"
            f" waited={self.waited}>"
        )


def _room_for_one(buckets: OrderedDict[str, Bucket]) -> bool:
    """Before a new caller's bucket: whether there is room for it.

    First the least recently used buckets that nobody has used for
    ``CALLER_BUCKET_IDLE_SECONDS`` and that have drained are forgotten (each once, so
    O(1) per new caller over time). With ``MAX_CALLER_BUCKETS`` still kept, a bucket goes
    only if it has drained: forgetting it gives its caller nothing, since a new bucket would
    be the same. One that still holds what its caller spent is never forgotten, however
    long since it was used: callers choose their ids (a token issuer's subjects, a host's
    own strings), so under a least-recently-used rule one principal presenting a new id
    per call pushed established callers out, each then back with a whole burst. Up to
    ``FULL_SCAN`` are looked at, those that have not drained moved to the back; with none
    to forget, False: the new caller shares the limit's one overflow bucket. A flood of new
    ids then throttles itself, and callers new during it with it, while every caller
    already kept keeps exactly its level."""
    now = asyncio.get_running_loop().time()  # the buckets' clock
    idle = CALLER_BUCKET_IDLE_SECONDS
    while buckets and next(iter(buckets.values())).forgettable(now, idle):
        buckets.popitem(last=False)
    if len(buckets) < MAX_CALLER_BUCKETS:
        return True
    for _ in range(min(FULL_SCAN, len(buckets))):
        caller, bucket = buckets.popitem(last=False)
        if bucket.forgettable(now, 0.0):
            return True
        buckets[caller] = bucket
    return False


class RateLimitStep:
    __slots__ = ("buckets", "limits", "next")

    def __init__(self, limits: Sequence[LimitLike], next_step: Next) -> None:
        self.limits = tuple(limits)
        self.next = next_step
        #: The limits' buckets when each limit has one bucket in this process (not per
        #: caller, not shared): found once here instead of on every call.
        singles = [
            limit._single if isinstance(limit, Limit) and limit.__class__ is Limit else None
            for limit in self.limits
        ]
        self.buckets: tuple[Bucket, ...] | None = (
            tuple(singles) if None not in singles else None  # type: ignore[arg-type]
        )

    def __call__(self, invocation: Invocation) -> Awaitable[Any]:
        # A call that finds room in every limit (the usual case) passes without a coroutine
        # of this step's own or of ``Limit.acquire``: it gets the next step's awaitable
        # back, two coroutine layers fewer on every resumption of the call (bench_hot_path).
        # A limit without room, or a shared one (Redis), takes the awaiting path from it on;
        # ``acquire`` looks at its bucket again there, so the outcome is the same.
        buckets = self.buckets
        if buckets is not None:
            for index, bucket in enumerate(buckets):
                if not bucket.take_if_room():
                    return self._acquire_from(index, invocation)
            return self.next(invocation)
        for index, limit in enumerate(self.limits):
            if limit.__class__ is not Limit or not limit.bucket(invocation).take_if_room():
                return self._acquire_from(index, invocation)
        return self.next(invocation)

    async def _acquire_from(self, first: int, invocation: Invocation) -> Any:
        for limit in self.limits[first:]:
            await limit.acquire(invocation)
        return await self.next(invocation)
