"""How the gateway's gRPC port tells an error: its status, its trailers, and the
``GatewayError`` of a plugin's own error.

The statuses are the reverse of ``providers._grpc.status``, so a dispatcher reading this
port through its own grpc code gets the same error type back, told apart by ``error-type``
where types share a status:

    error type                                        gRPC status
    invalid_params                                    INVALID_ARGUMENT
    unauthorized                                      UNAUTHENTICATED
    forbidden                                         PERMISSION_DENIED
    plugin_not_found, method_not_found                NOT_FOUND
    rate_limited                                      RESOURCE_EXHAUSTED
    result_too_large (a job's result over             RESOURCE_EXHAUSTED, ``retryable``
    jobs.max_result_bytes; HTTP's 500)                false: final, unlike rate_limited
    deadline_exceeded                                 DEADLINE_EXCEEDED
    target_unavailable, circuit_open, overloaded,     UNAVAILABLE
    shutting_down
    provider_error (and any type not listed)          FAILED_PRECONDITION
    plugin_error (the plugin raised)                  OK, ``ok: false`` and the envelope

with trailing metadata ``error-type``, ``retryable`` and ``retry-after`` (seconds).
"""

from __future__ import annotations

import grpc
import orjson

from linchkit_plugin._proto import gateway_pb2
from linchkit_plugin.errors import DispatchError

__all__ = [
    "MAX_STATUS_MESSAGE_BYTES",
    "STATUS_BY_TYPE",
    "error_message",
    "status_message",
    "trailers",
]

STATUS_BY_TYPE: dict[str, grpc.StatusCode] = {
    "invalid_params": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "plugin_not_found": grpc.StatusCode.NOT_FOUND,
    "method_not_found": grpc.StatusCode.NOT_FOUND,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "target_unavailable": grpc.StatusCode.UNAVAILABLE,
    "circuit_open": grpc.StatusCode.UNAVAILABLE,
    "overloaded": grpc.StatusCode.UNAVAILABLE,
    "shutting_down": grpc.StatusCode.UNAVAILABLE,
    # The dispatcher's own limit on an answer (a job's result over jobs.max_result_bytes):
    # what grpc itself answers for a message over a size limit, as this port does for a
    # request over max_body_bytes. The HTTP port's 500 (not 429, no Retry-After) says it is
    # final; here the trailers do (retryable false, no retry-after). Not provider_error's
    # FAILED_PRECONDITION (the target did not break the protocol: the HTTP port's 502 vs
    # 500), nor INTERNAL (grpc's broken invariants, read back as a crashed handler).
    # providers._grpc.status tells it from rate_limited by its error-type trailer.
    "result_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: The most of an error's message a status carries, in UTF-8 bytes. grpc sends it in a
#: trailer, percent-encoded (a byte past ASCII takes three), and its clients refuse
#: trailers past 8 KiB some of the time and past 16 KiB always, as RESOURCE_EXHAUSTED
#: without this port's ``error-type``: a retryable ``Overloaded`` to
#: ``providers._grpc.status``. A message may quote what the caller sent (a value over its
#: schema's ``maxLength``, a made-up plugin name), so it is cut to fit.
MAX_STATUS_MESSAGE_BYTES = 2048


def error_message(error: DispatchError) -> gateway_pb2.GatewayError:
    """A plugin's own error, as the ``GatewayError`` of an answer (``ok: false``)."""
    wire = error.to_wire()
    details = wire.get("details")
    try:
        details_json = orjson.dumps(details) if details else b""
    except TypeError:  # a plugin's details JSON cannot carry: keep the rest
        details_json = b""
    return gateway_pb2.GatewayError(
        type=wire["type"],
        message=wire["message"],
        retryable=wire["retryable"],
        details_json=details_json,
        retry_after=error.retry_after or 0.0,
    )


def status_message(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE_BYTES`` of UTF-8 (and an ellipsis)."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return encoded[:MAX_STATUS_MESSAGE_BYTES].decode("utf-8", "ignore") + "…"


def trailers(error: DispatchError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a call ended by ``error`` carries."""
    trailers = [("error-type", error.type), ("retryable", "true" if error.retryable else "false")]
    if error.retry_after is not None:
        trailers.append(("retry-after", f"{error.retry_after:g}"))
    return tuple(trailers)
