"""How far a failed attempt got: the rule that decides whether the provider may resend it.

Free of I/O, so the rule is tested on its own (``tests/test_knative.py``).

    never reached the plugin  (``Failure.NOT_REACHED``) → the provider resends it
        - the TCP connection to the ingress could not be made (no byte was sent);
        - a 503 the platform made: no CloudEvent headers, not a CloudEvent or envelope
          body. The activator and queue-proxy answer 503 only *before* they forward a
          request (no capacity within the activation timeout, queue full); once they have
          forwarded it, a failure of the pod comes back as 502 (Go's ReverseProxy default).
          Functions served by ``linchkit_plugin`` never answer a bare 503 on the invoke path,
          so a bare 503 cannot be the plugin's.
    may have reached the plugin (``Failure.MAYBE_REACHED``) → raised at once, retryable
        - 502 (the pod failed while or after receiving the request);
        - a connection reset or disconnect after the request was written.
    anything else (``Failure.FINAL``) → raised as it is
        - 200 with a bad body, 4xx, 500, 504, timeouts.

Whether a call that may have run is sent again depends on whether its method is
idempotent, which is policy: the dispatcher's retry policy decides (``provider.py`` says
why the provider never does).
"""

from __future__ import annotations

from enum import Enum

import orjson

__all__ = ["Failure", "classify_failure", "made_by_function"]


class Failure(Enum):
    """How far a failed attempt got, which decides who may send it again."""

    NOT_REACHED = "not_reached"  # provably never reached the plugin: the provider resends
    MAYBE_REACHED = "maybe_reached"  # may have run: raised, the dispatcher's policy decides
    FINAL = "final"  # an answer to report as it is


def classify_failure(
    *,
    connect_failed: bool = False,
    reset: bool = False,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Failure:
    """Sort one failed attempt (module docstring); ``headers`` with lower-case names."""
    if connect_failed:
        return Failure.NOT_REACHED
    if reset:
        return Failure.MAYBE_REACHED
    if status == 503 and not made_by_function(headers or {}, body):
        return Failure.NOT_REACHED
    if status == 502:
        return Failure.MAYBE_REACHED
    return Failure.FINAL


def made_by_function(headers: dict[str, str], body: bytes) -> bool:
    """Whether an answer comes from the function (a CloudEvent or an envelope), not the platform."""
    if "ce-specversion" in headers or headers.get("content-type", "").startswith(
        "application/cloudevents"
    ):
        return True
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "ok" in payload
