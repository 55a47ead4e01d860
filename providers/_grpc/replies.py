"""What a plugin answers over the gRPC binding, read back: the JSON of a result, a chunk or
an event (``loads``), and the error of a ``CallReply`` or ``StreamItem`` (``wire_error``),
which goes through ``linchkit_plugin.errors.error_from_wire`` like every other transport's.
"""

from __future__ import annotations

from typing import Any

import orjson

from linchkit_plugin.errors import DispatchError, ProviderError, error_from_wire

__all__ = ["loads", "wire_error"]


def loads(data: bytes, what: str) -> Any:
    """``data``'s JSON (None when empty); ``ProviderError`` naming ``what`` when not JSON."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ProviderError(f"{what} answered bytes that are not JSON: {error}") from None


def wire_error(error: Any) -> DispatchError:
    """The dispatcher error of a plugin's ``Error`` message."""
    details = loads(error.details_json, "plugin") if error.details_json else None
    return error_from_wire(
        {
            "type": error.type,
            "message": error.message,
            "retryable": error.retryable,
            "details": details,
            "retry_after": error.retry_after or None,
        }
    )
