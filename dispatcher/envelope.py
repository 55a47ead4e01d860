"""The wire envelope shared by every JSON transport (``docs/protocol.md``).

Both sides live here: the host side decodes response envelopes into results or
``DispatchError``; the plugin side (``dispatcher.sdk``) parses request envelopes and
encodes responses. The JSON Schema of the same shapes is ``proto/envelope.schema.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dispatcher.errors import DispatchError, ProviderError, error_from_wire
from dispatcher.invocation import Outcome

__all__ = [
    "PROTOCOL_VERSION",
    "RequestEnvelope",
    "decode_batch_response",
    "decode_response",
    "error_response",
    "ok_response",
    "parse_request",
]

PROTOCOL_VERSION = 1


def decode_response(payload: Any) -> Any:
    """The result of a response envelope, or raise the error it carries."""
    if type(payload) is dict:
        ok = payload.get("ok")
        if ok is True:
            return payload.get("result")
        if ok is False:
            raise error_from_wire(payload.get("error"))
    raise ProviderError(
        f"target answered something that is not a response envelope: {payload!r:.200}"
    )


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


def ok_response(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_response(error: DispatchError) -> dict[str, Any]:
    return {"ok": False, "error": error.to_wire()}


@dataclass(frozen=True, slots=True)
class RequestEnvelope:
    """A request envelope as a plugin receives it."""

    plugin: str
    method: str
    params: Any
    context: dict[str, Any]

    @property
    def deadline_ms(self) -> int | None:
        value = self.context.get("deadline_ms")
        return value if isinstance(value, int) else None


def parse_request(payload: Any) -> RequestEnvelope:
    """Check the shape of one request envelope; a bad one raises ``ProviderError``."""
    if not isinstance(payload, dict):
        raise ProviderError("request envelope must be a JSON object")
    version = payload.get("v")
    if version != PROTOCOL_VERSION:
        raise ProviderError(
            f"unsupported envelope version {version!r}; this plugin speaks v{PROTOCOL_VERSION}"
        )
    method = payload.get("method")
    if not isinstance(method, str) or not method:
        raise ProviderError("request envelope needs a non-empty string 'method'")
    plugin = payload.get("plugin", "")
    context = payload.get("context") or {}
    if not isinstance(plugin, str) or not isinstance(context, dict):
        raise ProviderError("request envelope 'plugin' must be a string and 'context' an object")
    return RequestEnvelope(plugin, method, payload.get("params"), context)
