"""What a call's headers say, read the same way by every gateway route that takes a call
(aiohttp's, the call lane's, ``:submit``) and, for the names and limits, by the gRPC
gateway: the request id, the trace context, the deadline, the version, the idempotency
key. Each reader refuses a bad value with ``InvalidParams``; the ``checked_…`` functions
are the rules both ports apply, given the name the value came under."""

from __future__ import annotations

import re
from collections.abc import Mapping

from dispatcher._versions import MAX_RANGE_LENGTH
from dispatcher.policies.idempotency import checked_idempotency_key
from linchkit_plugin.errors import InvalidParams

__all__ = [
    "MAX_TIMEOUT_MS",
    "REQUEST_ID",
    "TRACEPARENT",
    "capped_timeout",
    "checked_idempotency_key",
    "checked_version",
    "idempotency_key_of",
    "timeout_of",
    "version_of",
]

#: W3C trace context: an invalid one is ignored, not refused.
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
#: The longest deadline a caller may ask for: a day.
MAX_TIMEOUT_MS = 86_400_000


def timeout_of(headers: Mapping[str, str]) -> float | None:
    """The call's deadline in seconds from ``X-Timeout-Ms`` or ``Request-Timeout``."""
    milliseconds = headers.get("X-Timeout-Ms")
    if milliseconds is not None:
        # ASCII digits only: "²" is a digit to isdigit() and not to int().
        if (
            milliseconds.isascii()
            and milliseconds.isdigit()
            and 0 < int(milliseconds) <= MAX_TIMEOUT_MS
        ):
            return int(milliseconds) / 1000
        raise InvalidParams(f"X-Timeout-Ms is an integer in [1, {MAX_TIMEOUT_MS}]")
    seconds = headers.get("Request-Timeout")
    if seconds is not None:
        try:
            value = float(seconds)
        except ValueError:
            value = 0.0
        if 0 < value <= MAX_TIMEOUT_MS / 1000:  # NaN fails
            return value
        raise InvalidParams("Request-Timeout is a number of seconds in (0, 86400]")
    return None


def capped_timeout(timeout: float | None, max_timeout_ms: int | None) -> float | None:
    """The deadline a caller asked for (seconds; None: it asked for none), cut to the
    gateway's ``max_timeout_ms`` when that is set: a longer one is shortened, not
    refused, as Envoy's ``max_grpc_timeout`` does. None stays None, so a call that asks
    for nothing keeps its method's own ``timeout_ms``, whatever the cap."""
    if timeout is None or max_timeout_ms is None:
        return timeout
    return min(timeout, max_timeout_ms / 1000)


def version_of(headers: Mapping[str, str]) -> str | None:
    """``X-Plugin-Version``: bytes that are not UTF-8 arrive as lone surrogates, which the
    audit log and the error's JSON cannot encode: refused with the rest."""
    version: str | None = headers.get("X-Plugin-Version")
    return None if version is None else checked_version(version, "X-Plugin-Version")


def checked_version(version: str, name: str) -> str:
    """``version`` if it is 1 to ``MAX_RANGE_LENGTH`` printable characters (a version or
    range is no more); else the refusal, naming the header or field (``name``) it came
    in. One rule for every port: a control character would reach the routes' refusal
    and the audit log."""
    if not (0 < len(version) <= MAX_RANGE_LENGTH and version.isprintable()):
        raise InvalidParams(
            f"{name} is a version or range: 1-{MAX_RANGE_LENGTH} printable characters"
        )
    return version


def idempotency_key_of(headers: Mapping[str, str]) -> str | None:
    """``Idempotency-Key``: 1 to ``MAX_KEY_LENGTH`` printable characters, what the
    dispatcher takes. Bytes that are not UTF-8 arrive as lone surrogates, which no store
    can encode: refused here, not a 500 there."""
    key: str | None = headers.get("Idempotency-Key")
    return None if key is None else checked_idempotency_key(key, "Idempotency-Key")
