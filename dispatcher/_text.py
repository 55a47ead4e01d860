"""Text an in-process caller hands the dispatcher, checked before anything runs.

A Python ``str`` may hold a lone surrogate (``"\\ud800"``: half of a UTF-16 pair, what
``surrogateescape`` makes of bytes that are not UTF-8), which UTF-8 cannot encode. Every
place a call's strings reach encodes them: the idempotency record's key, a limit's key per
caller, a job's record, the envelope or metadata a remote plugin is sent, the audit log.
Unchecked, such a string failed in whichever came first with a bare ``UnicodeEncodeError``
(or orjson's ``TypeError``), a traceback instead of an answer, sometimes after a step of
the call had run. ``checked_call_text`` refuses it with ``InvalidParams`` first, naming the
argument and never quoting it; ``encodable_text`` is what a record may keep of it.

Names the manifest holds (plugin, method) and versions need no check here: one that is not
the manifest's is refused by the routing table (``PluginNotFound``, ``MethodNotFound``,
``InvalidParams`` for a version range), and its words reach no store. The gateway's own
inputs are checked where it reads them (``dispatcher.gateway.call_headers``); params by
the wire's JSON check (``linchkit_plugin.wire``).
"""

from __future__ import annotations

from linchkit_plugin.errors import InvalidParams

__all__ = ["checked_call_text", "checked_text", "encodable_text"]


def checked_call_text(
    caller: str | None,
    request_id: str | None,
    traceparent: str | None,
    idempotency_key: str | None,
) -> None:
    """``InvalidParams`` if one of a call's strings cannot be encoded. Every call passes
    here: an ASCII string (nearly all of them) costs a flag's test (``str.isascii``)."""
    if not (
        (caller is None or caller.isascii())
        and (request_id is None or request_id.isascii())
        and (traceparent is None or traceparent.isascii())
        and (idempotency_key is None or idempotency_key.isascii())
    ):
        checked_text(caller, "caller")
        checked_text(request_id, "request_id")
        checked_text(traceparent, "traceparent")
        checked_text(idempotency_key, "idempotency_key")


def checked_text(value: object, name: str) -> None:
    """``InvalidParams`` if ``value`` is a string UTF-8 cannot encode (a lone surrogate)."""
    if not isinstance(value, str) or value.isascii():
        return
    try:
        value.encode()
    except UnicodeEncodeError as error:
        raise InvalidParams(
            f"{name} is not text UTF-8 can encode: it holds a lone surrogate at character"
            f" {error.start} (bytes that were not UTF-8, decoded with surrogateescape?)"
        ) from None


def encodable_text(value: str) -> str:
    """``value`` as a record encoded in UTF-8 may keep it: a lone surrogate written as its
    escape (``\\ud800``), the rest as it is."""
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
