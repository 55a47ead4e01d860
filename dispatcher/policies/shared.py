"""Rate limits, breakers and caches whose state is shared by every replica (``state: redis``).

Each wraps the in-process object of the same policy, which is what it falls back to when
the store cannot answer and the manifest says ``fail_open`` (``dispatcher.state``):

* ``SharedLimit``: GCRA in one server-side script, exact across replicas: over T seconds
  at most burst + rate·T calls pass in total, whichever replica they reach. ``wait`` mode
  reserves the slot in the same round trip and sleeps until it; a wait longer than the
  call has left is refused at once. Fallback: this replica's own bucket (the limit then
  holds per replica, not in total).
* ``SharedBreakerStep``: the breaker's counters and state in one hash per target, changed
  by one script per admit and outcome; one replica's failures open the circuit for all,
  and half-open probes are counted across all. So that an admit is not a round trip per
  call, a replica trusts its last view of a *closed* breaker for ``breaker_sync_ms``, and
  every transition is pushed to every replica, which drops its view at once: a replica
  sends calls to a circuit another one opened for at most the push's delay (sub-ms on a
  LAN) or, if the push is lost, ``breaker_sync_ms``. Successes are written only when they
  change something (failures were counted, a probe). Fallback: the local breaker.
* ``SharedCacheStep``: entries in Redis under a generation per method; a hit is one
  round trip, so ``Dispatcher.ainvalidate`` (one increment) is seen by every replica's
  next read. Concurrent misses in one replica still make one call (single flight).
  Fallback: no cache (the call goes to the target).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from dispatcher.config import BreakerPolicy, RateLimit
from dispatcher.fleet.breaker import CircuitBreaker, is_health_failure
from dispatcher.policies.cache import ResultCache, _Flight, _follow, _LeaderGone
from dispatcher.policies.ratelimit import Limit
from dispatcher.state import (
    BreakerPolicyArgs,
    SharedStore,
    StateBackend,
    StateUnavailable,
    digest,
)
from linchkit_plugin.errors import CircuitOpen, DispatchError, InvalidParams, RateLimited
from linchkit_plugin.wire import encode_json
from providers.invocation import Invocation

__all__ = ["SharedBreakerStep", "SharedCacheStep", "SharedLimit"]

Next = Callable[[Invocation], Awaitable[Any]]


class SharedLimit:
    """A rate limit counted across replicas; the same interface as ``Limit``."""

    def __init__(self, local: Limit, key: str, backend: StateBackend) -> None:
        assert backend.store is not None
        self.local = local
        self.name = local.name
        self.spec: RateLimit = local.spec
        self.reject = local.reject
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
                key, spec.rate, spec.capacity, max_wait, invocation.deadline
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
    """Guards a target's calls with a breaker every replica shares."""

    __slots__ = ("args", "backend", "clock", "key", "local", "name", "next", "store", "sync")

    def __init__(
        self,
        local: CircuitBreaker,
        key: str,
        policy: BreakerPolicy,
        backend: StateBackend,
        sync: float,
        clock: Callable[[], float],
        next_step: Next,
    ) -> None:
        assert backend.store is not None
        self.local = local
        self.name = local.name
        self.key = digest(key)
        self.args = BreakerPolicyArgs(
            policy.fail_max,
            policy.reset_timeout_ms / 1000,
            policy.half_open_max_calls,
            policy.success_threshold,
        )
        self.backend = backend
        self.store: SharedStore = backend.store
        self.sync = sync
        self.clock = clock
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        try:
            probe, quiet = await self._admit(invocation)
        except StateUnavailable as error:
            if not self.backend.fail_open:
                raise
            self.backend.fell_back(f"the breaker of {self.name}", error)
            return await self._local_call(invocation)
        try:
            result = await self.next(invocation)
        except DispatchError as error:
            failed = is_health_failure(error)
            if failed or probe or not quiet:
                await self._record("failure" if failed else "success", probe, invocation)
            raise
        except BaseException:
            if probe:  # cancelled: free the probe slot, without making anyone wait for it
                self.store.spawn(self._record_now("nothing", True, None), "breaker record")
            raise
        if probe or not quiet:
            await self._record("success", probe, invocation)
        return result

    async def _admit(self, invocation: Invocation) -> tuple[bool, bool]:
        """(a probe?, nothing to write on success?) or ``CircuitOpen``."""
        seen = self.store.breaker_view(self.key)
        if seen is not None:
            view, at = seen
            if view.state == "closed" and self.clock() - at < self.sync:
                return False, view.failures == 0
        view = await self.store.breaker_admit(self.key, self.args, invocation.deadline)
        if not view.admitted:
            why = "open" if view.state == "open" else "half-open and its probes are in flight"
            raise CircuitOpen(
                f"circuit of {self.name} is {why} (shared by all replicas)",
                retry_after=view.retry_after,
            )
        return view.probe, view.state == "closed" and view.failures == 0

    async def _record(self, outcome: str, probe: bool, invocation: Invocation) -> None:
        """Record within the call's time when there is some, else without waiting: the
        outcome is in hand, recording it must not push the call past its deadline."""
        if invocation.remaining() > 0:
            try:
                await self._record_now(outcome, probe, invocation.deadline)
            except StateUnavailable as error:
                self.backend.fell_back(f"the breaker of {self.name}", error)
                self._record_locally(outcome, probe)
            except DispatchError:  # the deadline came first: finish it in the background
                self.store.spawn(self._record_now(outcome, probe, None), "breaker record")
        else:
            self.store.spawn(self._record_now(outcome, probe, None), "breaker record")

    async def _record_now(self, outcome: str, probe: bool, deadline: float | None) -> None:
        if deadline is None:
            deadline = self.clock() + 60.0  # bounded by the backend's operation timeout
        await self.store.breaker_record(self.key, self.args, outcome, probe, deadline)

    def _record_locally(self, outcome: str, probe: bool) -> None:
        # The shared admit said nothing of the local breaker's probes: count no probe.
        if outcome == "failure":
            self.local.record_failure(False)
        elif outcome == "success":
            self.local.record_success(False)

    async def _local_call(self, invocation: Invocation) -> Any:
        local = self.local
        probe = local.admit()
        try:
            result = await self.next(invocation)
        except DispatchError as error:
            (local.record_failure if is_health_failure(error) else local.record_success)(probe)
            raise
        except BaseException:
            local.record_nothing(probe)
            raise
        local.record_success(probe)
        return result

    def __repr__(self) -> str:
        seen = self.store.breaker_view(self.key)
        state = seen[0].state if seen is not None else "unknown"
        return f"<SharedBreakerStep {self.name} {state} local={self.local!r}>"


class SharedCacheStep:
    """A pure method's results, cached where every replica reads them."""

    __slots__ = ("backend", "cache", "name", "next", "store", "ttl")

    def __init__(self, cache: ResultCache, ttl: float, backend: StateBackend, next_step: Next):
        assert backend.store is not None
        self.cache = cache
        self.name = digest(cache.name)
        self.ttl = ttl
        self.backend = backend
        self.store: SharedStore = backend.store
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        cache = self.cache
        key = cache.digest(invocation)
        while True:
            flight = cache.filling.get(key)
            if flight is None:
                break
            cache.coalesced += 1
            try:
                return await _follow(flight.joined(), invocation, cache.name)
            except _LeaderGone:
                continue
        flight = cache.filling[key] = _Flight()
        try:
            result = await self._fill(invocation, key.hex())
        except BaseException as error:
            flight.failed(error)
            raise
        else:
            flight.succeeded(result)
            return result
        finally:
            del cache.filling[key]

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
            cache.hits += 1
            return orjson.loads(value)
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
        return f"<SharedCacheStep {self.cache!r}>"
