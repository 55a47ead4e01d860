"""What shared rate limits, breakers and caches need of a store (``SharedStore``), and
the answers it gives: every operation one atomic step on the server (``redis_store``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Admission", "BreakerPolicyArgs", "BreakerView", "SharedStore"]


# -- rate limits ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """A shared limit's answer: admitted (after sleeping ``wait`` seconds, a slot reserved
    for this call) or refused (room again in ``wait`` seconds)."""

    admitted: bool
    wait: float


# -- breakers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerPolicyArgs:
    """A breaker's settings as the store needs them."""

    fail_max: int
    reset_timeout: float
    half_open_max_calls: int
    success_threshold: int


@dataclass(frozen=True, slots=True)
class BreakerView:
    """A shared breaker as one operation left it. ``generation`` grows with every
    transition of the shared state: of two views, the one with the lower generation is
    older, whichever arrived last (0: a breaker stored without one, or never stored)."""

    state: str  # "closed", "open", "half-open" (BreakerState's values)
    failures: int
    admitted: bool = True
    probe: bool = False
    retry_after: float = 0.0
    generation: int = 0


# -- the store ---------------------------------------------------------------------------


class SharedStore(ABC):
    """What shared limits, breakers and caches need; every method one atomic operation,
    bounded by ``deadline`` (the loop's clock) and the backend's own operation timeout,
    raising ``StateUnavailable`` when it cannot answer in time."""

    @abstractmethod
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
        """One call against the limit ``key``: ``rate``/s, ``burst`` at once. With
        ``max_wait`` > 0 a call may reserve a slot up to that far ahead. ``longest_wait``:
        the longest any call of this limit may be granted (0 when none waits), so how far
        ahead its state may legitimately be; anything further is read as that far."""

    @abstractmethod
    async def breaker_admit(
        self, key: str, policy: BreakerPolicyArgs, deadline: float
    ) -> BreakerView: ...

    @abstractmethod
    async def breaker_record(
        self, key: str, policy: BreakerPolicyArgs, outcome: str, probe: bool, deadline: float
    ) -> BreakerView:
        """``outcome``: ``success``, ``failure`` or ``nothing`` (only frees a probe slot)."""

    @abstractmethod
    def breaker_view(self, key: str) -> tuple[BreakerView, float] | None:
        """The last view of ``key`` this replica saw and when (the loop's clock), unless a
        transition pushed by another replica made it stale."""

    @abstractmethod
    def breaker_watch(self, key: str, seen: Callable[[str, int, int], None]) -> None:
        """Call ``seen(state, failures, generation)`` whenever this replica learns where
        the breaker ``key`` stands: from the answer of one of its operations, and from a
        read of it made when another replica's transition is pushed, when notifications
        (re)connect (what was pushed meanwhile is lost) and when the watch begins. These
        answers may be told in another order than the store gave them (several are in
        flight at once): ``generation`` (``BreakerView``'s) says which is newer. For what
        this replica shows of the breaker (metrics, logs), never for admitting calls."""

    @abstractmethod
    def breaker_unwatch(self, key: str) -> None:
        """Stop watching the breaker ``key`` and forget what was kept of it: no call goes
        through it any more (a fleet instance that left, a target a reload moved off)."""

    @abstractmethod
    async def cache_get(self, name: str, key: str, deadline: float) -> tuple[bytes | None, int]:
        """The cached value of ``key`` in the cache ``name`` and the cache's generation."""

    @abstractmethod
    async def cache_set(
        self, name: str, key: str, value: bytes, ttl: float, generation: int, deadline: float
    ) -> None:
        """Store unless the cache was invalidated since ``generation`` was read."""

    @abstractmethod
    async def cache_invalidate(self, names: list[str], deadline: float) -> None:
        """Drop every entry of the caches ``names``, for every replica at once."""

    @abstractmethod
    def spawn(self, work: Awaitable[Any], what: str) -> None:
        """Run ``work`` (one bounded operation) without a caller waiting for it; the
        backend owns the task and waits for it when it closes."""
