"""The host side of the wire envelope: batch responses decoded into one ``Outcome`` each.

Single responses decode with ``linchkit_plugin.wire.decode_response``; this adds the batch
form, whose items fail one by one (``docs/protocol.md``).
"""

from __future__ import annotations

from typing import Any

from linchkit_plugin.errors import DispatchError, ProviderError, error_from_wire
from linchkit_plugin.wire import decode_response
from providers.invocation import Outcome

__all__ = ["decode_batch_response", "decode_response"]


def decode_batch_response(payload: Any, expected: int) -> list[Outcome[Any]]:
    """One outcome per item of a batch response, in request order."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        if isinstance(payload, dict) and payload.get("ok") is False:
            raise error_from_wire(payload.get("error"))
        raise ProviderError(f"target answered a batch without a results list: {payload!r:.200}")
    if len(results) != expected:
        raise ProviderError(f"target answered {len(results)} results for a batch of {expected}")
    outcomes: list[Outcome[Any]] = []
    for item in results:
        try:
            outcomes.append(Outcome(result=decode_response(item)))
        except DispatchError as error:
            outcomes.append(Outcome(error=error))
    return outcomes
