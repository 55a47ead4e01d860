"""Async jobs (``Dispatcher.submit``): where they queue, how a dispatcher runs them and how
hard it tries.

``jobs: {workers: 4, max_attempts: 5}`` makes this dispatcher run 4 consumers of the job
stream on the shared Redis (``state: {backend: redis}``); any replica may submit.
``jobs: {backend: sqs, sqs: {queue_name: …, dead_letter_queue_name: …}}`` queues them on
Amazon SQS instead (the job view then lives on the ``state:`` Redis, when there is one).
The models only: ``dispatcher._jobs`` runs the workers, ``dispatcher.state`` keeps the queue.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from providers._headers import checked_url_port, http_url_parts, refuse_aws_credentials
from providers.target import StrictModel

__all__ = ["JobsConfig", "SqsJobsConfig"]

#: SQS's own bound on a message (the queue's MaximumMessageSize may be set up to 1 MiB).
SQS_MESSAGE_LIMIT = 262_144
_QUEUE_NAME = r"^[A-Za-z0-9_-]{1,75}(\.fifo)?$"
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")


class SqsJobsConfig(StrictModel):
    """``jobs.sqs``: the two queues (each by URL or by name) and how to reach them.

    Credentials come from the standard AWS chain (environment, profile, instance role),
    exactly as the Lambda provider takes them: never from the manifest."""

    queue_url: str | None = Field(default=None, description="The job queue's URL.")
    queue_name: Annotated[str, Field(pattern=_QUEUE_NAME)] | None = Field(
        default=None, description="The job queue's name (its URL is looked up at start)."
    )
    dead_letter_queue_url: str | None = Field(
        default=None,
        description="Where jobs that ran out of attempts (and malformed "
        "messages) are sent, by URL.",
    )
    dead_letter_queue_name: Annotated[str, Field(pattern=_QUEUE_NAME)] | None = Field(
        default=None, description="The dead-letter queue, by name."
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",  # AWS's form, as a Lambda target's region
        description="AWS region; unset: the standard chain (AWS_REGION, profile).",
    )
    endpoint_url: str | None = Field(
        default=None, description="Another endpoint (moto, LocalStack, a VPC endpoint)."
    )
    receive_wait_seconds: Annotated[int, Field(ge=0, le=20)] = Field(
        default=2,
        description="Long polling: how long one receive waits for a message (also how "
        "long a stopping worker may take to notice).",
    )
    max_message_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = Field(
        default=SQS_MESSAGE_LIMIT,
        description="The largest job message submit sends (the queue's MaximumMessageSize).",
    )
    op_timeout_ms: Annotated[int, Field(ge=100, le=60_000)] = Field(
        default=5_000,
        description="Bound of one SQS request (submit raises StateUnavailable past it).",
    )

    @field_validator("queue_url", "dead_letter_queue_url", "endpoint_url")
    @classmethod
    def _is_http(cls, url: str | None, info: ValidationInfo) -> str | None:
        """An http(s) URL with a host, sent as written: no whitespace or control character,
        a port from 1 to 65535, no query or fragment (a queue's URL is
        ``https://sqs.<region>.amazonaws.com/<account>/<name>``; botocore sends it as a
        parameter, an endpoint as the base of every request), and no user or password.
        Messages never quote the URL."""
        if url is None:
            return None
        field = info.field_name or "the URL"
        if _CONTROL_OR_SPACE.search(url):
            raise ValueError(f"{field} has spaces, tabs, line breaks or other control characters")
        try:
            checked_url_port(url)
        except ValueError:
            raise ValueError(f"{field}: a URL's port is a number between 1 and 65535") from None
        parts = http_url_parts(url, field)
        refuse_aws_credentials(parts, field)
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise ValueError(
                f"{field} has no query or fragment: a queue's URL is"
                " https://sqs.<region>.amazonaws.com/<account>/<queue name>"
            )
        return url

    @model_validator(mode="after")
    def _one_of_each(self) -> SqsJobsConfig:
        if (self.queue_url is None) == (self.queue_name is None):
            raise ValueError("jobs.sqs needs exactly one of 'queue_url' and 'queue_name'")
        if (self.dead_letter_queue_url is None) == (self.dead_letter_queue_name is None):
            raise ValueError(
                "jobs.sqs needs exactly one of 'dead_letter_queue_url' and "
                "'dead_letter_queue_name' (jobs that run out of attempts are sent there)"
            )
        return self


class JobsConfig(StrictModel):
    """The manifest's ``jobs`` section."""

    backend: Literal["redis", "sqs"] = Field(
        default="redis",
        description="redis: streams on the state section's Redis; sqs: Amazon SQS (jobs.sqs).",
    )
    sqs: SqsJobsConfig | None = Field(default=None, description="The queues (backend sqs).")
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
    # How long a stopped worker's jobs wait; a live worker renews its hold every third of
    # it (a heartbeat), so a job longer than this is not taken over while its worker lives.
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
    max_result_bytes: Annotated[int, Field(ge=1, le=256 * 1024 * 1024)] = Field(
        default=16 * 1024 * 1024,
        description="Largest result of one job, as JSON: it is kept in Redis for "
        "result_ttl_ms; a larger one fails the job (result_too_large), nothing is kept.",
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
    callback_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=10,
        description="POSTs of one callback before it is given up and marked failed "
        "(5xx, 429, no answer are tried again; any other answer ends it at once).",
    )
    callback_backoff_ms: Annotated[int, Field(ge=0, le=3_600_000)] = Field(
        default=1_000, description="Delay before a callback's second POST; doubles per POST."
    )
    callback_backoff_max_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        default=300_000, description="The longest delay between two POSTs of one callback."
    )

    @model_validator(mode="after")
    def _backoff_in_order(self) -> JobsConfig:
        if self.backoff_max_ms < self.backoff_ms:
            raise ValueError("'backoff_max_ms' must be at least 'backoff_ms'")
        if self.callback_backoff_max_ms < self.callback_backoff_ms:
            raise ValueError("'callback_backoff_max_ms' must be at least 'callback_backoff_ms'")
        return self

    @model_validator(mode="after")
    def _sqs_section_matches_the_backend(self) -> JobsConfig:
        if self.backend == "sqs" and self.sqs is None:
            raise ValueError("jobs backend 'sqs' needs a 'sqs' section (queue_name, …)")
        if self.backend != "sqs" and self.sqs is not None:
            raise ValueError("'jobs.sqs' is for 'backend: sqs'")
        if self.backend == "sqs" and self.visibility_timeout_ms > 43_200_000:
            raise ValueError(
                "SQS keeps a message invisible 12 hours at most: "
                "'visibility_timeout_ms' must be at most 43200000"
            )
        return self
