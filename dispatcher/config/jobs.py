"""Async jobs (``Dispatcher.submit``): how a dispatcher runs them and how hard it tries.

``jobs: {workers: 4, max_attempts: 5}`` makes this dispatcher run 4 consumers of the job
stream on the shared Redis (``state: {backend: redis}``); any replica may submit. The
model only: ``dispatcher._jobs`` runs the workers, ``dispatcher.state`` keeps the stream.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from providers.target import StrictModel

__all__ = ["JobsConfig"]


class JobsConfig(StrictModel):
    """The manifest's ``jobs`` section."""

    workers: Annotated[int, Field(ge=0, le=256)] = Field(
        default=0,
        description="Consumers of the job stream this dispatcher runs (0: submit only).",
    )
    batch: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=16, description="Entries one consumer takes at once and runs concurrently."
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=5,
        description="Attempts before a job that keeps failing retryably is dead-lettered.",
    )
    backoff_ms: Annotated[int, Field(ge=0, le=3_600_000)] = Field(
        default=200, description="Delay before the second attempt; doubles per attempt."
    )
    backoff_max_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        default=60_000, description="The longest delay between attempts (Retry-After wins)."
    )
    # Longer than any method's timeout: a job still running on a live worker when this
    # passes is taken by another one (its idempotency key, if any, keeps it from running twice).
    visibility_timeout_ms: Annotated[int, Field(ge=100, le=86_400_000)] = Field(
        default=60_000,
        description="How long a job may stay taken by a worker that stopped answering "
        "before another worker takes it over.",
    )
    result_ttl_ms: Annotated[int, Field(gt=0, le=30 * 86_400_000)] = Field(
        default=86_400_000, description="How long a finished job's record and result are kept."
    )
    recent: Annotated[int, Field(ge=100, le=10_000_000)] = Field(
        default=100_000, description="How many job ids `dispatcher jobs` can list."
    )

    max_params_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = Field(
        default=1024 * 1024,
        description="Largest params of one job, as JSON: they are kept in Redis until it ends.",
    )
    callback_secret: str | None = Field(
        default=None,
        min_length=16,
        description="Sign job callbacks with HMAC-SHA256 under this secret (write it as "
        "${NAME}: it is never to be in the file). Header X-Linchkit-Signature: t=…,v1=….",
        repr=False,
    )
    callback_timeout_ms: Annotated[int, Field(gt=0, le=60_000)] = Field(
        default=5_000, description="Bound of one callback POST."
    )
    callback_attempts: Annotated[int, Field(ge=1, le=10)] = Field(
        default=3, description="POSTs of one callback before it is given up (5xx, 429, no answer)."
    )

    @model_validator(mode="after")
    def _backoff_in_order(self) -> JobsConfig:
        if self.backoff_max_ms < self.backoff_ms:
            raise ValueError("'backoff_max_ms' must be at least 'backoff_ms'")
        return self
