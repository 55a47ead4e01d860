"""What a plugin answers over the gRPC binding, read back: the JSON of a result, a chunk or
an event (``loads``), and the error of a ``CallReply`` or ``StreamItem`` (``wire_error``),
which goes through ``linchkit_plugin.errors.error_from_wire`` like every other transport's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from linchkit_plugin.errors import DispatchError, MethodNotFound, ProviderError, error_from_wire

if TYPE_CHECKING:
    from providers.invocation import Invocation

__all__ = ["loads", "wire_error"]


def loads(data: bytes, what: str) -> Any:
    """``data``'s JSON (None when empty); ``ProviderError`` naming ``what`` when not JSON."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ProviderError(f"{what} answered bytes that are not JSON: {error}") from None


def wire_error(error: Any, invocation: Invocation | None = None) -> DispatchError:
    """The dispatcher error of a plugin's ``Error`` message.

    A ``method_not_found`` names the plugin by the manifest's id, the one its caller
    used: a plugin names itself (``plugin jplug has no method nope``) by the id its own
    code gives, which need not be the manifest's. Its words stay in ``details``
    (``plugin_message``)."""
    details = loads(error.details_json, "plugin") if error.details_json else None
    if error.type == MethodNotFound.type and invocation is not None:
        return MethodNotFound(
            f"plugin {invocation.plugin!r} has no method {invocation.method!r}: the plugin"
            " answered method_not_found",
            retryable=error.retryable,
            details={
                **(details if isinstance(details, dict) else {}),
                "plugin_message": error.message,
            },
        )
    return error_from_wire(
        {
            "type": error.type,
            "message": error.message,
            "retryable": error.retryable,
            "details": details,
            "retry_after": error.retry_after or None,
        }
    )
