"""The gRPC envelope of one call, read and written by a plugin's server
(``linchkit_plugin.grpc_server``): a ``CallRequest``'s params, context and deadline in
(docs/protocol.md, "The gRPC binding"); a result goes out as ``wire.result_fragment`` writes it.

What a host sends is not trusted: params that are not JSON, or nested deeper than
``MAX_PARAMS_DEPTH``, are that call's own ``InvalidParams`` (in a batch too), whose message
says why and never repeats what was sent. The envelope's version is checked by the server,
which knows the version it speaks.
"""

from __future__ import annotations

from typing import Any

import orjson

from linchkit_plugin.errors import InvalidParams
from linchkit_plugin.wire import MAX_PARAMS_DEPTH, nested_deeper_than

__all__ = ["decode_params", "parse_call"]


def decode_params(raw: bytes) -> Any:
    """The params of a call, or ``InvalidParams`` that item's own answer (in a batch too).

    Not UTF-8, not JSON, a number beyond a double, a lone surrogate (orjson refuses each),
    or nested deeper than ``MAX_PARAMS_DEPTH``: the message says why, never what was sent.
    """
    if not raw:
        return None
    try:
        params = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "depth" in str(error):  # over orjson's own 1,024 levels
            raise InvalidParams(
                f"params are nested deeper than {MAX_PARAMS_DEPTH} levels"
            ) from None
        raise InvalidParams(f"params are not JSON: {str(error)[:200]}") from None
    # Deeper than the limit needs more brackets than that: count them at C speed first.
    if raw.count(b"[") + raw.count(b"{") > MAX_PARAMS_DEPTH and nested_deeper_than(
        params, MAX_PARAMS_DEPTH
    ):
        raise InvalidParams(f"params are nested deeper than {MAX_PARAMS_DEPTH} levels")
    return params


def parse_call(request: Any, context: Any) -> tuple[Any, dict[str, Any], float | None]:
    """The params, call context and timeout (seconds, or None) of ``request`` (a
    ``CallRequest``) arriving on ``context`` (its ``grpc.aio`` servicer context)."""
    params = decode_params(request.params_json)
    wire = request.context
    call_context: dict[str, Any] = {"request_id": wire.request_id}
    # Only a positive deadline_ms bounds the call: 0 is "none" (proto3's default), and a
    # negative one is a host's mistake, not a call already late (docs/protocol.md).
    deadline_ms = wire.deadline_ms if wire.deadline_ms > 0 else 0
    if deadline_ms:
        call_context["deadline_ms"] = deadline_ms
    for key in ("caller", "traceparent", "idempotency_key"):
        if getattr(wire, key):
            call_context[key] = getattr(wire, key)
    timeouts = [deadline_ms / 1000] if deadline_ms else []
    remaining = context.time_remaining()
    if remaining is not None:
        timeouts.append(remaining)
    return params, call_context, min(timeouts) if timeouts else None
