"""The wire envelope shared by every JSON transport (``docs/protocol.md``).

Both sides use this one module: a plugin parses request envelopes and encodes responses;
the host encodes requests and decodes responses (``providers.envelope`` adds the batch
form). The JSON Schema of the same shapes is ``proto/envelope.schema.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import orjson

from linchkit_plugin.errors import DispatchError, InvalidParams, ProviderError, error_from_wire

__all__ = [
    "MAX_PARAMS_DEPTH",
    "PROTOCOL_VERSION",
    "RequestEnvelope",
    "checked_ok_response",
    "decode_response",
    "encode_json",
    "encode_result",
    "error_response",
    "event_name_refused",
    "json_fragment",
    "nested_deeper_than",
    "not_unicode",
    "ok_response",
    "parse_request",
    "result_fragment",
    "well_formed",
]

PROTOCOL_VERSION = 1

_log = logging.getLogger("linchkit_plugin")
# orjson writes at most 254 levels of nesting; an answer holding the params one level
# down (``{"ok": true, "result": params}``) must still encode. Every transport of the SDK
# refuses params nested deeper as ``invalid_params`` (docs/protocol.md).
MAX_PARAMS_DEPTH = 250


def encode_json(value: Any, *, sort_keys: bool = False) -> bytes:
    """``value`` as JSON bytes; anything JSON cannot carry is the caller's ``InvalidParams``.

    Every path that puts params on a wire (or keys a cache by them) encodes here, so what
    counts as valid params is decided once: no NaN or infinity (orjson would write them
    as ``null``, silently changing the call), no nesting over 255 levels, no objects JSON
    has no form for.
    """
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    except TypeError as error:
        raise InvalidParams(f"params must be JSON-serializable: {error}") from None
    # Where NaN or infinity went, if there were any: look only then. ``find``, not ``in``:
    # ``in`` first tries the needle as an integer and clears the TypeError (+50 ns a call).
    if data.find(b"null") >= 0 and (number := _first_non_finite(value)) is not None:
        raise InvalidParams(f"params must be JSON: {number!r} is not a JSON number")
    # orjson 3.13 hands back its whole working buffer: a 150-byte envelope holds 4 KB, a
    # 100 KB one 0.9 MB, for as long as the bytes live (a call in flight, a cache key). A
    # copy of exactly the document's size costs 30-40 ns (bench/bench_http_inflight.py).
    return b"%b" % data


def json_fragment(value: Any) -> bytes:
    """``encode_json(value)`` to be copied into a larger document at once, and not kept:
    the same checks, without the copy (the bytes may hold orjson's whole buffer)."""
    try:
        data = orjson.dumps(value)
    except TypeError as error:
        raise InvalidParams(f"params must be JSON-serializable: {error}") from None
    if data.find(b"null") >= 0 and (number := _first_non_finite(value)) is not None:
        raise InvalidParams(f"params must be JSON: {number!r} is not a JSON number")
    return data


def encode_result(value: Any, what: str = "the plugin's result") -> bytes:
    """``result_fragment(value, what)`` copied down to its size, for bytes that are kept:
    a frame waiting in a writer's queue, an event waiting for its host (``encode_json``
    says why orjson's own bytes are not kept)."""
    return b"%b" % result_fragment(value, what)


def result_fragment(value: Any, what: str = "the plugin's result") -> bytes:
    """``value``, an answer or a frame holding what a plugin's method returned, as JSON;
    what JSON cannot carry is ``ProviderError`` (saying ``what`` is not JSON): that call's
    answer, on every transport. The bytes may hold orjson's whole buffer: send them (or
    copy them into a message) at once, do not keep them (``encode_result``).

    A NaN or an infinity is refused, not written as ``null`` as orjson would: a result of
    ``{"score": nan}`` must not reach the host as ``{"score": null}``, a different answer
    (until 2026-12-07 the HTTP and gRPC bindings sent it so, and the WebSocket binding
    refused it in words about params).
    """
    try:
        data = orjson.dumps(value)
    except TypeError as error:
        raise ProviderError(f"{what} is not JSON: {_why_not_json(error)}") from None
    if data.find(b"null") >= 0 and (number := _first_non_finite(value)) is not None:
        raise ProviderError(f"{what} is not JSON: {number!r} is not a JSON number")
    return data


def _why_not_json(error: TypeError) -> str:
    """orjson's refusal in the words every SDK uses for it (docs/protocol.md).

    A str holding a lone surrogate (bytes decoded with ``errors="surrogateescape"``, half
    of an emoji cut from a UTF-16 source) has no UTF-8 form: orjson says "str is not
    valid UTF-8: surrogates not allowed", the other SDKs say what the rule is."""
    reason = str(error)
    if reason.endswith("surrogates not allowed"):
        return "a string is not valid Unicode (a lone surrogate)"
    return reason


def nested_deeper_than(value: Any, max_depth: int) -> bool:
    """Whether ``value`` (decoded JSON) nests objects and arrays past ``max_depth`` levels.

    Level by level, without recursion: a hostile document has no stack to blow here, and
    whoever asks refuses it before anything that recurses (validation, encoding) sees it.
    """
    level: list[Any] = [value] if isinstance(value, dict | list) else []
    for _ in range(max_depth):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _first_non_finite(value: Any) -> float | None:
    """A float in ``value`` that is NaN or infinite, if there is one.

    Runs whenever the JSON holds a ``null`` (orjson writes non-finite floats so), which
    optional fields make common. A loop over a stack, the exact types first: with the
    recursive walk it replaced, encoding 10,000 small records took 10.3-10.5 ms, 18 times
    orjson's own 0.58 ms; now 5.2-5.4 ms (``bench/bench_wire.py``)."""
    stack = [value]
    pop = stack.pop
    push = stack.extend
    while stack:
        item = pop()
        kind = item.__class__
        if kind is dict:
            push(item.values())
        elif kind is list or kind is tuple:
            push(item)
        elif kind is str or kind is int or item is None or kind is bool:
            continue
        elif isinstance(item, float):  # float and its subclasses
            if not math.isfinite(item):
                return float(item)
        elif isinstance(item, dict):
            push(item.values())
        elif isinstance(item, list | tuple):
            push(item)
    return None


def decode_response(payload: Any) -> Any:
    """The result of a response envelope, or raise the error it carries.

    ``{"ok": true}`` without ``result`` is refused (``ProviderError``): the schema requires
    it, and reading it as ``null`` would turn a broken target into a silent wrong answer.
    """
    if type(payload) is dict:
        ok = payload.get("ok")
        if ok is True:
            try:
                return payload["result"]
            except KeyError:
                raise ProviderError(
                    "target answered ok without a 'result' (send \"result\": null for no value)"
                ) from None
        if ok is False:
            raise error_from_wire(payload.get("error"))
    raise ProviderError(
        f"target answered something that is not a response envelope: {payload!r:.200}"
    )


def ok_response(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_response(error: DispatchError) -> dict[str, Any]:
    wire = error.to_wire()
    if len(wire) > 3:  # details or a retry_after, which a plugin may have set to no JSON
        _leave_out_what_json_cannot_carry(wire)
    wire["type"] = well_formed(wire["type"])
    wire["message"] = well_formed(wire["message"])
    return {"ok": False, "error": wire}


def not_unicode(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate, which has no UTF-8 form (one look at an
    ASCII text, the usual name)."""
    if text.isascii():
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def well_formed(text: str) -> str:
    """``text`` with U+FFFD for each lone surrogate, which has no UTF-8 form: an error's
    message or type holding one (a file name decoded with ``surrogateescape``) is sent so,
    not refused, which would hide the error. Two that make a pair become its character."""
    if not_unicode(text):
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def event_name_refused(event: str) -> bool:
    """Whether ``event``'s name has no UTF-8 form, said once here for every transport that
    sends events: a gRPC string field cannot carry it (sent, it ended the host's whole
    Events stream), nor a WebSocket frame."""
    if not not_unicode(event):
        return False
    _log.warning("event %r not sent: its name is not valid Unicode (a lone surrogate)", event)
    return True


def _leave_out_what_json_cannot_carry(wire: dict[str, Any]) -> None:
    """Drop an error's ``details`` or ``retry_after`` JSON has no form for (a NaN, an
    infinity, an object), not the error: its type and message are what its caller acts
    on. Until 2026-12-07 a NaN there went as ``null``; checked as a result is, it would
    have turned the plugin's own error into one about its result."""
    retry_after = wire.get("retry_after")
    if isinstance(retry_after, float) and not math.isfinite(retry_after):
        del wire["retry_after"]
    if "details" in wire:
        try:
            result_fragment(wire["details"])
        except ProviderError:
            del wire["details"]


def checked_ok_response(result: Any) -> dict[str, Any]:
    """``ok_response(result)``, or that call's ``ProviderError`` when JSON cannot carry
    ``result``: for runtimes that encode the answer themselves. Lambda's writes a NaN as a
    bare ``NaN`` token (no JSON) and fails the whole invocation on an object JSON has no
    form for; func-python answered that with a plain 500, which the host took for a
    target down and retried."""
    answer = ok_response(result)
    try:
        result_fragment(answer)
    except ProviderError as error:
        return error_response(error)
    return answer


@dataclass(frozen=True, slots=True)
class RequestEnvelope:
    """A request envelope as a plugin receives it."""

    plugin: str
    method: str
    params: Any
    context: dict[str, Any]

    @property
    def deadline_ms(self) -> int | None:
        """The call's time in milliseconds; None when it has none. Only a positive integer
        bounds a call (docs/protocol.md): 0 is unset, and a negative value is a host's
        mistake, not a call already late (it failed at once on HTTP, Lambda and Knative)."""
        value = self.context.get("deadline_ms")
        return value if type(value) is int and value > 0 else None


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
