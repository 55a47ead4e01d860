"""Error tracking: how many calls failed, by plugin and error type, and the last few.

``ErrorLog`` is what ``dispatcher top`` and the gateway's ``/v1/errors`` read (the
gateway shows each caller the entries of its own calls). It is
bounded whatever callers and plugins do: counts are keyed by the plugin (from the
manifest) and the error's stable ``type`` (from the error tree: a plugin's own exception
names are not keys, they travel in ``remote_type`` of each recent entry), and the recent
entries are a ring of ``capacity`` with each text cut to a fixed length.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from linchkit_plugin.errors import DispatchError, PluginError
from providers.invocation import Invocation

__all__ = ["ErrorLog", "RecentError", "error_type"]

#: Longest message (and remote type) an entry keeps: plugin messages are not bounded.
MAX_TEXT_CHARS = 512


def error_type(error: BaseException) -> str:
    """The stable, bounded name of an error: its ``type`` in the tree, ``cancelled`` or
    ``internal_error`` (a bug: not a ``DispatchError``)."""
    if isinstance(error, DispatchError):
        return error.type
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return "cancelled"
    return "internal_error"


@dataclass(frozen=True, slots=True)
class RecentError:
    """One failed call, as ``/v1/errors`` shows it."""

    time: float  # Unix seconds
    plugin: str
    version: str
    method: str
    type: str
    message: str
    request_id: str
    remote_type: str | None = None
    trace_id: str | None = None
    #: Who made the call (``Invocation.caller``): the gateway shows a caller only its own.
    caller: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ErrorLog:
    """Error counts by (plugin, type) and a ring of the most recent errors."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.recent: deque[RecentError] = deque(maxlen=capacity)
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, plugin: str, kind: str) -> None:
        """Count an error with no invocation to keep (a call refused before it had one)."""
        key = (plugin, kind)
        self.counts[key] = self.counts.get(key, 0) + 1

    def record(
        self, invocation: Invocation, error: BaseException, trace_id: str | None = None
    ) -> None:
        kind = error_type(error)
        key = (invocation.plugin, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        if kind == "cancelled":  # a caller that gave up: counted, not worth an entry
            return
        remote = error.remote_type if isinstance(error, PluginError) else None
        message = error.message if isinstance(error, DispatchError) else str(error)
        self.recent.append(
            RecentError(
                time.time(),
                invocation.plugin,
                invocation.version,
                invocation.method,
                kind,
                _cut(message),
                invocation.request_id,
                None if remote is None else _cut(remote),
                trace_id,
                invocation.caller,
            )
        )

    def snapshot(self, limit: int | None = None) -> dict[str, Any]:
        """Counts and the recent errors, newest first: the body of ``/v1/errors``."""
        recent = list(self.recent)[::-1]
        if limit is not None:
            recent = recent[: max(limit, 0)]
        return {
            "counts": [
                {"plugin": plugin, "type": kind, "count": count}
                for (plugin, kind), count in sorted(self.counts.items())
            ],
            "recent": [entry.to_dict() for entry in recent],
        }

    def __repr__(self) -> str:
        return f"<ErrorLog {sum(self.counts.values())} errors, {len(self.recent)}/{self.capacity} kept>"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"
