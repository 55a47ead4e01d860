"""The Redis backend: state shared by every replica naming the same Redis and key prefix.

Each shared operation is one Lua script (``_scripts``), loaded once and run with EVALSHA
(``register_script``), through the connection's bounded ``run`` (``redis_connection``,
the only module that imports redis-py: the pool, the bounds, what an outage does). Here:
rate limits, caches, idempotency records and the lifecycle; the breakers' operations and
the answers kept for them are ``redis_breakers``, async jobs ``redis_jobs``.

Notifications (one channel per key prefix): a breaker transition (every replica drops its
cached view of that breaker, and reads where it stands for what it shows: metrics, logs),
the end of an idempotent call (its waiters claim again) and the end of an async job
(``result`` waiters read it; the jobs themselves: ``redis_jobs``). They save waiting,
never carry state: a missed one costs at most ``breaker_sync_ms`` of a stale breaker
view, or one poll interval of an idempotent waiter; the breakers are read again when
notifications reconnect.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.config import StateConfig
from dispatcher.state import _scripts
from dispatcher.state._redis_replies import reply_text
from dispatcher.state.base import StateBackend
from dispatcher.state.errors import StateUnavailable
from dispatcher.state.idempotency_store import Claim, Claimed, IdempotencyStore, encode_too_large
from dispatcher.state.job_store import JobRecords, JobStore
from dispatcher.state.memory import MemoryIdempotency
from dispatcher.state.redis_breakers import RedisBreakers
from dispatcher.state.redis_connection import CLOSE_SECONDS, RedisConnection
from dispatcher.state.redis_job_records import RedisJobRecords
from dispatcher.state.redis_jobs import RedisJobs
from dispatcher.state.shared_store import Admission, BreakerPolicyArgs, BreakerView, SharedStore
from providers._log_lines import sparingly

__all__ = ["RedisState"]

log = logging.getLogger("dispatcher.state")

#: The largest cached result or recorded outcome kept in Redis, as JSON (the default of
#: ``jobs.max_result_bytes``), and the largest read: read whole, a value that outlasted
#: ``op_timeout_ms`` failed every read of it, each making the replica skip Redis for
#: ``retry_after_ms``. A larger result is served and not cached; a larger outcome is
#: recorded as its size only (``encode_too_large``).
MAX_VALUE_BYTES = 16 * 1024 * 1024


class RedisState(StateBackend, SharedStore, IdempotencyStore):
    shared = True

    def __init__(self, config: StateConfig, clock: Callable[[], float]) -> None:
        assert config.url is not None
        self.config = config
        self.fail_open = config.on_unavailable == "fail_open"
        self.sync = config.breaker_sync_ms / 1000
        self._redis = RedisConnection(config, clock)
        self.op_timeout = self._redis.op_timeout
        self.retry_after = self._redis.retry_after
        self.where = self._redis.where
        self._clock = clock
        prefix = config.key_prefix
        self._prefix = prefix
        self.channel = f"{prefix}:events"
        self._local_idempotency = MemoryIdempotency(clock)
        self._client = client = self._redis.client
        self._limit = client.register_script(_scripts.LIMIT)
        self._cache_get = client.register_script(_scripts.CACHE_GET)
        self._cache_set = client.register_script(_scripts.CACHE_SET)
        self._claim = client.register_script(_scripts.IDEMPOTENCY_CLAIM)
        self._end = client.register_script(_scripts.IDEMPOTENCY_END)
        self._run = self._redis.run
        self._breakers = RedisBreakers(
            client,
            self._run,
            key=functools.partial(self._key, "breaker"),
            channel=self.channel,
            where=self.where,
            op_timeout=self.op_timeout,
            clock=clock,
            spawn=self.spawn,
        )
        self._jobs = RedisJobs(
            client, self._run, prefix, self.channel, self.op_timeout, clock, self.changed
        )
        self._job_records = RedisJobRecords(self._jobs, client, self.channel)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dropped_entries = 0  # cached entries no dispatcher wrote, deleted unread

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def idempotency(self) -> IdempotencyStore:
        return self

    @property
    def local_idempotency(self) -> MemoryIdempotency:
        """Where idempotency records go while Redis cannot answer (fail_open)."""
        return self._local_idempotency

    @property
    def store(self) -> SharedStore:
        return self

    @property
    def jobs(self) -> JobStore:
        return self._jobs

    @property
    def job_records(self) -> JobRecords:
        return self._job_records

    async def start(self) -> None:
        # No check that Redis answers: with fail_open a replica must start while Redis is
        # down; with fail_closed its calls fail typed until it is back.
        self._listener = asyncio.get_running_loop().create_task(
            self._redis.listen(
                self.channel,
                connected=self._breakers.connected,
                disconnected=self._breakers.disconnected,
                notified=self._notified,
            ),
            name=f"state notifications from {self.where}",
        )

    async def aclose(self) -> None:
        if self._tasks:  # outcomes and breaker records still on their way: bounded
            await asyncio.wait(self._tasks, timeout=self.op_timeout * 2)
            for task in self._tasks:
                task.cancel()
        if self._listener is not None:
            # Bounded: a listener stuck closing its connection must not hold the close up.
            self._listener.cancel()
            await asyncio.wait((self._listener,), timeout=CLOSE_SECONDS)
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.cancel()
        await self._redis.aclose()

    def spawn(self, work: Awaitable[Any], what: str) -> None:
        """Run ``work`` (a bounded operation) without making a caller wait; ``aclose``
        waits for it."""

        async def run() -> None:
            try:
                await work
            except StateUnavailable as error:
                self.fell_back(what, error)

        task = asyncio.get_running_loop().create_task(run(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fell_back(self, what: str, error: StateUnavailable) -> None:
        self._redis.fell_back(what, error)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    # -- rate limits -------------------------------------------------------------------------

    async def acquire(
        self,
        key: str,
        rate: float,
        burst: int,
        max_wait: float,
        deadline: float,
        *,
        longest_wait: float,
    ) -> Admission:
        interval_us = math.ceil(1_000_000 / rate)  # rounded up: never more than the rate
        args = (interval_us, burst, int(max_wait * 1_000_000), int(longest_wait * 1_000_000))
        keys = (self._key("limit", key),)
        admitted, wait_us = await self._run(
            "a rate limit", deadline, lambda: self._limit(keys=keys, args=args)
        )
        return Admission(bool(admitted), int(wait_us) / 1_000_000)

    # -- breakers ------------------------------------------------------------------------------

    async def breaker_admit(
        self, key: str, policy: BreakerPolicyArgs, deadline: float
    ) -> BreakerView:
        return await self._breakers.operate(key, policy, "admit", False, deadline)

    async def breaker_record(
        self, key: str, policy: BreakerPolicyArgs, outcome: str, probe: bool, deadline: float
    ) -> BreakerView:
        return await self._breakers.operate(key, policy, outcome, probe, deadline)

    def breaker_view(self, key: str) -> tuple[BreakerView, float] | None:
        """The last answer kept for ``key``, and when the operation it answered was sent."""
        return self._breakers.view(key)

    def breaker_watch(self, key: str, seen: Callable[[str, int, int], None]) -> None:
        self._breakers.watch(key, seen)

    def breaker_unwatch(self, key: str) -> None:
        self._breakers.unwatch(key)

    # -- cache -----------------------------------------------------------------------------------

    async def cache_get(self, name: str, key: str, deadline: float) -> tuple[bytes | None, int]:
        keys = (self._key("cachegen", name),)
        args = (self._key("cache", name) + ":", key, MAX_VALUE_BYTES)
        generation, value, *wrong_type = await self._run(
            "a cache read", deadline, lambda: self._cache_get(keys=keys, args=args)
        )
        if isinstance(value, int) or wrong_type:
            # Dropped unread, each once; logged sparingly, since whoever writes them
            # chooses how many there are.
            self.dropped_entries += 1
            if sparingly(self.dropped_entries):
                what = (
                    f"a {reply_text(wrong_type[0])}, not a string"
                    if wrong_type
                    else f"{value} bytes, over the bound of {MAX_VALUE_BYTES} dispatchers write"
                )
                log.warning(
                    "state store %s: a cached entry no dispatcher wrote (%s) was dropped"
                    " unread; the call goes to the target (%d such entries so far)",
                    self.where,
                    what,
                    self.dropped_entries,
                )
        text = reply_text(generation)
        digits = text.removeprefix("-")
        # What INCR writes: a 64-bit integer. It refuses anything else, so a counter
        # another writer garbled stays garbled until someone deletes it.
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
            raise StateUnavailable(
                f"state store {self.where} refused a cache read: the cache's generation"
                f" counter ({self._key('cachegen', name)}) is not an integer; delete it",
                details={"stage": "state"},
            )
        return (value if isinstance(value, bytes) else None), int(text)

    async def cache_set(
        self, name: str, key: str, value: bytes, ttl: float, generation: int, deadline: float
    ) -> None:
        if len(value) > MAX_VALUE_BYTES:
            return  # served, not shared: every replica's read of it would cost its transfer
        keys = (self._key("cachegen", name),)
        args = (self._key("cache", name) + ":", key, value, max(1, int(ttl * 1000)), generation)
        await self._run("a cache write", deadline, lambda: self._cache_set(keys=keys, args=args))

    async def cache_invalidate(self, names: list[str], deadline: float) -> None:
        async def bump() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.incr(self._key("cachegen", name))
                await pipe.execute()

        if names:
            await self._run("a cache invalidation", deadline, bump)

    # -- idempotency --------------------------------------------------------------------------------

    async def claim(
        self,
        key: str,
        fingerprint: str,
        lease: float,
        deadline: float,
        *,
        version: str,
        other_versions: tuple[str, ...] = (),
    ) -> Claimed:
        token = os.urandom(8).hex()
        keys = (self._key("idem", key),)
        lease_ms = max(1, int(lease * 1000))
        args: tuple[str | int, ...] = (
            fingerprint,
            token,
            lease_ms,
            MAX_VALUE_BYTES,
            version,
            *other_versions,
        )
        answer = await self._run(
            "an idempotency record", deadline, lambda: self._claim(keys=keys, args=args)
        )
        claim = Claim(answer[0].decode())
        if claim is Claim.RUN:
            return Claimed(claim, token)
        if claim is Claim.MISMATCH:
            recorded = answer[1] if len(answer) > 1 else None
            if isinstance(recorded, bytes):  # the version alone differs: the record's
                return Claimed(claim, version=recorded.decode("utf-8", "replace"))
            return Claimed(claim)
        outcome = answer[1] if len(answer) > 1 else None
        if isinstance(outcome, int):  # its size: over the bound, not sent (another writer's)
            outcome = encode_too_large(outcome, MAX_VALUE_BYTES)
        return Claimed(claim, outcome=outcome)

    async def complete(
        self, key: str, token: str, outcome: bytes, retention: float, deadline: float
    ) -> None:
        if len(outcome) > MAX_VALUE_BYTES:
            outcome = encode_too_large(len(outcome), MAX_VALUE_BYTES)
        await self._end_claim(key, token, outcome, retention, deadline)

    async def release(self, key: str, token: str, deadline: float) -> None:
        await self._end_claim(key, token, b"", 0.0, deadline)

    async def _end_claim(
        self, key: str, token: str, outcome: bytes, retention: float, deadline: float
    ) -> None:
        keys = (self._key("idem", key),)
        args = (token, outcome, max(1, int(retention * 1000)), self.channel, key)
        await self._run("an idempotency record", deadline, lambda: self._end(keys=keys, args=args))

    async def changed(self, key: str, timeout: float) -> None:
        if timeout <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(key, None)

    # -- notifications ----------------------------------------------------------------------------

    def _notified(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        kind, _, key = data.decode(errors="replace").partition(" ")
        if kind == "breaker":
            self._breakers.pushed(key)
        elif kind in ("idem", "job"):
            for waiter in self._waiters.get(key if kind == "idem" else f"job:{key}", ()):
                if not waiter.done():
                    waiter.set_result(None)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self.where,
            "on_unavailable": self.config.on_unavailable,
            "operations": self._redis.operations,
            "failures": self._redis.failures,
            "skipped": self._redis.skipped,
            "late_reads": self._redis.late_reads,
            "fallbacks": self._redis.fallbacks,
            "dropped_entries": self.dropped_entries,
            "breakers_watched": self._breakers.watched,
            "available": self._redis.available,
        }

    def __repr__(self) -> str:
        return (
            f"<RedisState {self.where} {self.config.on_unavailable}"
            f" operations={self._redis.operations} failures={self._redis.failures}"
            f" fallbacks={self._redis.fallbacks}>"
        )
