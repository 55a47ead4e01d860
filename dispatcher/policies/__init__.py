"""Policies: what the dispatcher adds before a call reaches its target.

Each policy is one step over ``async (Invocation) -> result`` that awaits the next one.
The chain of a method is assembled once, when the dispatcher starts, from the method's
policies (manifest: method → plugin ``defaults``); a method without policies calls its
provider directly. Outer to inner:

    [idempotency ─►] cache ─► rate limits ─► bulkhead ─► retry ─► batcher or breaker ─► provider

* idempotency first (``idempotency``), and only on calls carrying a key (``once``: the
  route keeps both chains, so other calls pay nothing): a duplicate gets the first
  call's outcome without touching the cache, quota or target;
* cache next, so a hit costs no quota, no slot and no target call;
* rate limits before retries: one logical call takes one unit of quota; the retry
  budget bounds the extra load retries add;
* the breaker is per target instance and sees each attempt (or each batch) as one call.

A target with several instances (a fleet, ``dispatcher.fleet``) ends its chain with a
``FleetStep`` instead, which picks an instance per attempt and guards it with that
instance's breaker:

    cache ─► rate limits ─► bulkhead ─► retry ─► batcher or [hedge ─►] FleetStep ─► provider(instance)

Hedging (``hedge``, idempotent methods on a fleet, never batched) sits inside the retry
step: a hedged round is one attempt to the retry step, and hedges spend the same budget.

Limits, bulkheads and retry budgets stay per target (the whole fleet); breakers are per
instance, keyed by the instance target's ``key``.

Streams and host events are not request/response calls: they pass a ``Gate`` (``gate``),
the part of the chain that fits them (rate limits, bulkhead, breaker), sharing its state.

Where the state lives is the manifest's ``state`` (``dispatcher.state``): in this process
(the objects above, unchanged) or shared by every replica on Redis, where rate limits,
the breakers of single-instance targets and caches use the steps of ``shared``, each
falling back to the in-process object when Redis cannot answer (``fail_open``); a fleet's
``FleetStep`` guards each instance with its ``SharedBreaker``, keyed by the instance's own
identity. Batches (``guard_shared_batch``: one batch, one call), streams and events (their
``Gate``) admit and record through the same shared breaker as the method's calls.

``PolicyRuntime`` holds what methods share (breakers, budgets, bulkheads and limiters
per target) and owns every task the policies start; ``aclose`` ends them.

The one place the chain meets its provider (``provider.invoke``/``invoke_batch``, bound
to a target or to a fleet's instances) may be wrapped by a ``ProviderBoundary`` given to
``PolicyRuntime``: telemetry's span per attempt and per batch sent lives there. Without
one (tracing off) the chain is exactly the one described above.
"""

from dispatcher.fleet.breaker import BreakerState, CircuitBreaker
from dispatcher.policies.batching import Batcher
from dispatcher.policies.cache import ResultCache
from dispatcher.policies.concurrency import Bulkhead
from dispatcher.policies.gate import Gate
from dispatcher.policies.hedge import HedgeStep
from dispatcher.policies.retry import RetryBudget
from dispatcher.policies.runtime import Invoke, InvokeBatch, PolicyRuntime, ProviderBoundary, Step

__all__ = [
    "Batcher",
    "BreakerState",
    "Bulkhead",
    "CircuitBreaker",
    "Gate",
    "HedgeStep",
    "Invoke",
    "InvokeBatch",
    "PolicyRuntime",
    "ProviderBoundary",
    "ResultCache",
    "RetryBudget",
    "Step",
]
