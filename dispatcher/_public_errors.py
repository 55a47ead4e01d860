"""What a caller outside is told of a failure that is the infrastructure's, not the plugin's:
the rule, shared by whatever tells it. The gateway's ``Disclosure``
(``dispatcher.gateway.disclosure``, which also logs the whole message) applies it to
calls' answers and ``/v1/errors``; the gateway's job routes to job records and results;
``dispatcher._job_callbacks`` to the record a job submitted through such a gateway POSTs.

The dispatcher's own messages name targets, their addresses and raw answers. Under
``error_detail: safe`` an error of a type in ``PUBLIC_MESSAGES`` is told as
``PLUGIN.METHOD: <its type's fixed message>``, keeping its type, ``retryable``,
``retry_after`` and the ``details`` in ``PUBLIC_DETAILS``. Every other type is told as
written: a plugin's own error (its message is the plugin's, to its caller) and what the
caller caused. ``error_detail: full`` tells every message as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

__all__ = [
    "PUBLIC_DETAILS",
    "PUBLIC_MESSAGES",
    "ErrorDetail",
    "public_job",
    "public_message",
    "public_wire",
]

ErrorDetail = Literal["safe", "full"]

#: The types whose messages the dispatcher writes about its targets, and what a caller
#: is told instead.
PUBLIC_MESSAGES: Mapping[str, str] = {
    "target_unavailable": "the plugin could not be reached",
    "deadline_exceeded": "no answer within the call's deadline",
    "provider_error": "the plugin's target answered outside the protocol",
    "circuit_open": "calls to the plugin are refused for now: it failed too often",
    "overloaded": "the dispatcher has no room for this call now",
    "shutting_down": "the dispatcher is shutting down",
}

#: ``details`` a client acts on, kept in a safe answer (anything else may name a target).
PUBLIC_DETAILS = frozenset({"stage", "state"})

#: What a job's told error says of where the rest is: the store keeps its whole record.
_JOB_DETAIL = " (the dispatcher keeps the detail with the job)"
#: A job record's fields holding an error, as ``dispatcher._jobs.job_status`` reads it.
_JOB_ERRORS = ("error", "previous_error")


def public_message(kind: str, plugin: str, method: str) -> str | None:
    """What a caller is told, under ``safe``, of an error of type ``kind`` of a call of
    ``plugin.method``; None: its own message."""
    generic = PUBLIC_MESSAGES.get(kind)
    return None if generic is None else f"{plugin}.{method}: {generic}"


def public_wire(wire: Any, plugin: str, method: str, suffix: str = "") -> Any:
    """An error as the wire carries it (``DispatchError.to_wire``) as a caller is told it
    under ``safe``: its type's fixed message (and ``suffix``) and the public details; as it
    is when its type is told as written, or when it is not an error object at all."""
    if not isinstance(wire, dict):
        return wire
    told = public_message(str(wire.get("type")), plugin, method)
    if told is None:
        return wire
    public = {**wire, "message": told + suffix}
    details = wire.get("details")
    kept = (
        {name: value for name, value in details.items() if name in PUBLIC_DETAILS}
        if isinstance(details, dict)
        else {}
    )
    if kept:
        public["details"] = kept
    else:
        public.pop("details", None)
    return public


def public_job(status: dict[str, Any]) -> dict[str, Any]:
    """A job's status record (``dispatcher._jobs.job_status``) as a caller is told it
    under ``safe``: its ``error`` and ``previous_error`` by ``public_wire``."""
    plugin, method = str(status.get("plugin")), str(status.get("method"))
    public = dict(status)
    for field in _JOB_ERRORS:
        if field in public:
            public[field] = public_wire(public[field], plugin, method, _JOB_DETAIL)
    return public
