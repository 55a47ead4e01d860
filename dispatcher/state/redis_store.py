"""The Redis backend: state shared by every replica naming the same Redis and key prefix.

The only module that imports redis-py (``redis.asyncio``). One connection pool per
dispatcher (blocking: a call waits for a free connection within its bound rather than
failing), plus one connection for pushed notifications. Each shared operation is one Lua
script (``_scripts``), loaded once and run with EVALSHA (``register_script``).

Bounds: every operation runs under ``min(op_timeout, time left in the call)``, redis-py's
one retry (a pooled connection to a Redis that restarted) included. An operation that fails (timeout,
connection refused or reset, any Redis error) raises ``StateUnavailable`` and makes the
backend skip Redis for ``retry_after`` (the next calls fall back or fail at once instead
of each spending the timeout), then try again. Fallbacks are logged at most every
``LOG_EVERY_SECONDS``; the first operation that succeeds after an outage that caused
some says so (``answers again``).

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
import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.config import StateConfig
from dispatcher.state import _scripts
from dispatcher.state._redis_replies import reply_text
from dispatcher.state.base import (
    Admission,
    BreakerPolicyArgs,
    BreakerView,
    Claim,
    Claimed,
    IdempotencyStore,
    JobRecords,
    JobStore,
    SharedStore,
    StateBackend,
    StateUnavailable,
    encode_too_large,
)
from dispatcher.state.memory import MemoryIdempotency
from dispatcher.state.redis_job_records import RedisJobRecords
from dispatcher.state.redis_jobs import LateRead, RedisJobs
from linchkit_plugin.errors import DeadlineExceeded, DispatchError
from providers._log_lines import sparingly

__all__ = ["RedisState"]

log = logging.getLogger("dispatcher.state")

T = TypeVar("T")

#: How long a breaker hash lives without being touched: long past any reset timeout.
BREAKER_TTL_MS = 86_400_000
#: A warning about Redis at most this often; every fallback is counted in ``stats()``.
LOG_EVERY_SECONDS = 10.0
#: The largest cached result or recorded outcome kept in Redis, as JSON (the default of
#: ``jobs.max_result_bytes``), and the largest read: read whole, a value that outlasted
#: ``op_timeout_ms`` failed every read of it, each making the replica skip Redis for
#: ``retry_after_ms``. A larger result is served and not cached; a larger outcome is
#: recorded as its size only (``encode_too_large``).
MAX_VALUE_BYTES = 16 * 1024 * 1024
#: The longest ``aclose`` waits for each connection it closes (a Redis that stopped
#: answering must not hold a host's shutdown up).
CLOSE_SECONDS = 2.0


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}" if credentials or at else url


class RedisState(StateBackend, SharedStore, IdempotencyStore):
    shared = True

    def __init__(self, config: StateConfig, clock: Callable[[], float]) -> None:
        assert config.url is not None
        self.config = config
        self.fail_open = config.on_unavailable == "fail_open"
        self.op_timeout = config.op_timeout_ms / 1000
        self.retry_after = config.retry_after_ms / 1000
        self.sync = config.breaker_sync_ms / 1000
        self.where = _redact(config.url)
        self._clock = clock
        prefix = config.key_prefix
        self._prefix = prefix
        self.channel = f"{prefix}:events"
        self._local_idempotency = MemoryIdempotency(clock)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.pool_size,
            timeout=self.op_timeout,
            socket_timeout=self.op_timeout,
            socket_connect_timeout=self.op_timeout,
            # One immediate retry: a pooled connection to a Redis that restarted fails
            # once and reconnects. asyncio.timeout in ``_run`` bounds both attempts.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            health_check_interval=0,
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._limit = self._client.register_script(_scripts.LIMIT)
        self._breaker = self._client.register_script(_scripts.BREAKER)
        self._cache_get = self._client.register_script(_scripts.CACHE_GET)
        self._cache_set = self._client.register_script(_scripts.CACHE_SET)
        self._claim = self._client.register_script(_scripts.IDEMPOTENCY_CLAIM)
        self._end = self._client.register_script(_scripts.IDEMPOTENCY_END)
        self._views: dict[str, tuple[BreakerView, float]] = {}
        #: When a transition of each breaker was last pushed (``_may_keep``).
        self._pushed_at: dict[str, float] = {}
        #: ``breaker_watch``: who is told where each breaker stands, by key.
        self._watchers: dict[str, Callable[[str, int, int], None]] = {}
        self._subscribed = False  # notifications connected: a push will reach us
        self._jobs = RedisJobs(
            self._client, self._run, prefix, self.channel, self.op_timeout, clock, self.changed
        )
        self._job_records = RedisJobRecords(self._jobs, self._client, self.channel)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._down_until = -math.inf
        self._logged_at = -math.inf
        #: When the operations began to fail (None while they succeed), and how many
        #: fallbacks this outage caused: the end of one that caused some is logged.
        self._failing_since: float | None = None
        self._outage_fallbacks = 0
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.operations = 0
        self.failures = 0  # operations that failed or timed out
        self.skipped = 0  # operations not tried: Redis failed less than retry_after ago
        self.late_reads = 0  # blocking reads (a worker's wait for jobs) that came back late
        self.fallbacks = 0  # steps that used local state instead (fail_open)
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
            self._listen(), name=f"state notifications from {self.where}"
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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self._client.aclose()
                await self._pool.aclose()

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

    # -- bounded operations --------------------------------------------------------------

    async def _run(
        self,
        what: str,
        deadline: float,
        operation: Callable[[], Awaitable[T]],
        *,
        blocking: bool = False,
    ) -> T:
        """``operation`` within ``min(op_timeout, time left)``; a failure makes every
        operation skip Redis for ``retry_after``, except the timeout of a ``blocking`` read
        (a worker's wait for new jobs): most of its time is Redis waiting as asked, so
        running late on a busy machine says nothing of Redis, and with the 200 ms default
        it made every call on the replica fail for a second, about once a second, at load
        2 on two cores."""
        now = self._clock()
        if now < self._down_until:
            self.skipped += 1
            raise self._unavailable(what, "it failed less than a moment ago")
        left = deadline - now
        if left <= 0:
            raise DeadlineExceeded(f"no time left for {what}")
        budget = left if left < self.op_timeout else self.op_timeout
        self.operations += 1
        try:
            async with asyncio.timeout(budget):
                result = await operation()
        except TimeoutError:
            if budget < self.op_timeout:  # the call's deadline, not Redis being slow
                raise DeadlineExceeded(f"{what} did not finish before the deadline") from None
            reason = f"no answer within {self.op_timeout * 1000:.0f} ms"
            if blocking:
                raise self._late(what, reason) from None
        except ResponseError as error:
            if type(error) is ResponseError:
                # Redis answered: a key of the wrong type, a value a script cannot use. Not
                # Redis being down, so other callers are not refused for the next moment.
                raise StateUnavailable(
                    f"state store {self.where} refused {what}: {error}",
                    details={"stage": "state"},
                ) from None
            reason = f"{type(error).__name__}: {error}"  # read-only, out of memory, …
        except RedisTimeoutError as error:  # redis-py's own bound (socket_timeout)
            reason = f"{type(error).__name__}: {error}"
            if blocking:
                raise self._late(what, reason) from None
        except (RedisError, OSError) as error:
            reason = f"{type(error).__name__}: {error}"
        else:
            if self._failing_since is not None:
                self._answers_again()
            return result
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = now
            self._outage_fallbacks = 0
        self._down_until = self._clock() + self.retry_after
        # Idle pooled connections to a Redis that went away would each fail once when it
        # is back: drop them now, so the first operations after it returns succeed.
        with contextlib.suppress(Exception):
            await self._pool.disconnect(inuse_connections=False)
        raise self._unavailable(what, reason)

    def _answers_again(self) -> None:
        """An operation succeeded after some failed: the outage is over. Said in the log
        when the fallbacks of this outage were (fail_open), at their level."""
        began, self._failing_since = self._failing_since, None
        fallbacks, self._outage_fallbacks = self._outage_fallbacks, 0
        if fallbacks and began is not None:
            log.warning(
                "state store %s answers again after %.1f s; %d fallbacks to this replica's"
                " own state meanwhile",
                self.where,
                self._clock() - began,
                fallbacks,
            )

    def _late(self, what: str, reason: str) -> LateRead:
        """A blocking read that ran out of time: counted, not held against Redis."""
        self.late_reads += 1
        return LateRead(
            f"state store {self.where}: {what} came back late ({reason})",
            details={"stage": "state"},
        )

    def _unavailable(self, what: str, reason: str) -> StateUnavailable:
        return StateUnavailable(
            f"state store {self.where} unavailable for {what}: {reason}",
            retry_after=max(0.0, self._down_until - self._clock()) or None,
            details={"stage": "state"},
        )

    def fell_back(self, what: str, error: StateUnavailable) -> None:
        self.fallbacks += 1
        self._outage_fallbacks += 1
        now = self._clock()
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            self._logged_at = now
            log.warning(
                "%s; using this replica's own state (fail_open; %d fallbacks so far)",
                error.message,
                self.fallbacks,
            )

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
        return await self._breaker_op(key, policy, "admit", False, deadline)

    async def breaker_record(
        self, key: str, policy: BreakerPolicyArgs, outcome: str, probe: bool, deadline: float
    ) -> BreakerView:
        return await self._breaker_op(key, policy, outcome, probe, deadline)

    async def _breaker_op(
        self, key: str, policy: BreakerPolicyArgs, op: str, probe: bool, deadline: float
    ) -> BreakerView:
        args = (
            op,
            policy.fail_max,
            int(policy.reset_timeout * 1_000_000),
            policy.half_open_max_calls,
            policy.success_threshold,
            "1" if probe else "0",
            self.channel,
            key,
            BREAKER_TTL_MS,
        )
        keys = (self._key("breaker", key),)
        sent = self._clock()
        state, failures, admitted, is_probe, wait_us, generation = await self._run(
            "a circuit breaker", deadline, lambda: self._breaker(keys=keys, args=args)
        )
        view = BreakerView(
            state.decode() if isinstance(state, bytes) else str(state),
            int(failures),
            bool(admitted),
            bool(is_probe),
            int(wait_us) / 1_000_000,
            int(generation),
        )
        if self._may_keep(key, view, sent):
            self._views[key] = (view, sent)
        seen = self._watchers.get(key)
        if seen is not None:
            seen(view.state, view.failures, view.generation)
        return view

    def _may_keep(self, key: str, view: BreakerView, sent: float) -> bool:
        """Whether the answer ``view``, to an operation sent at ``sent``, may stand for the
        breaker until ``sync`` has passed (``SharedBreaker.admit`` admits on it without
        asking). Not when it arrived after a newer one (a lower generation), nor when a
        transition was pushed after it was sent: answered late, it would show the breaker
        closed after it opened, and calls would be admitted for up to ``sync``."""
        held = self._views.get(key)
        if held is not None and held[0].generation > view.generation:
            return False
        return sent > self._pushed_at.get(key, -math.inf)

    def breaker_view(self, key: str) -> tuple[BreakerView, float] | None:
        """The last answer kept for ``key``, and when the operation it answered was sent."""
        return self._views.get(key)

    def breaker_watch(self, key: str, seen: Callable[[str, int, int], None]) -> None:
        self._watchers[key] = seen
        if self._subscribed:  # else: read with the others once notifications connect
            self.spawn(self._read_breakers([key]), "circuit breaker read")

    async def _read_breakers(self, keys: list[str]) -> None:
        """Where the breakers ``keys`` stand, told to their watchers: one round trip. A
        read that fails is only counted (``failures``): nothing waits for it, and the next
        push, reconnection or operation tells the watcher again."""

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self._key("breaker", key), "state", "failures", "generation")
                # One key of another type (WRONGTYPE) must not keep the others unread.
                answers: list[Any] = await pipe.execute(raise_on_error=False)
                return answers

        try:
            answers = await self._run(
                "circuit breaker reads", self._clock() + self.op_timeout, read
            )
        except DispatchError as error:
            log.debug("circuit breakers not read from %s: %s", self.where, error)
            return
        for key, answer in zip(keys, answers, strict=True):
            seen = self._watchers.get(key)
            if seen is None or isinstance(answer, Exception):
                continue  # unreadable: its operations say so (refused, as for a garbled one)
            state, failures, generation = answer
            try:
                count = int(failures or 0)
            except ValueError:  # garbled by another writer: the state still tells
                count = 0
            try:
                # None: no hash yet, or one stored before breakers had generations.
                number = int(generation or 0)
            except ValueError:
                number = 0
            seen(state.decode(errors="replace") if state else "closed", count, number)

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

    async def _listen(self) -> None:
        """Receive transitions and ends of idempotent calls; reconnect with backoff."""
        backoff = 0.05
        while True:
            # Its own connection without a read timeout: it waits for pushes indefinitely.
            client = aioredis.Redis.from_url(
                self.config.url or "",
                socket_connect_timeout=self.op_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._views.clear()  # anything pushed while unsubscribed was missed
                self._subscribed = True
                if self._watchers:  # and what the watchers were told of it: read anew
                    self.spawn(self._read_breakers(list(self._watchers)), "circuit breaker reads")
                backoff = 0.05
                async for message in pubsub.listen():
                    self._notified(message.get("data"))
            except (RedisError, OSError) as error:
                log.debug("state notifications from %s lost: %s", self.where, error)
            finally:
                self._subscribed = False
                self._views.clear()
                # Bounded: this runs on cancellation too, when nothing would cancel it again.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_SECONDS):
                        # redis-py types PubSub.aclose from 8.2 on; earlier releases do not.
                        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_SECONDS):
                        await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _notified(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        kind, _, key = data.decode(errors="replace").partition(" ")
        if kind == "breaker":
            # Every breaker of this replica watches its key from the start (SharedBreaker):
            # another key is none of ours, and remembering it would let whoever publishes
            # on the channel grow this replica's memory one name at a time.
            if key not in self._watchers:
                return
            self._views.pop(key, None)
            self._pushed_at[key] = self._clock()
            # A transition: where it stands now, for the watcher.
            self.spawn(self._read_breakers([key]), "circuit breaker read")
        elif kind in ("idem", "job"):
            for waiter in self._waiters.get(key if kind == "idem" else f"job:{key}", ()):
                if not waiter.done():
                    waiter.set_result(None)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self.where,
            "on_unavailable": self.config.on_unavailable,
            "operations": self.operations,
            "failures": self.failures,
            "skipped": self.skipped,
            "late_reads": self.late_reads,
            "fallbacks": self.fallbacks,
            "dropped_entries": self.dropped_entries,
            "available": self._clock() >= self._down_until,
        }

    def __repr__(self) -> str:
        return (
            f"<RedisState {self.where} {self.config.on_unavailable} operations={self.operations}"
            f" failures={self.failures} fallbacks={self.fallbacks}>"
        )
