"""Rate limits, breakers and caches whose state is shared by every replica (``state: redis``).

Each wraps the in-process object of the same policy, which is what it falls back to when
the store cannot answer and the manifest says ``fail_open`` (``dispatcher.state``):

* ``SharedLimit``: GCRA in one server-side script, exact across replicas: over T seconds
  at most burst + rate·T calls pass in total, whichever replica they reach. ``wait`` mode
  reserves the slot in the same round trip and sleeps until it; a wait longer than the
  call has left is refused at once. Fallback: this replica's own bucket (the limit then
  holds per replica, not in total).
* ``SharedBreakerStep``: a single-instance target's calls guarded by its
  ``SharedBreaker`` (``dispatcher.fleet.shared_breaker``, which fleets' instances use too):
  the breaker's counters and state in one hash per target, changed by one script per
  admit and outcome; one replica's failures open the circuit for all, and half-open
  probes are counted across all. A replica sends calls to a circuit another one opened
  for at most the push's delay (sub-ms on a LAN) or, if the push is lost,
  ``breaker_sync_ms``. Fallback: the local breaker.
* ``SharedCacheStep``: entries in Redis under a generation per method; a hit is one
  round trip, so ``Dispatcher.ainvalidate`` (one increment) is seen by every replica's
  next read. Concurrent misses in one replica still make one call (single flight).
  Fallback: no cache (the call goes to the target). An entry that is not JSON (another
  writer's) is a miss, logged, and the fresh result replaces it; entries are bounded
  (``redis_store.MAX_VALUE_BYTES``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from dispatcher.config import RateLimit
from dispatcher.fleet.breaker import is_health_failure
from dispatcher.fleet.shared_breaker import SharedBreaker
from dispatcher.policies.cache import ResultCache, _follow, _LeaderGone
from dispatcher.policies.ratelimit import Limit
from dispatcher.state import SharedStore, StateBackend, StateUnavailable, digest
from linchkit_plugin.errors import DispatchError, InvalidParams, RateLimited
from linchkit_plugin.wire import encode_json
from providers._log_lines import sparingly
from providers.invocation import Invocation, Outcome

__all__ = ["SharedBreakerStep", "SharedCacheStep", "SharedLimit"]

Next = Callable[[Invocation], Awaitable[Any]]

log = logging.getLogger("dispatcher.state")

#: The longest a call may wait for a shared limit in ``wait`` mode: its deadline, at most a
#: day (``dispatcher._routes.MAX_TIMEOUT_SECONDS``, a layer above this one). The store
#: reads a limit's state as at most this (and its burst window) ahead of now.
LONGEST_WAIT_SECONDS = 86_400.0


class SharedLimit:
    """A rate limit counted across replicas; the same interface as ``Limit``."""

    def __init__(self, local: Limit, key: str, backend: StateBackend) -> None:
        assert backend.store is not None
        self.local = local
        self.name = local.name
        self.spec: RateLimit = local.spec
        self.reject = local.reject
        self.longest_wait = 0.0 if self.reject else LONGEST_WAIT_SECONDS
        self.key = digest(key, repr(self.spec))  # new settings, new bucket
        self.per_caller = self.spec.scope == "caller"
        self.backend = backend
        self.store: SharedStore = backend.store
        self.rejected = 0
        self.waited = 0

    async def acquire(self, invocation: Invocation) -> None:
        key = self.key
        if self.per_caller:
            caller = invocation.caller
            key = digest(key, "\0" if caller is None else "\1" + caller)
        spec = self.spec
        max_wait = 0.0 if self.reject else invocation.remaining()
        try:
            admission = await self.store.acquire(
                key,
                spec.rate,
                spec.capacity,
                max_wait,
                invocation.deadline,
                longest_wait=self.longest_wait,
            )
        except StateUnavailable as error:
            if not self.backend.fail_open:
                raise
            self.backend.fell_back(f"the limit of {self.name}", error)
            await self.local.acquire(invocation)
            return
        if admission.admitted:
            if admission.wait > 0:
                self.waited += 1
                await asyncio.sleep(admission.wait)
            return
        self.rejected += 1
        if self.reject:
            message = (
                f"{self.name} is over its limit of {spec.rate:g}/s ({spec.scope}, all replicas)"
            )
        else:
            message = (
                f"{self.name}: its {spec.rate:g}/s limit (all replicas) has no room within "
                f"the {max(max_wait, 0.0) * 1000:.0f} ms this call has left"
            )
        raise RateLimited(message, retry_after=admission.wait)

    def __repr__(self) -> str:
        return (
            f"<SharedLimit {self.name} {self.spec.rate:g}/s burst={self.spec.capacity} "
            f"{self.spec.scope} {self.spec.mode} rejected={self.rejected} waited={self.waited}>"
        )


class SharedBreakerStep:
    """Guards a single-instance target's calls with a breaker every replica shares."""

    __slots__ = ("breaker", "next")

    def __init__(self, breaker: SharedBreaker, next_step: Next) -> None:
        self.breaker = breaker
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        breaker = self.breaker
        ticket = await breaker.admit(invocation)
        try:
            result = await self.next(invocation)
        except DispatchError as error:
            await breaker.record(ticket, is_health_failure(error), invocation)
            raise
        except BaseException:
            breaker.record_nothing(ticket)
            raise
        await breaker.record(ticket, False, invocation)
        return result

    def __repr__(self) -> str:
        return f"<SharedBreakerStep {self.breaker!r}>"


async def guard_shared_batch(
    breaker: SharedBreaker,
    invocations: Sequence[Invocation],
    send: Callable[[], Awaitable[list[Outcome[Any]]]],
) -> list[Outcome[Any]]:
    """``guard_batch`` (``dispatcher.fleet.breaker``) with a breaker every replica shares:
    one batch is one call of the target, admitted and recorded once, bounded by the
    latest deadline among its items."""
    bound = max(invocations, key=_deadline)
    ticket = await breaker.admit(bound)
    try:
        outcomes = await send()
    except DispatchError as error:
        await breaker.record(ticket, is_health_failure(error), bound)
        raise
    except BaseException:
        breaker.record_nothing(ticket)
        raise
    failed = bool(outcomes) and all(
        o.error is not None and is_health_failure(o.error) for o in outcomes
    )
    await breaker.record(ticket, failed, bound)
    return outcomes


def _deadline(invocation: Invocation) -> float:
    return invocation.deadline


class SharedCacheStep:
    """A pure method's results, cached where every replica reads them."""

    __slots__ = ("backend", "cache", "name", "next", "store", "ttl", "unreadable")

    def __init__(self, cache: ResultCache, ttl: float, backend: StateBackend, next_step: Next):
        assert backend.store is not None
        self.cache = cache
        self.name = digest(cache.name)
        self.ttl = ttl
        self.backend = backend
        self.store: SharedStore = backend.store
        self.next = next_step
        #: Entries read that were not JSON: their log line is spared by it.
        self.unreadable = 0

    async def __call__(self, invocation: Invocation) -> Any:
        cache = self.cache
        key = cache.digest(invocation)
        while key in cache.filling:
            cache.coalesced += 1
            try:
                return await _follow(cache.join(key), invocation, cache.name)
            except _LeaderGone:
                continue
        cache.filling[key] = None
        try:
            result = await self._fill(invocation, key.hex())
        except BaseException as error:
            cache.failed(key, error)
            raise
        cache.filled(key, result)
        return result

    async def _fill(self, invocation: Invocation, key: str) -> Any:
        cache = self.cache
        generation: int | None = None
        try:
            value, generation = await self.store.cache_get(self.name, key, invocation.deadline)
        except StateUnavailable as error:
            if not self.backend.fail_open:
                raise
            self.backend.fell_back(f"the cache of {cache.name}", error)
            value = None
        if value is not None:
            try:
                result = orjson.loads(value)
            except orjson.JSONDecodeError:
                # Not what a dispatcher writes (another writer's, or corrupted): a miss,
                # and the fresh result stored below takes its place. Logged sparingly: a
                # result that is not stored (not JSON, over the bound) leaves the entry
                # for the next call to meet again, a line a call for as long as it lives.
                self.unreadable += 1
                if sparingly(self.unreadable):
                    log.warning(
                        "the shared cache of %s held an entry that is not JSON; calling the"
                        " target, whose result replaces it when it can be stored (%d such"
                        " entries read so far)",
                        cache.name,
                        self.unreadable,
                    )
            else:
                cache.hits += 1
                return result
        cache.misses += 1
        result = await self.next(invocation)
        if generation is not None and invocation.remaining() > 0:
            try:
                encoded = encode_json(result)
            except InvalidParams:
                return result  # not JSON: served, not shared
            try:
                await self.store.cache_set(
                    self.name, key, encoded, self.ttl, generation, invocation.deadline
                )
            except DispatchError as error:  # the result is in hand: not storing it is all
                if isinstance(error, StateUnavailable):
                    self.backend.fell_back(f"the cache of {cache.name}", error)
        return result

    def __repr__(self) -> str:
        return f"<SharedCacheStep {self.cache!r} unreadable={self.unreadable}>"
