"""The seam between the policies and where their state lives.

Two kinds of backend (``StateBackend``):

* ``memory`` (``dispatcher.state.memory``): this process only. The rate limits, breakers
  and caches keep using their in-process objects exactly as before (no step is added and
  none is slower); only idempotency records need a store of their own here.
* ``redis`` (``dispatcher.state.redis_store``): shared by every replica naming the same
  Redis and key prefix. It implements ``SharedStore``: what a shared limiter, breaker and
  cache need, each one atomic server-side operation.

What a backend is made of, one module each: ``errors`` (the error tree, and what
``fail_open`` does with ``StateUnavailable``), ``shared_store`` (shared limits, breakers
and caches), ``idempotency_store`` (keyed calls' records), ``job_store`` and
``callback_outbox`` (async jobs and their callbacks). Their names are importable from here
too, as they were when this module held them all.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any, Self

from dispatcher.state.callback_outbox import CALLBACK_STATES, CallbackOutbox, PendingCallback
from dispatcher.state.errors import JobsUnavailable, JobTooLarge, StateUnavailable
from dispatcher.state.idempotency_store import (
    ANY_VERSION,
    Claim,
    Claimed,
    IdempotencyStore,
    decode_outcome,
    encode_error,
    encode_result,
    encode_too_large,
)
from dispatcher.state.job_store import (
    JOB_STATES,
    TERMINAL_STATES,
    Delivery,
    JobRecords,
    JobStore,
    unreadable_record,
)
from dispatcher.state.shared_store import Admission, BreakerPolicyArgs, BreakerView, SharedStore

__all__ = [
    "ANY_VERSION",
    "CALLBACK_STATES",
    "JOB_STATES",
    "TERMINAL_STATES",
    "Admission",
    "BreakerPolicyArgs",
    "BreakerView",
    "CallbackOutbox",
    "Claim",
    "Claimed",
    "Delivery",
    "IdempotencyStore",
    "JobRecords",
    "JobStore",
    "JobTooLarge",
    "JobsUnavailable",
    "PendingCallback",
    "SharedStore",
    "StateBackend",
    "StateUnavailable",
    "decode_outcome",
    "digest",
    "encode_error",
    "encode_result",
    "encode_too_large",
    "unreadable_record",
]


def digest(*parts: bytes | str) -> str:
    """A short, stable, printable digest: keys never carry a caller's raw text or a URL."""
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return hasher.hexdigest()


class StateBackend(ABC):
    """Where one dispatcher's policies keep their state. Started and closed by the
    dispatcher (``start``/``aclose``, or ``async with``)."""

    #: True when the state is shared with other replicas (limits, breakers, caches).
    shared: bool = False
    #: What a step does when the store cannot answer: fall back to local state (True)
    #: or raise ``StateUnavailable``.
    fail_open: bool = True

    @property
    @abstractmethod
    def idempotency(self) -> IdempotencyStore: ...

    @property
    def local_idempotency(self) -> IdempotencyStore:
        """Where idempotency records go while a shared store cannot answer (fail_open)."""
        return self.idempotency

    @property
    def store(self) -> SharedStore | None:
        """The shared operations, when ``shared``."""
        return None

    @property
    def jobs(self) -> JobStore | None:
        """Durable async jobs, on a backend that has them (Redis)."""
        return None

    @property
    def job_records(self) -> JobRecords | None:
        """Where a job queue that keeps no records (SQS) keeps its job view (Redis)."""
        return None

    def fell_back(self, what: str, error: StateUnavailable) -> None:
        """A step used local state because the store could not answer (fail_open).
        The memory backend never falls back: nothing to count."""
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory"}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
