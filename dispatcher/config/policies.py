"""Per-method policy settings as the manifest states them (``cache``, ``retry``, …).

The models only: ``dispatcher.policies`` turns them into the steps that run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from providers.target import StrictModel

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "FALLBACK_ERROR_TYPES",
    "BatchPolicy",
    "BreakerPolicy",
    "CachePolicy",
    "ConcurrencyPolicy",
    "FallbackPolicy",
    "HedgePolicy",
    "Policies",
    "RateLimit",
    "RetryPolicy",
]

DEFAULT_TIMEOUT_MS = 30_000


class CachePolicy(StrictModel):
    """Keep results of a pure method: same params (key order aside), same result."""

    ttl_ms: Annotated[int, Field(gt=0)]
    max_entries: Annotated[int, Field(gt=0)] = 1024
    per_caller: bool = Field(default=False, description="Key the cache by caller too.")


class BatchPolicy(StrictModel):
    """Coalesce concurrent calls of a method into one invocation of the target."""

    max_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_wait_ms: Annotated[float, Field(ge=0)] = 5


class RateLimit(StrictModel):
    """A leaky bucket: ``rate`` calls per second on average, ``burst`` at once."""

    rate: Annotated[float, Field(gt=0)]
    burst: Annotated[int, Field(ge=1)] | None = None
    scope: Literal["method", "target", "caller"] = "method"
    mode: Literal["wait", "reject"] = "wait"

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, round(self.rate))


class BreakerPolicy(StrictModel):
    """One circuit breaker per target instance."""

    fail_max: Annotated[int, Field(ge=1)] = 5
    reset_timeout_ms: Annotated[int, Field(gt=0)] = 30_000
    half_open_max_calls: Annotated[int, Field(ge=1)] = 1
    success_threshold: Annotated[int, Field(ge=1)] = 1


class RetryPolicy(StrictModel):
    """Retries of retryable errors, for idempotent methods only."""

    attempts: Annotated[int, Field(ge=1, le=20)] = 3
    initial_backoff_ms: Annotated[float, Field(gt=0)] = 50
    max_backoff_ms: Annotated[float, Field(gt=0)] = 2_000
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2, description="Retries may add at most this share of extra load on a target."
    )


class HedgePolicy(StrictModel):
    """Send another attempt of a slow call to another instance of a fleet; the first answer wins.

    ``after_ms`` alone: a fixed delay. ``after_percentile``: the delay follows that
    percentile of the method's recent latencies (``dispatcher.policies.hedge``), and
    ``after_ms`` (default 50) is the delay until enough of them are known; never below
    ``min_after_ms``.
    """

    after_ms: Annotated[float, Field(gt=0, le=3_600_000)] | None = None
    after_percentile: Annotated[float, Field(ge=50, le=99.9)] | None = None
    min_after_ms: Annotated[float, Field(ge=0, le=3_600_000)] = Field(
        default=5, description="Floor of a percentile-driven delay."
    )
    # Each attempt is a full call on some instance: more than 3 multiplies load on a
    # struggling fleet for almost no gain in the tail.
    max_attempts: Annotated[int, Field(ge=2, le=3)] = 2

    @model_validator(mode="after")
    def _needs_a_delay(self) -> HedgePolicy:
        if self.after_ms is None and self.after_percentile is None:
            raise ValueError("a hedge needs 'after_ms' or 'after_percentile'")
        return self


#: The wire ``type`` of the errors a fallback may be taken on: every error a call can end
#: with except those that say the call itself, not its target, is wrong or unwanted here
#: (``plugin_not_found``: no route at all; ``shutting_down``: this dispatcher is going
#: away, the fallback would be refused too).
FALLBACK_ERROR_TYPES = (
    "target_unavailable",
    "circuit_open",
    "deadline_exceeded",
    "rate_limited",
    "overloaded",
    "provider_error",
    "plugin_error",
    "method_not_found",
    "invalid_params",
    "unauthorized",
    "forbidden",
)


class FallbackPolicy(StrictModel):
    """When a call ends with one of the errors ``on``, call the same method of another plugin."""

    plugin: Annotated[str, Field(min_length=1, max_length=128)]
    version: str | None = Field(default=None, description="Exact version; unset: the highest.")
    # Required, as stamina requires what to retry on: a default would decide for the user
    # which failures are safe to answer from elsewhere.
    on: Annotated[list[str], Field(min_length=1)]

    @field_validator("on")
    @classmethod
    def _known_types(cls, types: list[str]) -> list[str]:
        unknown = [kind for kind in types if kind not in FALLBACK_ERROR_TYPES]
        if unknown:
            raise ValueError(
                f"unknown error type {unknown[0]!r} in 'on'; one of: {', '.join(FALLBACK_ERROR_TYPES)}"
            )
        return types


class ConcurrencyPolicy(StrictModel):
    """A bulkhead: at most ``max_in_flight`` calls at once, ``max_waiting`` queued."""

    max_in_flight: Annotated[int, Field(ge=1)]
    max_waiting: Annotated[int, Field(ge=0)] = 0
    scope: Literal["method", "target"] = "method"


class Policies(StrictModel):
    """Per-method behaviour; set on a method, or on a plugin's ``defaults`` for all its methods.

    Every field left unset inherits: method → plugin ``defaults`` → built-in default.
    Safe by default: nothing is cached unless a method is ``pure``, nothing is retried
    unless it is ``idempotent`` (``pure`` implies ``idempotent``).
    """

    timeout_ms: Annotated[int, Field(gt=0, le=86_400_000)] | None = None
    idempotent: bool | None = None
    pure: bool | None = None
    cache: CachePolicy | None = None
    batch: BatchPolicy | None = None
    rate_limit: list[RateLimit] | None = None
    breaker: BreakerPolicy | None = None
    retry: RetryPolicy | None = None
    concurrency: ConcurrencyPolicy | None = None
    hedge: HedgePolicy | None = None
    fallback: FallbackPolicy | None = None
    # Off by default: params may hold personal data or secrets, which an append-only,
    # long-kept audit log must not collect unless the method's owner decided it may.
    audit_params: bool | None = Field(
        default=None, description="Write this method's params into its audit records."
    )

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _one_or_many_limits(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @property
    def may_cache(self) -> bool:
        return self.cache is not None and bool(self.pure)

    @property
    def may_retry(self) -> bool:
        return (
            self.retry is not None
            and self.retry.attempts > 1
            and bool(self.idempotent or self.pure)
        )

    @property
    def may_hedge(self) -> bool:
        """Hedging runs a call twice at once: only an idempotent method may, and a batched
        one does not (a batch goes to one instance as one invocation)."""
        return self.hedge is not None and bool(self.idempotent or self.pure) and self.batch is None
