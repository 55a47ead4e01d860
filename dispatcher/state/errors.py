"""The state stores' own errors, as a tree::

    DispatchError (linchkit_plugin.errors)
    ├── TargetUnavailable (type "target_unavailable", retryable)
    │   └── StateUnavailable  the store (or the job queue) did not answer within its bound
    ├── InvalidParams
    │   └── JobTooLarge       a job that does not fit in one queue message (SQS)
    └── JobsUnavailable       no durable job store, or no job view, is configured

With ``on_unavailable: fail_open`` a step that gets ``StateUnavailable`` falls back to this
replica's own state instead; the backend counts and logs it (``stats()``).
"""

from __future__ import annotations

from linchkit_plugin.errors import DispatchError, InvalidParams, TargetUnavailable

__all__ = ["JobTooLarge", "JobsUnavailable", "StateUnavailable"]


class StateUnavailable(TargetUnavailable):
    """The shared state store did not answer within its bound, and the manifest says
    ``fail_closed``. Retryable: the store may be back in a moment."""


class JobsUnavailable(DispatchError):
    """No durable store for async jobs (the memory backend), or no job view (SQS without
    a ``state:`` Redis keeps no records to read)."""

    type = "jobs_unavailable"


class JobTooLarge(InvalidParams):
    """A job's message is larger than its queue takes (SQS: 256 KiB unless the queue says
    more); refused at submit, never sent."""
