"""Reading what redis-py hands back, for the job stores and the callback outbox on Redis.

A client made without ``decode_responses`` answers bytes, one made with it answers str,
and a script's HGETALL comes back as a flat list rather than a dict: these read all of
them the same way. Undecodable bytes are replaced, never raised on: a record written by
hand (or by a broken replica) must not stop a worker reading the others.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["now_ms", "reply_fields", "reply_text"]


def reply_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def reply_fields(flat_or_dict: Any) -> dict[str, str]:
    """A hash as a dict of str, from HGETALL's dict or a script's flat list."""
    if isinstance(flat_or_dict, dict):
        return {reply_text(k): reply_text(v) for k, v in flat_or_dict.items()}
    items = list(flat_or_dict or ())
    return {reply_text(items[i]): reply_text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def now_ms() -> str:
    """Wall-clock milliseconds since the epoch, as records store their times."""
    return str(int(time.time() * 1000))
