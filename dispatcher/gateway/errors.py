"""A call's error as an HTTP answer: its status, the error envelope, the headers it needs.

One table, the same for every route (``docs/gateway.md``), consistent with the plugin
SDK's HTTP server and the HTTP provider's mapping (``providers/http.py``):

    type                                status  headers
    invalid_params                      400     (413 body too large, 415 not JSON or a
                                                coding not decoded, 431 a line of the head
                                                too long: the gateway's own refusals, same
                                                type)
    unauthorized                        401     WWW-Authenticate: Bearer
    forbidden                           403
    plugin_not_found, method_not_found, 404
    job_not_found (or another caller's)
    job_expired                         410     a submission's Idempotency-Key names a
                                                job no longer kept
    rate_limited                        429     Retry-After
    plugin_error (the plugin raised)    500     the plugin's own type in the envelope
    result_too_large                    500     a job's result over jobs.max_result_bytes
    provider_error                      502     the target broke the contract
    target_unavailable, circuit_open,   503     Retry-After
    overloaded, shutting_down
    deadline_exceeded                   504     (408 when the request body was too slow)
    jobs_unavailable                    501     the state backend keeps no jobs (memory)

``Retry-After`` carries the error's ``retry_after`` rounded up to whole seconds, or 1 for
a retryable 429/503 that knows no better, so clients that honour it back off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import orjson
from aiohttp import web

from linchkit_plugin.errors import DispatchError

__all__ = ["STATUS_BY_TYPE", "Answer", "answer_of", "error_answer", "status_of", "written"]

STATUS_BY_TYPE: Mapping[str, int] = {
    "invalid_params": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "plugin_not_found": 404,
    "method_not_found": 404,
    "job_not_found": 404,
    "job_expired": 410,
    "rate_limited": 429,
    "plugin_error": 500,
    "result_too_large": 500,
    "provider_error": 502,
    "target_unavailable": 503,
    "circuit_open": 503,
    "overloaded": 503,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "jobs_unavailable": 501,
}

_RETRY_LATER = frozenset({429, 503})
_REASONS = {status.value: status.phrase for status in HTTPStatus}


def status_of(error: DispatchError) -> int:
    # PluginError.type is "plugin_error" whatever its remote type; any other subclass of
    # DispatchError a provider invents is the target's failure, hence 502.
    return STATUS_BY_TYPE.get(type(error).type, 502)


class Answer(NamedTuple):
    """An answer as the gateway's two HTTP stacks both write it (aiohttp's route, the
    call lane of ``dispatcher.gateway.lane``)."""

    status: int
    headers: dict[str, str]
    body: bytes


def answer_of(error: DispatchError, *, status: int | None = None, close: bool = False) -> Answer:
    """The answer carrying ``error`` (``status`` overrides the table: 408, 413, 415)."""
    status = status_of(error) if status is None else status
    headers = {"Content-Type": "application/json"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in _RETRY_LATER and error.retryable:
        after = error.retry_after
        seconds = math.ceil(after) if after is not None and math.isfinite(after) else 1
        headers["Retry-After"] = str(max(1, min(seconds, 86_400)))
    if close:
        # The body may be unread: the rest must not be taken for the next request.
        headers["Connection"] = "close"
    return Answer(status, headers, orjson.dumps({"ok": False, "error": _wire(error)}))


def error_answer(
    error: DispatchError, *, status: int | None = None, close: bool = False
) -> web.Response:
    """``answer_of`` as aiohttp's response."""
    answer = answer_of(error, status=status, close=close)
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def _wire(error: DispatchError) -> dict[str, object]:
    wire = error.to_wire()
    try:
        orjson.dumps(wire)
    except TypeError:  # a plugin's details that JSON cannot carry: keep what it can
        wire.pop("details", None)
    return wire


def written(answer: Answer, close: bool) -> bytes:
    """``answer`` as the bytes of an HTTP/1.1 response, for what writes them itself (the
    call lane, the listener refusing a connection) rather than through aiohttp."""
    status, headers, body = answer
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Length: {len(body)}\r\nDate: {_http_date()}\r\n"
    ]
    for name, value in headers.items():
        if name != "Connection":
            lines.append(f"{name}: {value}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body


_date = (0, "")


def _http_date() -> str:
    """``Date``'s value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]
