"""``TargetPolicies``: what every method calling one target shares, kept by the target.

A target's breaker (one per fleet instance), its shared breaker with ``state: redis``, its
retry budget, its bulkhead and its limits (``scope: target``) are made by the first method
whose chain needs them and shared by every other, of any plugin version: two methods on one
target share a breaker and a budget, and a reload that keeps a target keeps their state.

Settings: the first method to configure one decides them, at start as within a reload's
build (``building``): a reload that changes them sets them in place, state and all. A
target limit is keyed by its spec too: one a reload changed is another limit.

Lifetime: ``forget`` drops what no route holds any more and no fleet member is keyed by
(a reload's end; a fleet instance detached), so neither reloads moving plugins from URL to
URL nor discovery's churn of addresses grow the process, ``stats()`` or ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dispatcher.config import BreakerPolicy, ConcurrencyPolicy, RateLimit
from dispatcher.fleet.breaker import CircuitBreaker, StateListener
from dispatcher.fleet.shared_breaker import SharedBreaker
from dispatcher.policies.concurrency import Bulkhead
from dispatcher.policies.gate import Gate
from dispatcher.policies.ratelimit import Bucket, Limit, new_limiter
from dispatcher.policies.retry import RetryBudget
from dispatcher.policies.shared import SharedLimit
from dispatcher.state import StateBackend

if TYPE_CHECKING:
    from providers.target import TargetConfig

__all__ = ["TargetPolicies"]


class TargetPolicies:
    """The breakers, budgets, bulkheads and limits of one dispatcher's targets, by key."""

    def __init__(
        self, clock: Callable[[], float], state: StateBackend, *, breaker_sync: float
    ) -> None:
        self.clock = clock
        self.state = state
        self.breaker_sync = breaker_sync
        self.breakers: dict[str, CircuitBreaker] = {}
        #: With a shared state backend: the breakers every replica shares, by instance key.
        self.shared_breakers: dict[str, SharedBreaker] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self.bulkheads: dict[str, Bulkhead] = {}
        self.limiters: dict[tuple[str, RateLimit], Bucket] = {}
        #: Target-scoped limits as the chains use them (shared ones too), for events.
        self.target_limits: dict[tuple[str, RateLimit], Limit | SharedLimit] = {}
        self.breaker_listeners: list[StateListener] = []
        #: Told the name of each breaker ``forget`` drops whose name no breaker kept
        #: shares (what telemetry counted by that name may go).
        self.breakers_forgotten: list[Callable[[str], None]] = []
        #: While a reload builds routes (``building``): the targets (by kind and key)
        #: whose breaker, bulkhead or retry budget one of its methods has configured.
        self._configured: set[tuple[str, str]] | None = None

    # -- made, or found and configured ---------------------------------------------------

    @contextmanager
    def building(self) -> Iterator[None]:
        """Around a reload's building of routes: the first of its methods to configure a
        target's breaker, bulkhead or retry budget gives them its settings, as the first of
        the manifest's did at start, and they stay the same objects, with their state
        (calls in flight, failures, tokens) and every method of the target sharing them.
        Before, a reload that changed those settings left them as they were, unsaid."""
        self._configured = set()
        try:
            yield
        finally:
            self._configured = None

    def _configures(self, kind: str, key: str) -> bool:
        """Whether this method, in a reload's build, is the first to configure ``kind`` of
        target ``key`` (outside a build, or after the first: it takes them as they are)."""
        configured = self._configured
        if configured is None or (kind, key) in configured:
            return False
        configured.add((kind, key))
        return True

    def breaker(self, key: str, target: TargetConfig, policy: BreakerPolicy) -> CircuitBreaker:
        """The breaker of target instance ``key``, which every method calling it shares."""
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = self.breakers[key] = CircuitBreaker(
                target.describe(),
                fail_max=policy.fail_max,
                reset_timeout=policy.reset_timeout_ms / 1000,
                half_open_max_calls=policy.half_open_max_calls,
                success_threshold=policy.success_threshold,
                clock=self.clock,
                listeners=self.breaker_listeners,
            )
        elif self._configures("breaker", key):
            breaker.configure(
                fail_max=policy.fail_max,
                reset_timeout=policy.reset_timeout_ms / 1000,
                half_open_max_calls=policy.half_open_max_calls,
                success_threshold=policy.success_threshold,
            )
        return breaker

    def shared_breaker(
        self, local: CircuitBreaker, key: str, policy: BreakerPolicy
    ) -> SharedBreaker:
        """The breaker every replica shares for target instance ``key`` (``local``: its
        own, which decides when the store cannot answer)."""
        shared = self.shared_breakers.get(key)
        if shared is None:
            shared = self.shared_breakers[key] = SharedBreaker(
                local, key, policy, self.state, self.breaker_sync, self.clock
            )
        elif self._configures("shared breaker", key):
            shared.configure(policy)
        return shared

    def budget(self, key: str, name: str, ratio: float) -> RetryBudget:
        """The retry budget of target ``key``, which its retries and hedges share."""
        budget = self.budgets.get(key)
        if budget is None:
            budget = self.budgets[key] = RetryBudget(name, ratio)
        elif self._configures("retry budget", key):
            budget.configure(ratio)
        return budget

    def bulkhead(self, key: str, target: TargetConfig, spec: ConcurrencyPolicy) -> Bulkhead:
        """The bulkhead of target ``key`` (``scope: target``)."""
        bulkhead = self.bulkheads.get(key)
        if bulkhead is None:
            bulkhead = self.bulkheads[key] = Bulkhead(
                target.describe(), spec.max_in_flight, spec.max_waiting
            )
        elif self._configures("bulkhead", key):
            bulkhead.resize(spec.max_in_flight, spec.max_waiting)
        return bulkhead

    def limit(self, key: str, target: TargetConfig, spec: RateLimit) -> Limit | SharedLimit:
        """The limit ``spec`` of target ``key`` (``scope: target``)."""
        existing = self.target_limits.get((key, spec))
        if existing is not None:
            return existing
        bucket = self.limiters.get((key, spec))
        if bucket is None:
            bucket = self.limiters[(key, spec)] = new_limiter(spec)
        local = Limit(target.describe(), spec, bucket)
        chosen: Limit | SharedLimit = (
            SharedLimit(local, key, self.state) if self.state.shared else local
        )
        self.target_limits[(key, spec)] = chosen
        return chosen

    # -- let go -----------------------------------------------------------------------------

    def forget(self, instances: set[str], held: set[int]) -> None:
        """Drop what no route holds any more (``held``: the ``id`` of what the routes'
        chains hold): what targets a reload moved away from had, what policies it took off
        kept, a limit it changed (another limit: its spec is part of its key). Kept by
        target, not by plugin version, nothing else reached them: every reload that moved
        a plugin to another URL grew them and ``stats()`` for good, and host events to a
        target still passed a breaker or a limit its methods no longer had. A fleet
        instance's breaker is held by the instance, not by a route: it stays while its key
        is one of ``instances``. A chain still running holds what it uses; a target that
        comes back starts with a closed breaker and full budgets, as a new one."""

        def dead(key: str, kept: object) -> bool:
            return key not in instances and id(kept) not in held

        dropped = {breaker.name for key, breaker in self.breakers.items() if dead(key, breaker)}
        for key in [key for key, shared in self.shared_breakers.items() if dead(key, shared)]:
            self.shared_breakers.pop(key).close()
        tables: tuple[dict[str, Any], ...] = (self.breakers, self.budgets, self.bulkheads)
        for table in tables:
            for key in [key for key, kept in table.items() if dead(key, kept)]:
                del table[key]
        for each in [each for each, limit in self.target_limits.items() if id(limit) not in held]:
            del self.target_limits[each]
        for each in [each for each in self.limiters if each not in self.target_limits]:
            del self.limiters[each]
        if dropped and self.breakers_forgotten:
            dropped -= {breaker.name for breaker in self.breakers.values()}
            for name in dropped:
                for listener in self.breakers_forgotten:
                    listener(name)

    # -- read -------------------------------------------------------------------------------

    def event_gate(self, key: str) -> Gate:
        """What a host event to target ``key`` passes through: the policies scoped to it."""
        limits = tuple(
            limit for (limited, _), limit in self.target_limits.items() if limited == key
        )
        return Gate(
            limits, self.bulkheads.get(key), self.breakers.get(key), self.shared_breakers.get(key)
        )

    def circuit_state(self, key: str) -> str | None:
        """The state of target ``key``'s breaker as this replica shows it (``stats()``),
        or None when it has none."""
        shared = self.shared_breakers.get(key)
        if shared is not None:
            return shared.shown()[0]
        breaker = self.breakers.get(key)
        return None if breaker is None else str(breaker.state)

    def breaker_stats(self) -> dict[str, dict[str, Any]]:
        """Each breaker as this replica shows it, by name: with ``state: redis``, the shared
        state as it last learnt it, or its own breaker's while that one decides (the store
        did not answer: ``fail_open``). Metrics, ``dispatcher top`` and health read this."""
        shown: dict[str, dict[str, Any]] = {}
        for key, breaker in self.breakers.items():
            shared = self.shared_breakers.get(key)
            state, failures = (
                (str(breaker.state), breaker.failures) if shared is None else shared.shown()
            )
            shown[breaker.name] = {"state": state, "failures": failures}
        return shown

    def __repr__(self) -> str:
        return (
            f"<TargetPolicies breakers={len(self.breakers)} budgets={len(self.budgets)}"
            f" bulkheads={len(self.bulkheads)} limits={len(self.target_limits)}>"
        )
