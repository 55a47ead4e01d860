"""Where the policies keep their state: in this process (default) or shared on Redis.

``state: {backend: redis, url: "${REDIS_URL}", on_unavailable: fail_open}`` makes several
dispatcher replicas share rate limits, breakers, cached results and idempotency records
(``dispatcher.state``). The models only: ``dispatcher.state`` turns them into a backend.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from dispatcher.config.redis_url import checked_redis_url
from providers.target import StrictModel

__all__ = ["StateConfig"]


class StateConfig(StrictModel):
    """The manifest's ``state`` section."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = Field(
        default=None,
        description="redis://[user:password@]host:port/db (redis only); the query may set "
        "db, client_name, socket_keepalive and, on rediss://, ssl_ca_certs, ssl_ca_path, "
        "ssl_certfile and ssl_keyfile.",
    )
    # Required to be stated as a choice would be safer, but the default must keep calls
    # flowing: a cache or limiter store going away should not take every plugin down.
    on_unavailable: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="fail_open: fall back to this replica's own state (logged, counted); "
        "fail_closed: the call fails with StateUnavailable.",
    )
    op_timeout_ms: Annotated[int, Field(gt=0, le=10_000)] = Field(
        default=200,
        description="Bound of one Redis operation (also bounded by the call's deadline).",
    )
    retry_after_ms: Annotated[int, Field(ge=0, le=60_000)] = Field(
        default=1_000,
        description="After a failed Redis operation, how long calls skip Redis before trying again.",
    )
    key_prefix: Annotated[
        str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    ] = "linchkit"
    breaker_sync_ms: Annotated[int, Field(ge=0, le=10_000)] = Field(
        default=100,
        description="How long a replica trusts its last view of a closed shared breaker "
        "without asking Redis (transitions are also pushed to every replica at once).",
    )
    idempotency_retention_ms: Annotated[int, Field(gt=0, le=7 * 86_400_000)] = Field(
        default=86_400_000, description="How long a finished call's outcome answers its key."
    )
    pool_size: Annotated[int, Field(ge=1, le=1024)] = 64

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        """What redis-py takes as the dispatcher means it (``checked_redis_url``): a line
        break, a port past 65535 or an unknown query argument loaded and failed only when
        Redis was first reached. Never quoted: the URL holds Redis's password."""
        return None if url is None else checked_redis_url(url)

    @model_validator(mode="after")
    def _redis_needs_a_url(self) -> StateConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("state backend 'redis' needs a 'url' (redis://host:port/db)")
        if self.backend == "memory" and self.url:
            raise ValueError("'url' is for backend 'redis'; the memory backend has none")
        return self
