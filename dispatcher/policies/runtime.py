"""``PolicyRuntime``: builds each method's chain, in the order the package's docstring
gives, and holds what the chains share.

Built once per dispatcher. It keeps the policy state of every method — caches, batchers,
limits and bulkheads of a method's own, retry and hedge steps, gates — and, in
``targets`` (``dispatcher.policies.by_target``), what every method calling one target
shares: breakers, retry budgets, bulkheads and limits per target. A reload that keeps a
version keeps its state; one that builds a method again drops what its last chain kept. It owns every task the policies start;
``aclose`` ends them. The seam types of the chain (``Step``, ``Invoke``,
``ProviderBoundary``) are defined here and re-exported by the package.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from dispatcher.config import BreakerPolicy, Policies, RateLimit, RetryPolicy
from dispatcher.fleet import Fleet, FleetRuntime, FleetStep, Instance
from dispatcher.fleet.breaker import (
    BreakerStep,
    CircuitBreaker,
    guard_batch,
)
from dispatcher.fleet.shared_breaker import SharedBreaker
from dispatcher.fleet.step import BreakerFor, SharedBreakerFor
from dispatcher.policies.batching import Batcher
from dispatcher.policies.by_target import TargetPolicies
from dispatcher.policies.cache import CacheStep, ResultCache
from dispatcher.policies.concurrency import Bulkhead, BulkheadStep
from dispatcher.policies.gate import Gate
from dispatcher.policies.hedge import HedgeStep
from dispatcher.policies.idempotency import IdempotencyStep, KeyedCalls, Refused
from dispatcher.policies.ratelimit import Limit, RateLimitStep
from dispatcher.policies.retry import RetryStep
from dispatcher.policies.shared import (
    SharedBreakerStep,
    SharedCacheStep,
    SharedLimit,
    guard_shared_batch,
)
from dispatcher.policies.timeout import DeadlineGuard
from dispatcher.state import MemoryState, StateBackend, digest
from providers.invocation import Invocation, Outcome

if TYPE_CHECKING:
    from dispatcher.config import PluginSpec
    from providers.base import Provider
    from providers.target import TargetConfig

__all__ = ["Invoke", "InvokeBatch", "PolicyRuntime", "ProviderBoundary", "Step"]


class Step(Protocol):
    """One link of a method's chain."""

    def __call__(self, invocation: Invocation, /) -> Awaitable[Any]: ...


Invoke = Callable[["TargetConfig", Invocation], Awaitable[Any]]
InvokeBatch = Callable[["TargetConfig", Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]


class ProviderBoundary(Protocol):
    """Wraps what every chain calls its provider with: once per provider, at start."""

    def invoke(self, invoke: Invoke, /) -> Invoke: ...

    def invoke_batch(self, invoke_batch: InvokeBatch, /) -> InvokeBatch: ...


class PolicyRuntime:
    """The policy state of one dispatcher."""

    def __init__(
        self,
        clock: Callable[[], float],
        fleets: FleetRuntime | None = None,
        state: StateBackend | None = None,
        *,
        breaker_sync: float = 0.1,
        idempotency_retention: float = 86_400.0,
        boundary: ProviderBoundary | None = None,
        refused: Refused | None = None,
    ) -> None:
        self.clock = clock
        self.boundary = boundary
        #: Where the idempotency steps count the calls they refuse (telemetry's).
        self.refused = refused
        self.state = state if state is not None else MemoryState(clock)
        self.breaker_sync = breaker_sync
        self.idempotency_retention = idempotency_retention
        self.fleets = fleets if fleets is not None else FleetRuntime(clock)
        #: What every method calling one target shares: breakers, budgets, bulkheads,
        #: limits (``dispatcher.policies.by_target``).
        self.targets = TargetPolicies(clock, self.state, breaker_sync=breaker_sync)
        # What one method of one plugin version owns, by ``(plugin key, method)`` (hedges
        # and retries by ``"plugin@version.method"``): dropped when a reload removes the
        # version or the method (``forget``), replaced when it rebuilds the method.
        self.caches: dict[tuple[str, str], ResultCache] = {}
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self.hedges: dict[str, HedgeStep] = {}
        self.gates: dict[tuple[str, str], Gate] = {}
        #: Told of each breaker's transitions; told the name of each breaker dropped.
        self.breaker_listeners = self.targets.breaker_listeners
        self.breakers_forgotten = self.targets.breakers_forgotten
        # Kept for stats() only: limits and bulkheads of a method's own scope are not shared.
        self.method_limits: dict[tuple[str, str], tuple[Limit | SharedLimit, ...]] = {}
        self.method_bulkheads: dict[tuple[str, str], Bulkhead] = {}
        self.retries: dict[str, RetryStep] = {}
        #: Keyed calls answered without running, by ``"plugin@version.method"``: kept
        #: across a rebuild of the method, as its breaker is.
        self.keyed: dict[str, KeyedCalls] = {}
        #: Batchers a rebuilt method replaced, with its plugin version (key): closed once
        #: its calls in flight have ended.
        self._replaced: list[tuple[str, Batcher]] = []

    def chain(
        self, plugin: PluginSpec[Any], method: str, provider: Provider[Any], target: TargetConfig
    ) -> Step:
        """The chain of ``plugin.method``, built from its policies."""
        policies = plugin.policies_of(method)
        name = f"{plugin.id}.{method}"
        owner = (plugin.key, method)
        self._let_go(owner)  # built again: what its last chain kept goes
        fleet = self.fleets.fleet_of(target, provider)
        if fleet is None:
            (target,) = target.instance_targets()  # itself, or its one instance
        key = target.key
        breaker: CircuitBreaker | None = None
        shared: SharedBreaker | None = None
        step: Step
        if fleet is not None:
            step = self._fleet_end(owner, name, fleet, provider, policies)
            if policies.may_hedge:
                step = self._hedge(f"{plugin.key}.{method}", key, fleet, policies, step)
        else:
            # A partial, not a closure: called in C, one Python frame fewer per call.
            step = partial(self._invoke(provider), target)
            if not provider.enforces_deadline:
                step = DeadlineGuard(name, step)
            targets = self.targets
            breaker = targets.breaker(key, target, policies.breaker) if policies.breaker else None
            if breaker is not None and self.state.shared:
                assert policies.breaker is not None
                shared = targets.shared_breaker(breaker, key, policies.breaker)
            if policies.batch is not None:
                sender = self._batch_sender(self._invoke_batch(provider), target, breaker, shared)
                step = self._batcher(owner, Batcher(name, policies.batch, sender))
            elif shared is not None:
                step = SharedBreakerStep(shared, step)
            elif breaker is not None:
                step = BreakerStep(breaker, step)
        if policies.may_retry:
            assert policies.retry is not None
            budget = self.targets.budget(key, target.describe(), policies.retry.budget_ratio)
            step = self.retries[f"{plugin.key}.{method}"] = RetryStep(policies.retry, budget, step)
        bulkhead = (
            self._bulkhead(owner, name, key, target, policies) if policies.concurrency else None
        )
        if bulkhead is not None:
            step = BulkheadStep(bulkhead, step)
        specs = policies.rate_limit or ()
        limits = tuple(self._limit(name, key, target, spec) for spec in specs)
        if limits:
            own = tuple(
                limit for limit, spec in zip(limits, specs, strict=True) if spec.scope != "target"
            )
            if own:
                self.method_limits[owner] = own
            step = RateLimitStep(limits, step)
        if policies.may_cache:
            assert policies.cache is not None
            cache = ResultCache(f"{plugin.key}.{method}", policies.cache, self.clock)
            self.caches[(plugin.key, method)] = cache
            if self.state.shared:
                step = SharedCacheStep(cache, policies.cache.ttl_ms / 1000, self.state, step)
            else:
                step = CacheStep(cache, step)
        self.gates[(plugin.key, method)] = Gate(limits, bulkhead, breaker, shared)
        return step

    def once(self, plugin: PluginSpec[Any], method: str, invoke: Step) -> IdempotencyStep:
        """What a call of ``plugin.method`` carrying an idempotency key goes through:
        ``invoke`` (the whole chain, fallback included) behind the idempotency step.
        Kept off ``invoke`` so calls without a key pay nothing for it."""
        return IdempotencyStep(
            f"{plugin.id}.{method}",
            self.state,
            self.idempotency_retention,
            invoke,
            refused=self.refused,
            counts=self.keyed.setdefault(f"{plugin.key}.{method}", KeyedCalls()),
        )

    def _fleet_end(
        self,
        owner: tuple[str, str],
        name: str,
        fleet: Fleet,
        provider: Provider[Any],
        policies: Policies,
    ) -> Step:
        """The end of a fleet target's chain: a ``FleetStep`` (or a batcher sending through it)."""
        policy = policies.breaker
        breaker_for: BreakerFor = None
        shared_for: SharedBreakerFor = None
        if policy is not None:
            breaker_for = partial(self._instance_breaker, policy)
            if self.state.shared:
                shared_for = partial(self._instance_shared_breaker, policy)
        fleet_step = FleetStep(fleet, self._invoke(provider), breaker_for, shared_for)
        if policies.batch is not None:
            sender = fleet_step.batch_sender(self._invoke_batch(provider))
            return self._batcher(owner, Batcher(name, policies.batch, sender))
        if not provider.enforces_deadline:
            return DeadlineGuard(name, fleet_step)
        return fleet_step

    def _let_go(self, owner: tuple[str, str]) -> None:
        """What ``owner``'s last chain kept of its own goes: its cache, limits, bulkhead,
        retry and hedge counters; its batcher is closed once its calls in flight have
        ended (``replaced_versions``, ``forget``). Called as the chain is built (again,
        when a reload changed its version's entry: only replaced before, a policy the
        reload took off left them in ``stats()``, and its batcher open, for good) and as
        the method is forgotten. The keyed calls answered stay through a rebuild, as the
        target's breaker does."""
        name = f"{owner[0]}.{owner[1]}"
        self.caches.pop(owner, None)
        self.method_limits.pop(owner, None)
        self.method_bulkheads.pop(owner, None)
        self.retries.pop(name, None)
        self.hedges.pop(name, None)
        batcher = self.batchers.pop(owner, None)
        if batcher is not None:
            self._replaced.append((owner[0], batcher))

    def _batcher(self, owner: tuple[str, str], batcher: Batcher) -> Batcher:
        self.batchers[owner] = batcher
        return batcher

    async def forget(self, gone: Iterable[tuple[str, str]]) -> None:
        """Drop what the ``gone`` methods, by ``(plugin key, method)``, owned (a reload
        took them away, with their version or from a version it changed, and their calls
        in flight have ended): caches and their entries, limits, bulkheads, retry and
        hedge counters, keyed-call records; batch tasks end, those of the batchers reloads
        replaced too. Kept, they would grow the process and ``stats()`` with every
        reload, for good."""
        for owner in gone:
            self._let_go(owner)
            self.gates.pop(owner, None)
            self.keyed.pop(f"{owner[0]}.{owner[1]}", None)
        closing = [batcher for _, batcher in self._replaced]
        self._replaced = []
        for batcher in closing:
            await batcher.aclose()

    def building(self) -> AbstractContextManager[None]:
        """Around a reload's building of routes: what its methods configure of a target
        takes their settings (``TargetPolicies.building``)."""
        return self.targets.building()

    def forget_targets(self, instances: set[str]) -> None:
        """Drop what is kept by target that no route holds any more, a fleet member's
        breaker aside (``instances``: their keys): ``TargetPolicies.forget``."""
        self.targets.forget(instances, self._held())

    def _held(self) -> set[int]:
        """The ``id`` of everything kept by target that the routes' chains hold: what each
        method's gate holds (its breaker, shared breaker, bulkhead, limits), and the retry
        budgets its retry and hedge steps spend."""
        held: set[int] = set()
        for gate in self.gates.values():
            held.update(id(limit) for limit in gate.limits)
            kept = (gate.breaker, gate.shared, gate.bulkhead)
            held.update(id(each) for each in kept if each is not None)
        held.update(id(retry.budget) for retry in self.retries.values())
        held.update(id(hedge.budget) for hedge in self.hedges.values())
        return held

    def _hedge(self, name: str, key: str, fleet: Fleet, policies: Policies, step: Step) -> Step:
        """Hedging, inside the retry step and around the fleet's: hedges spend the target's
        retry budget; without a retry step to fill it, the hedge step fills it."""
        assert policies.hedge is not None
        ratio = (policies.retry or RetryPolicy()).budget_ratio
        budget = self.targets.budget(key, fleet.name, ratio)
        hedge = HedgeStep(
            name, policies.hedge, fleet, budget, step, deposits=not policies.may_retry
        )
        self.hedges[name] = hedge
        return hedge

    def _invoke(self, provider: Provider[Any]) -> Invoke:
        boundary = self.boundary
        return provider.invoke if boundary is None else boundary.invoke(provider.invoke)

    def _invoke_batch(self, provider: Provider[Any]) -> InvokeBatch:
        boundary = self.boundary
        return (
            provider.invoke_batch
            if boundary is None
            else boundary.invoke_batch(provider.invoke_batch)
        )

    def breaker_of(self, target: TargetConfig) -> CircuitBreaker | None:
        return self.targets.breakers.get(target.key)

    def gate(self, plugin: PluginSpec[Any], method: str) -> Gate:
        """What a stream of ``plugin.method`` passes through (``dispatcher.policies.gate``)."""
        return self.gates[(plugin.key, method)]

    def event_gate(self, target: TargetConfig) -> Gate:
        """What a host event to ``target`` passes through: the policies scoped to the target."""
        return self.targets.event_gate(target.key)

    def invalidate(self, plugin: str | None = None, method: str | None = None) -> int:
        """Drop cached results of a plugin (any version), of one method, or all; returns how many."""
        dropped = 0
        for (plugin_key, name), cache in self.caches.items():
            if plugin is not None and plugin_key.partition("@")[0] != plugin:
                continue
            if method is not None and name != method:
                continue
            dropped += cache.invalidate()
        if self.state.store is not None:  # the shared entries: bumped without waiting
            names = self._shared_cache_names(plugin, method)
            self.state.store.spawn(
                self.state.store.cache_invalidate(names, self.clock() + 3600.0),
                "cache invalidation",
            )
        return dropped

    async def ainvalidate(self, plugin: str | None = None, method: str | None = None) -> int:
        """``invalidate``, returning once every replica's next read misses (shared caches);
        ``StateUnavailable`` if the store cannot be told."""
        dropped = 0
        for (plugin_key, name), cache in self.caches.items():
            if (plugin is None or plugin_key.partition("@")[0] == plugin) and (
                method is None or name == method
            ):
                dropped += cache.invalidate()
        if self.state.store is not None:
            names = self._shared_cache_names(plugin, method)
            await self.state.store.cache_invalidate(names, self.clock() + 3600.0)
        return dropped

    def _shared_cache_names(self, plugin: str | None, method: str | None) -> list[str]:
        return [
            digest(cache.name)
            for (plugin_key, name), cache in self.caches.items()
            if (plugin is None or plugin_key.partition("@")[0] == plugin)
            and (method is None or name == method)
        ]

    def replaced_versions(self) -> set[str]:
        """The plugin versions (keys) of the replaced batchers not closed yet: a reload's
        (``forget``), or one given up in its wait left them for the next to close."""
        return {key for key, _ in self._replaced}

    def flush_batches(self) -> None:
        """Send every queued batch now, without waiting out its window (a drain began)."""
        for batcher in (*self.batchers.values(), *(each for _, each in self._replaced)):
            batcher.flush_now()

    async def aclose(self, *, grace: float | None = None) -> None:
        """Send queued batches and end every batch task, waiting at most ``grace`` seconds
        for batches in flight (default: the batcher's own bound)."""
        for batcher in (*self.batchers.values(), *(each for _, each in self._replaced)):
            await batcher.aclose(grace=grace)

    def stats(self) -> dict[str, Any]:
        """Counters and states, for ``dispatcher health``, metrics and debugging."""
        targets = self.targets
        return {
            "caches": {
                f"{plugin_key}.{method}": {
                    "hits": cache.hits,
                    "misses": cache.misses,
                    "coalesced": cache.coalesced,
                    "size": len(cache.entries),
                    "hit_ratio": cache.hit_ratio,
                }
                for (plugin_key, method), cache in self.caches.items()
            },
            "breakers": targets.breaker_stats(),
            # The shared state alone, as this replica last learnt it ("unknown": not yet).
            "shared_breakers": {
                shared.name: str(shared.seen or "unknown")
                for shared in targets.shared_breakers.values()
            },
            "batchers": {
                batcher.name: {
                    "batches": batcher.batches,
                    "items": batcher.items,
                    "flushes": {
                        "full": batcher.full_flushes,
                        "timer": batcher.timed_flushes,
                        "drain": batcher.drain_flushes,
                    },
                    "mean_size": batcher.mean_batch_size,
                }
                for batcher in self.batchers.values()
            },
            "retry_budgets": {
                budget.name: {"spent": budget.spent, "refused": budget.refused}
                for budget in targets.budgets.values()
            },
            "retries": {name: step.retries for name, step in self.retries.items()},
            "idempotency": {
                name: {"replayed": counts.replayed, "joined": counts.joined}
                for name, counts in self.keyed.items()
            },
            "rate_limits": [
                {
                    "name": limit.name,
                    "scope": limit.spec.scope,
                    "mode": limit.spec.mode,
                    "waited": limit.waited,
                    "rejected": limit.rejected,
                }
                for limit in (
                    *(limit for limits in self.method_limits.values() for limit in limits),
                    *targets.target_limits.values(),
                )
            ],
            "bulkheads": {
                bulkhead.name: {
                    "in_flight": bulkhead.in_flight,
                    "waiting": bulkhead.waiting,
                    "rejected": bulkhead.rejected,
                }
                for bulkhead in (*targets.bulkheads.values(), *self.method_bulkheads.values())
            },
            "hedges": {name: hedge.stats() for name, hedge in self.hedges.items()},
            "fleets": self.fleets.stats(),
            "state": self.state.stats(),
        }

    def circuit_state(self, target: TargetConfig) -> str | None:
        """The state of ``target``'s breaker as this replica shows it (``stats()``), or
        None when it has none."""
        return self.targets.circuit_state(target.key)

    def _instance_breaker(self, policy: BreakerPolicy, instance: Instance) -> CircuitBreaker:
        return self.targets.breaker(instance.key, instance.target, policy)

    def _instance_shared_breaker(self, policy: BreakerPolicy, instance: Instance) -> SharedBreaker:
        local = self._instance_breaker(policy, instance)
        return self.targets.shared_breaker(local, instance.key, policy)

    def _bulkhead(
        self,
        owner: tuple[str, str],
        name: str,
        key: str,
        target: TargetConfig,
        policies: Policies,
    ) -> Bulkhead:
        spec = policies.concurrency
        assert spec is not None
        if spec.scope == "method":
            own = self.method_bulkheads[owner] = Bulkhead(
                name, spec.max_in_flight, spec.max_waiting
            )
            return own
        return self.targets.bulkhead(key, target, spec)

    def _limit(
        self, name: str, key: str, target: TargetConfig, spec: RateLimit
    ) -> Limit | SharedLimit:
        if spec.scope != "target":
            limit = Limit(name, spec)
            return SharedLimit(limit, name, self.state) if self.state.shared else limit
        return self.targets.limit(key, target, spec)

    @staticmethod
    def _batch_sender(
        invoke_batch: InvokeBatch,
        target: TargetConfig,
        breaker: CircuitBreaker | None,
        shared: SharedBreaker | None,
    ) -> Callable[[Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]:
        if shared is not None:
            return lambda invocations: guard_shared_batch(
                shared, invocations, lambda: invoke_batch(target, invocations)
            )
        if breaker is None:
            return lambda invocations: invoke_batch(target, invocations)
        return lambda invocations: guard_batch(breaker, lambda: invoke_batch(target, invocations))

    def __repr__(self) -> str:
        return (
            f"<PolicyRuntime {self.targets!r} caches={len(self.caches)} "
            f"batchers={len(self.batchers)}>"
        )
