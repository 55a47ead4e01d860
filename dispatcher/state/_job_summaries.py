"""What a listing of jobs (``JobStore.recent``, ``dead``: ``dispatcher jobs``, ``dlq list``)
reads of each record: what a row needs, each value bounded, never a whole record.

A record keeps the job's params (up to ``jobs.max_params_bytes``) and result (up to
``max_result_bytes``, 16 MiB), and whoever shares the store may write any field of any
size. Read whole, a listing of a few such records loaded them all into the command (and,
for ``--state``, the 10,000 it looks among). A listing row holds instead:

* the record's small fields (``LISTED``), each when it is at most ``MAX_FIELD_BYTES``;
* the errors (``ERRORS``) when each is at most ``MAX_ERROR_BYTES`` and the listing has not
  yet read ``ERROR_BUDGET_BYTES`` of them; the type of the error (``error_type``) in any
  case when it can be read from one of at most ``MAX_TYPED_ERROR_BYTES``;
* the params and result (``SIZED``) as their sizes only;
* a field left out for its size as ``<name>_bytes``: a row says what it did not read.

The Redis store applies these rules in a script, next to the records (only the row
crosses the network); ``summary`` applies them to a record already in hand (the dead
letters of an SQS queue without a job view, each within SQS's message size).
"""

from __future__ import annotations

import orjson

__all__ = [
    "ERRORS",
    "ERROR_BUDGET_BYTES",
    "LISTED",
    "MAX_ERROR_BYTES",
    "MAX_FIELD_BYTES",
    "MAX_TYPED_ERROR_BYTES",
    "MAX_TYPE_CHARS",
    "SIZED",
    "ErrorBudget",
    "summary",
]

#: The fields a row shows as they are kept: names, states, counts, times.
LISTED = (
    "plugin",
    "version",
    "method",
    "state",
    "attempts",
    "caller",
    "submitted_at",
    "started_at",
    "finished_at",
    "redriven_at",
    "callback",
    "callback_attempts",
)
#: The errors a row shows whole when small (an operator triages dead letters by them).
ERRORS = ("error", "previous_error")
#: What a row shows by size only.
SIZED = ("params", "result")
#: Every one of ``LISTED`` is far shorter when a dispatcher writes it.
MAX_FIELD_BYTES = 256
MAX_ERROR_BYTES = 4096
#: Errors read whole by one listing, in all: past it, rows carry their sizes and types.
ERROR_BUDGET_BYTES = 16 * 1024 * 1024
#: The largest error whose type is read (in the store: decoded there, only the type sent).
MAX_TYPED_ERROR_BYTES = 64 * 1024
#: The longest error type shown; a longer one is no dispatcher's.
MAX_TYPE_CHARS = 64


class ErrorBudget:
    """What is left of one listing's ``ERROR_BUDGET_BYTES``."""

    __slots__ = ("left",)

    def __init__(self, left: int = ERROR_BUDGET_BYTES) -> None:
        self.left = left

    def take(self, size: int) -> bool:
        """Whether an error of ``size`` bytes may be read whole (and spend that much)."""
        if size > MAX_ERROR_BYTES or size > self.left:
            return False
        self.left -= size
        return True


def summary(job_id: str, record: dict[str, str], budget: ErrorBudget) -> dict[str, str]:
    """The listing row of ``record`` (module docstring), as the store's script makes it."""
    row = {"id": job_id}
    for name in LISTED:
        value = record.get(name)
        if value is not None:
            size = len(value.encode())
            if size <= MAX_FIELD_BYTES:
                row[name] = value
            else:
                row[f"{name}_bytes"] = str(size)
    for name in ERRORS:
        value = record.get(name)
        if value is None:
            continue
        size = len(value.encode())
        if budget.take(size):
            row[name] = value
        else:
            row[f"{name}_bytes"] = str(size)
        if name == "error" and size <= MAX_TYPED_ERROR_BYTES:
            kind = _error_type(value)
            if kind is not None:
                row["error_type"] = kind
    for name in SIZED:
        value = record.get(name)
        if value is not None:
            row[f"{name}_bytes"] = str(len(value.encode()))
    return row


def _error_type(text: str) -> str | None:
    try:
        error = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) and len(kind) <= MAX_TYPE_CHARS else None
