"""What a gateway caller is told of a failure that is the infrastructure's, not the plugin's.

The dispatcher's own errors are written for the operator: ``http http://10.0.0.7:8080/invoke
did not answer within 4000 ms``, a target's raw answer (``answered HTTP 418: b'<html>…'``),
an inbound plugin's peer address. Handed to any caller of the gateway as they are, they
map the network behind it. With ``error_detail: safe`` (the default) the gateway answers
these types with a fixed message per type, keeping the type, ``retryable``,
``retry_after`` and the ``details`` a client acts on (``stage``: whether the call ran), and
logs the whole message for the operator with the request id (at most one line per
plugin, method and type every ``LOG_EVERY_SECONDS``, with how many it did not log: under
a storm of one failure, the first call's id stands for the rest). What the plugin or the caller caused is
answered as written: a plugin's own error (its message is the plugin's, to its caller),
``invalid_params``, ``rate_limited``, ``forbidden`` and the rest. ``error_detail: full``
answers every message as written (a gateway whose callers are its operators).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Literal

from linchkit_plugin.errors import DispatchError

__all__ = ["Disclosure", "ErrorDetail"]

log = logging.getLogger("dispatcher.gateway")

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

#: One log line per plugin, method and error type at most this often.
LOG_EVERY_SECONDS = 10.0


class Disclosure:
    """Turns a call's error into what its caller is told (``safe``), logging the rest."""

    def __init__(
        self, detail: ErrorDetail = "safe", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.detail = detail
        self._clock = clock
        #: (plugin, method, type) → (when last logged, how many since not logged)
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}

    def public(
        self, error: DispatchError, plugin: str, method: str, request_id: str
    ) -> DispatchError:
        """``error`` as the caller is told it: as written, or its type's fixed message."""
        told = self.told(type(error).type, plugin, method)
        if told is None:
            return error
        self._log(error, plugin, method, request_id)
        public = error.with_message(f"{told} (the gateway logs the detail)")
        public.details = {k: v for k, v in error.details.items() if k in PUBLIC_DETAILS}
        return public

    def told(self, kind: str, plugin: str, method: str) -> str | None:
        """What a caller is told of an error of type ``kind``; None: its own message."""
        generic = PUBLIC_MESSAGES.get(kind)
        if self.detail == "full" or generic is None:
            return None
        return f"{plugin}.{method}: {generic}"

    def _log(self, error: DispatchError, plugin: str, method: str, request_id: str) -> None:
        key = (plugin, method, type(error).type)
        now = self._clock()
        last, unlogged = self._logged.get(key, (-LOG_EVERY_SECONDS, 0))
        if now - last < LOG_EVERY_SECONDS:
            self._logged[key] = (last, unlogged + 1)
            return
        if len(self._logged) >= 10_000:  # keys come from the manifest, but stay bounded
            self._logged.clear()
        self._logged[key] = (now, 0)
        also = f" ({unlogged} more like it not logged)" if unlogged else ""
        log.warning(
            "request %s %s.%s answered %s: %s%s",
            request_id,
            plugin,
            method,
            type(error).type,
            error.message,
            also,
        )

    def __repr__(self) -> str:
        return f"<Disclosure {self.detail}>"
