"""Where the policies keep their state: this process, or Redis shared by every replica.

``new_backend(manifest.state, clock)`` makes the backend the manifest names (``base`` has
the seam, ``errors`` the error tree, ``shared_store``, ``idempotency_store``,
``job_store`` and ``callback_outbox`` what a backend is made of; ``memory`` the default;
``redis_store`` the shared one; ``sqs_jobs`` async jobs on SQS). redis-py is imported only when a manifest chooses Redis,
aiobotocore only when it queues jobs on SQS.
"""

from __future__ import annotations

from collections.abc import Callable

from dispatcher.config import JobsConfig, StateConfig
from dispatcher.state.base import StateBackend, digest
from dispatcher.state.errors import JobsUnavailable, JobTooLarge, StateUnavailable
from dispatcher.state.idempotency_store import (
    ANY_VERSION,
    Claim,
    Claimed,
    IdempotencyStore,
    decode_outcome,
    encode_error,
    encode_result,
)
from dispatcher.state.job_store import Delivery, JobRecords, JobStore
from dispatcher.state.memory import MemoryIdempotency, MemoryState
from dispatcher.state.shared_store import Admission, BreakerPolicyArgs, BreakerView, SharedStore

__all__ = [
    "ANY_VERSION",
    "Admission",
    "BreakerPolicyArgs",
    "BreakerView",
    "Claim",
    "Claimed",
    "Delivery",
    "IdempotencyStore",
    "JobRecords",
    "JobStore",
    "JobTooLarge",
    "JobsUnavailable",
    "MemoryIdempotency",
    "MemoryState",
    "SharedStore",
    "StateBackend",
    "StateUnavailable",
    "decode_outcome",
    "digest",
    "encode_error",
    "encode_result",
    "new_backend",
]


def new_backend(
    config: StateConfig, clock: Callable[[], float], jobs: JobsConfig | None = None
) -> StateBackend:
    """The backend ``config`` names; with ``jobs: {backend: sqs}`` its async jobs queue on
    SQS (``sqs_jobs``), their job view on this backend when it keeps one (Redis)."""
    backend = _state_backend(config, clock)
    if jobs is None or jobs.backend != "sqs":
        return backend
    from dispatcher.state.sqs_jobs import SqsJobs, SqsJobsState  # aiobotocore: on open

    return SqsJobsState(backend, SqsJobs(jobs, backend.job_records, clock))


def _state_backend(config: StateConfig, clock: Callable[[], float]) -> StateBackend:
    if config.backend == "memory":
        return MemoryState(clock)
    try:
        # Lazily: a host on the memory backend does not need redis-py installed.
        from dispatcher.state.redis_store import RedisState
    except ImportError as error:
        raise RuntimeError(
            "the manifest's state backend is redis, which needs redis-py: "
            "pip install 'linchkit-dispatcher[redis]'"
        ) from error
    return RedisState(config, clock)
