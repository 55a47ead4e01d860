"""Every failed RPC as a dispatcher error: the one translation of gRPC statuses.

    gRPC status                      dispatcher error             retryable
    UNAVAILABLE, CANCELLED, ABORTED  TargetUnavailable            yes
    UNKNOWN, INTERNAL                TargetUnavailable            yes (a handler crashed)
    DEADLINE_EXCEEDED                DeadlineExceeded             yes
    RESOURCE_EXHAUSTED               RateLimited                  yes (``retry-after`` trailer)
      … "larger than max" (a message  ProviderError                no (resending gets it again)
      over the size cap, counted
      after decompression: a bomb)
    INVALID_ARGUMENT, OUT_OF_RANGE   InvalidParams                no
    UNAUTHENTICATED                  Unauthorized                 no
    PERMISSION_DENIED                Forbidden                    no
    UNIMPLEMENTED, NOT_FOUND         ProviderError                no (the target lacks the RPC)
    FAILED_PRECONDITION, other       ProviderError                no

An UNAVAILABLE that provably never left the client carries ``details["stage"] ==
"connect"`` (``CONNECT_STAGE``; a fleet then tries another instance, for any method).
UNAVAILABLE alone does not say so: it is also what a connection that broke with the
request on the wire gives (``Stream removed (Socket closed)``, measured against a server
killed mid-call). What does say so is grpc core's own wording for a call that failed
*before a transport was picked*: the load-balancing pick failed because no connection
could be opened (pick_first: ``failed to connect to all addresses``; round_robin:
``connections to all backends failing``), or the name did not resolve (``DNS resolution
failed``). Such a call was never written to any socket. Any other wording gets no
marker: only an idempotent method's retry policy may send it again.

A plugin's own failures come back in ``CallReply.error`` and go through
``linchkit_plugin.errors.error_from_wire`` like every other transport's
(``providers._grpc.connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    Forbidden,
    InvalidParams,
    ProviderError,
    RateLimited,
    TargetUnavailable,
    Unauthorized,
)
from providers.base import CONNECT_STAGE

__all__ = ["DEADLINE_SKEW_SECONDS", "grpc_errors", "never_left_the_client", "translate_rpc_error"]

#: How grpc core words the failure of a call that no connection was picked for (the LB
#: pick failed, or the name did not resolve): the call was never sent. Prefixes of
#: ``details()``, as grpcio 1.85 words them (tests/test_grpc_fleet.py checks they hold).
_NOT_SENT_PREFIXES = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "DNS resolution failed",
)


def _status_names() -> dict[Any, tuple[type[DispatchError], bool | None]]:
    import grpc

    code = grpc.StatusCode
    return {
        code.UNAVAILABLE: (TargetUnavailable, None),
        code.CANCELLED: (TargetUnavailable, None),
        code.ABORTED: (TargetUnavailable, None),
        code.UNKNOWN: (TargetUnavailable, None),
        code.INTERNAL: (TargetUnavailable, None),
        code.DEADLINE_EXCEEDED: (DeadlineExceeded, None),
        code.RESOURCE_EXHAUSTED: (RateLimited, None),
        code.INVALID_ARGUMENT: (InvalidParams, None),
        code.OUT_OF_RANGE: (InvalidParams, None),
        code.UNAUTHENTICATED: (Unauthorized, None),
        code.PERMISSION_DENIED: (Forbidden, None),
    }


_BY_STATUS: dict[Any, tuple[type[DispatchError], bool | None]] = {}

#: How far ahead of our deadline a server's copy of it may fire: the grpc-timeout header
#: is rounded, and the server starts counting when the request arrives.
DEADLINE_SKEW_SECONDS = 0.02


def grpc_errors() -> tuple[type[Exception], ...]:
    """What ``except`` catches around a call: every exception grpc.aio raises from one.

    A function, evaluated only when an exception is being handled, so grpcio stays unimported
    until a connection opens.
    """
    import grpc.aio

    return (grpc.aio.AioRpcError, grpc.aio.BaseError)


def translate_rpc_error(
    error: Exception, what: str, deadline: float | None = None
) -> DispatchError:
    """The dispatcher error for a failed RPC; ``what`` names the call for the message.

    Besides statuses, grpc.aio raises ``UsageError`` on a closed channel (the dispatcher is
    closing: not retryable) and ``InternalError`` when it cannot start the call at all.
    A server whose own copy of the deadline fires first may reset the stream (CANCELLED)
    a moment before our deadline does: at the ``deadline``, that is the deadline.
    """
    import grpc
    import grpc.aio

    if not isinstance(error, grpc.aio.AioRpcError):
        if isinstance(error, grpc.aio.UsageError):
            return TargetUnavailable(f"{what}: the connection is closed", retryable=False)
        return ProviderError(f"{what}: grpc could not make the call: {error}")
    if not _BY_STATUS:
        _BY_STATUS.update(_status_names())
    status = error.code()
    details = error.details() or ""
    message = f"{what}: {status.name} {details}".rstrip()
    if (
        deadline is not None
        and status == grpc.StatusCode.CANCELLED
        and asyncio.get_running_loop().time() >= deadline - DEADLINE_SKEW_SECONDS
    ):
        return DeadlineExceeded(message)
    if status == grpc.StatusCode.UNAVAILABLE and never_left_the_client(details):
        return TargetUnavailable(message, details=CONNECT_STAGE)
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # grpc core's own words for a message over the receive cap (decompressed size):
        # no rate limit, and the same answer again on every resend.
        return ProviderError(f"{message}: the message is over the size cap", retryable=False)
    kind, retryable = _BY_STATUS.get(status, (ProviderError, None))
    retry_after: float | None = None
    if kind is RateLimited:
        for key, value in error.trailing_metadata() or ():
            if key == "retry-after":
                with contextlib.suppress(ValueError):
                    retry_after = float(value)
    return kind(message, retryable=retryable, retry_after=retry_after)


def never_left_the_client(details: str) -> bool:
    """Whether an UNAVAILABLE's ``details()`` says the call was never sent (see above)."""
    return details.startswith(_NOT_SENT_PREFIXES)
