"""The state backend's connection to Redis: the pool, every operation's bounds, and the
connection that receives pushed notifications (``RedisConnection``).

The only module that imports redis-py (``redis.asyncio``). One connection pool per
dispatcher (blocking: a call waits for a free connection within its bound rather than
failing), plus one connection for pushed notifications.

Bounds: every operation runs under ``min(op_timeout, time left in the call)``, redis-py's
one retry (a pooled connection to a Redis that restarted) included. An operation that fails (timeout,
connection refused or reset, any Redis error) raises ``StateUnavailable`` and makes the
backend skip Redis for ``retry_after`` (the next calls fall back or fail at once instead
of each spending the timeout), then try again. Fallbacks are logged at most every
``LOG_EVERY_SECONDS``; the first operation that succeeds after an outage that caused
some says so (``answers again``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.config import StateConfig
from dispatcher.state.errors import StateUnavailable
from linchkit_plugin.errors import DeadlineExceeded

__all__ = ["CLOSE_SECONDS", "LOG_EVERY_SECONDS", "LateRead", "RedisConnection", "Run"]

log = logging.getLogger("dispatcher.state")

T = TypeVar("T")

#: A warning about Redis at most this often; every fallback is counted in ``stats()``.
LOG_EVERY_SECONDS = 10.0
#: The longest ``aclose`` waits for each connection it closes (a Redis that stopped
#: answering must not hold a host's shutdown up).
CLOSE_SECONDS = 2.0


class LateRead(StateUnavailable):
    """A blocking read (a worker's wait for new jobs) that did not come back in time: most
    of its time is Redis waiting as asked, so it says nothing of Redis; nothing was read."""


class Run(Protocol):
    """The backend's bounded operation (``RedisConnection.run``)."""

    def __call__(
        self,
        what: str,
        deadline: float,
        operation: Callable[[], Awaitable[Any]],
        *,
        blocking: bool = False,
    ) -> Awaitable[Any]: ...


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}" if credentials or at else url


class RedisConnection:
    """The pool and client every operation of the backend uses, under its bounds; the
    outage they tell of (skip Redis for ``retry_after``, log fallbacks sparingly); and
    the notifications connection (``listen``)."""

    def __init__(self, config: StateConfig, clock: Callable[[], float]) -> None:
        assert config.url is not None
        self._url = config.url
        self.op_timeout = config.op_timeout_ms / 1000
        self.retry_after = config.retry_after_ms / 1000
        self.where = _redact(config.url)
        self._clock = clock
        self._pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.pool_size,
            timeout=self.op_timeout,
            socket_timeout=self.op_timeout,
            socket_connect_timeout=self.op_timeout,
            # One immediate retry: a pooled connection to a Redis that restarted fails
            # once and reconnects. asyncio.timeout in ``run`` bounds both attempts.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            health_check_interval=0,
        )
        self.client = aioredis.Redis(connection_pool=self._pool)
        self._down_until = -math.inf
        self._logged_at = -math.inf
        #: When the operations began to fail (None while they succeed), and how many
        #: fallbacks this outage caused: the end of one that caused some is logged.
        self._failing_since: float | None = None
        self._outage_fallbacks = 0
        self.operations = 0
        self.failures = 0  # operations that failed or timed out
        self.skipped = 0  # operations not tried: Redis failed less than retry_after ago
        self.late_reads = 0  # blocking reads (a worker's wait for jobs) that came back late
        self.fallbacks = 0  # steps that used local state instead (fail_open)

    @property
    def available(self) -> bool:
        """Not skipping Redis after a failure."""
        return self._clock() >= self._down_until

    async def run(
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
        """A step used this replica's own state instead (fail_open): counted, logged at
        most every ``LOG_EVERY_SECONDS``."""
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

    async def listen(
        self,
        channel: str,
        *,
        connected: Callable[[], None],
        disconnected: Callable[[], None],
        notified: Callable[[object], None],
    ) -> None:
        """Receive what is published on ``channel``, each message's data to ``notified``;
        reconnect with backoff, for as long as the task running this is not cancelled.
        ``connected`` once subscribed, ``disconnected`` once the subscription is lost:
        whatever was pushed in between was missed."""
        backoff = 0.05
        while True:
            # Its own connection without a read timeout: it waits for pushes indefinitely.
            client = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=self.op_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                connected()
                backoff = 0.05
                async for message in pubsub.listen():
                    notified(message.get("data"))
            except (RedisError, OSError) as error:
                log.debug("state notifications from %s lost: %s", self.where, error)
            finally:
                disconnected()
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

    async def aclose(self) -> None:
        """Close the client and its pool, waiting at most ``CLOSE_SECONDS``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.client.aclose()
                await self._pool.aclose()
