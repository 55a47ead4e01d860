"""Circuit breakers: stop calling a target that keeps failing, probe it now and then.

pybreaker's ``CircuitBreaker`` cannot guard coroutines on asyncio (its async path needs
Tornado; ``calling()`` lets every concurrent caller through in half-open, counts
cancellation as failure and replaces the tripping error). So the decisions are made here,
by a small state machine free of I/O whose transitions are in one table, tested
synchronously; the state itself (state name, failure counter, ``opened_at``) lives in a
pybreaker ``CircuitBreakerStorage``, so the same breaker can later be shared by several
dispatcher replicas through pybreaker's Redis storage without changing this code.

    closed ──fail_max health failures in a row──► open
    open ──reset_timeout elapsed, next call──► half-open (that call is a probe)
    half-open ──success_threshold probes succeed──► closed
    half-open ──a probe fails──► open

Only failures that say something about the target's health count: it could not be
reached, timed out, failed as a service or throttled. A plugin's business error or
invalid params mean the target answered, so they count as a success; a cancelled call
counts as nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from linchkit_plugin.errors import (
    CircuitOpen,
    DeadlineExceeded,
    DispatchError,
    ProviderError,
    RateLimited,
    TargetUnavailable,
)
from providers.invocation import Invocation, Outcome

__all__ = [
    "BreakerState",
    "BreakerStep",
    "CircuitBreaker",
    "NamedBreaker",
    "StateListener",
    "guard_batch",
    "is_health_failure",
]

log = logging.getLogger("dispatcher.breaker")

Clock = Callable[[], float]


class NamedBreaker(Protocol):
    """What a state listener is told a transition of: a ``CircuitBreaker``, or with
    ``state: redis`` a ``SharedBreaker`` (its transitions as this replica learns them).
    ``name`` is the target instance's description."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> BreakerState: ...


StateListener = Callable[[NamedBreaker, "BreakerState", "BreakerState"], None]

_HEALTH_FAILURES = (TargetUnavailable, DeadlineExceeded, RateLimited, ProviderError)


def is_health_failure(error: BaseException) -> bool:
    """True for errors that say the target is unwell, not that the call was wrong."""
    return isinstance(error, _HEALTH_FAILURES)


class BreakerState(StrEnum):
    """pybreaker's state names, so its storages read and write ours."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


# The state names as the storage holds them, compared as plain strings on the hot path:
# building the enum (``BreakerState(name)``) on every call cost ~1 µs of the breaker's
# ~2.4 µs per call (bench_policies ablation); the storage stays the one source of truth.
_CLOSED = BreakerState.CLOSED.value
_OPEN = BreakerState.OPEN.value
_HALF_OPEN = BreakerState.HALF_OPEN.value


class CircuitBreaker:
    """The breaker of one target instance. Synchronous and free of I/O."""

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout: float,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        clock: Clock,
        listeners: Sequence[StateListener] = (),
    ) -> None:
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        # Imported here: pybreaker pulls in redis (and its crypto) when that is installed,
        # which a host that configures no breaker should not pay for at import.
        from pybreaker import CircuitMemoryStorage

        self._clock = clock
        self._storage = CircuitMemoryStorage(BreakerState.CLOSED.value)
        self._probes_in_flight = 0
        self._opened_at: float | None = None
        self.listeners: list[StateListener] = list(listeners)

    def configure(
        self,
        *,
        fail_max: int,
        reset_timeout: float,
        half_open_max_calls: int,
        success_threshold: int,
    ) -> None:
        """New settings (a reload changed them), read from the next call on; where the
        breaker stands (closed with its failures, open since when) stays."""
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold

    @property
    def state(self) -> BreakerState:
        return BreakerState(self._storage.state)

    @property
    def failures(self) -> int:
        return self._storage.counter

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - self._clock())

    def admit(self) -> bool:
        """Let a call through or raise ``CircuitOpen``. True when the call is a probe."""
        state = self._storage.state
        if state == _CLOSED:
            return False
        if state == _OPEN:
            wait = self.retry_after()
            if wait > 0:
                raise CircuitOpen(f"circuit of {self.name} is open", retry_after=wait)
            self._move(BreakerState.HALF_OPEN)
        if self._probes_in_flight >= self.half_open_max_calls:
            raise CircuitOpen(
                f"circuit of {self.name} is half-open and its probe is in flight",
                retry_after=min(self.reset_timeout, 1.0),
            )
        self._probes_in_flight += 1
        return True

    def record_success(self, probe: bool) -> None:
        self._storage.reset_counter()
        if probe:
            self._probes_in_flight -= 1
            if self._storage.state == _HALF_OPEN:
                self._storage.increment_success_counter()
                if self._storage.success_counter >= self.success_threshold:
                    self._move(BreakerState.CLOSED)

    def record_failure(self, probe: bool) -> None:
        self._storage.increment_counter()
        if probe:
            self._probes_in_flight -= 1
        state = self._storage.state
        if (state == _HALF_OPEN and probe) or (
            state == _CLOSED and self._storage.counter >= self.fail_max
        ):
            self._move(BreakerState.OPEN)

    def record_nothing(self, probe: bool) -> None:
        """The call ended without telling anything (cancelled): free its probe slot."""
        if probe:
            self._probes_in_flight -= 1

    def _move(self, new: BreakerState) -> None:
        old = self.state
        if new is BreakerState.OPEN:
            # Kept exactly here; the storage's datetime (microseconds) is for other replicas.
            self._opened_at = self._clock()
            self._storage.opened_at = datetime.fromtimestamp(self._opened_at, UTC)
        if new is BreakerState.CLOSED:
            self._storage.reset_counter()
        self._storage.reset_success_counter()
        self._storage.state = new.value
        log.info("circuit of %s: %s -> %s", self.name, old, new)
        for listener in self.listeners:
            listener(self, old, new)

    def __repr__(self) -> str:
        extra = f", retry_after={self.retry_after():.3f}" if self.state is BreakerState.OPEN else ""
        return (
            f"<CircuitBreaker {self.name} {self.state} failures={self.failures}/{self.fail_max}"
            f" probes={self._probes_in_flight}{extra}>"
        )


class BreakerStep:
    """Guards a target's invocations (single or batch) with its breaker."""

    __slots__ = ("breaker", "next")

    def __init__(
        self, breaker: CircuitBreaker, next_step: Callable[[Invocation], Awaitable[Any]]
    ) -> None:
        self.breaker = breaker
        self.next = next_step

    async def __call__(self, invocation: Invocation) -> Any:
        breaker = self.breaker
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


async def guard_batch(
    breaker: CircuitBreaker, send: Callable[[], Awaitable[list[Outcome[Any]]]]
) -> list[Outcome[Any]]:
    """Run one batch invocation under ``breaker``: it counts as one call of the target.

    A batch fails the target's health when it fails as a whole, or when every item
    failed with a health failure (a provider without a native batch form fans out).
    """
    probe = breaker.admit()
    try:
        outcomes = await send()
    except DispatchError as error:
        (breaker.record_failure if is_health_failure(error) else breaker.record_success)(probe)
        raise
    except BaseException:
        breaker.record_nothing(probe)
        raise
    if outcomes and all(o.error is not None and is_health_failure(o.error) for o in outcomes):
        breaker.record_failure(probe)
    else:
        breaker.record_success(probe)
    return outcomes
