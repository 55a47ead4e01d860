"""What a gateway caller is told of a failure that is the infrastructure's, not the plugin's
(the rule, its types and fixed messages: ``dispatcher._public_errors``).

The dispatcher's own errors are written for the operator: ``http http://10.0.0.7:8080/invoke
did not answer within 4000 ms``, a target's raw answer (``answered HTTP 418: b'<html>…'``),
an inbound plugin's peer address. Handed to any caller of the gateway as they are, they
map the network behind it. With ``error_detail: safe`` (the default) the gateway answers
these types with a fixed message per type, keeping the type, ``retryable``,
``retry_after`` and the ``details`` a client acts on (``stage``: whether the call ran), and
logs the whole message for the operator with the request id (at most one line per
plugin, method and type every ``LOG_EVERY_SECONDS``, with how many it did not log: under
a storm of one failure, the first call's id stands for the rest; names and message cut,
on one line, since a call refused before its names resolved is logged with the caller's).
Names that are not the manifest's (made up by a caller, and refused before they were
resolved: while the dispatcher drains) are no key of their own, which each made-up name
would be: those answers are logged sparingly, all together (the first, the 1,000th, every
100,000th: ``providers._log_lines``). What the plugin or the caller caused is
answered as written: a plugin's own error (its message is the plugin's, to its caller),
``invalid_params``, ``rate_limited``, ``forbidden`` and the rest. ``error_detail: full``
answers every message as written (a gateway whose callers are its operators).

A job's record and result are told the same way (``Disclosure.job``), without a log line:
the store keeps the whole record for the operator. A job submitted through a gateway
answering ``safe`` is marked so, and its callback tells its errors the same way
(``dispatcher._job_callbacks``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dispatcher._public_errors import (
    PUBLIC_DETAILS,
    PUBLIC_MESSAGES,
    ErrorDetail,
    public_job,
    public_message,
)
from dispatcher.config import Manifest
from linchkit_plugin.errors import DispatchError
from providers._log_lines import printable, sparingly

__all__ = ["Disclosure", "ErrorDetail", "ManifestNames"]

log = logging.getLogger("dispatcher.gateway")

#: One log line per plugin, method and error type at most this often.
LOG_EVERY_SECONDS = 10.0
#: The most of a plugin or method name, and of a message, that a log line quotes.
LOGGED_NAME_CHARS = 256
LOGGED_MESSAGE_CHARS = 4096


class Disclosure:
    """Turns a call's error into what its caller is told (``safe``), logging the rest."""

    def __init__(
        self,
        detail: ErrorDetail = "safe",
        clock: Callable[[], float] = time.monotonic,
        *,
        known: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.detail = detail
        self._clock = clock
        #: Whether a plugin and method are the manifest's (``ManifestNames``); None: every
        #: name is taken for one.
        self._known = known
        #: (plugin, method, type) → (when last logged, how many since not logged)
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}
        #: Answers to calls naming no plugin and method of the manifest, logged or not.
        self.made_up = 0

    def public(
        self, error: DispatchError, plugin: str, method: str, request_id: str
    ) -> DispatchError:
        """``error`` as the caller is told it: as written, or its type's fixed message."""
        told = self.told(type(error).type, plugin, method)
        if told is None:
            return error
        if self._known is None or self._known(plugin, method):
            self._log(error, plugin, method, request_id)
        else:
            self._log_made_up(error, plugin, method, request_id)
        return _told(error, told)

    def public_job_error(
        self, error: DispatchError, route: str, about: str, request_id: str
    ) -> DispatchError:
        """An error of a job ``route`` (``submit``, ``read``), ``about`` naming what it was
        for (``PLUGIN.METHOD:submit``, ``job ID``), as its caller is told it. Those routes
        reach the job store, never a plugin: its failures are told as the store's, the
        rest with a call's fixed message. Logged at most once per route and type a while."""
        kind = type(error).type
        generic = _JOB_STORE_MESSAGES.get(kind) or PUBLIC_MESSAGES.get(kind)
        if self.detail == "full" or generic is None:
            return error
        self._log(error, "jobs", route, request_id)
        return _told(error, f"{about}: {generic}")

    def told(self, kind: str, plugin: str, method: str) -> str | None:
        """What a caller is told of an error of type ``kind``; None: its own message."""
        return None if self.detail == "full" else public_message(kind, plugin, method)

    def job(self, status: dict[str, Any]) -> dict[str, Any]:
        """A job's status record (``Dispatcher.job``) as its caller is told it: its errors
        as a call's would be. Nothing is logged: the store keeps the whole record, which
        the operator reads with ``dispatcher job ID``."""
        return status if self.detail == "full" else public_job(status)

    def _log(self, error: DispatchError, plugin: str, method: str, request_id: str) -> None:
        # The names are the caller's when the call was refused before they were resolved
        # (while the dispatcher drains, or its audit log is behind), and so is the message
        # that quotes them: each is logged on one line and cut, and so kept as a key.
        plugin = _one_line(plugin, LOGGED_NAME_CHARS)
        method = _one_line(method, LOGGED_NAME_CHARS)
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
            _one_line(error.message, LOGGED_MESSAGE_CHARS),
            also,
        )

    def _log_made_up(self, error: DispatchError, plugin: str, method: str, request_id: str) -> None:
        """A caller chooses how many names it makes up, not how many lines the host
        writes: one key per name (or a clear of the keys every 10,000 of them, which made
        the manifest's own log again) let a drain's worth of made-up names log a line each."""
        self.made_up += 1
        if not sparingly(self.made_up):
            return
        log.warning(
            "request %s %s.%s answered %s: %s (%d answers so far to calls naming no plugin"
            " and method of the manifest, logged sparingly)",
            request_id,
            _one_line(plugin, LOGGED_NAME_CHARS),
            _one_line(method, LOGGED_NAME_CHARS),
            type(error).type,
            _one_line(error.message, LOGGED_MESSAGE_CHARS),
            self.made_up,
        )

    def __repr__(self) -> str:
        return f"<Disclosure {self.detail} made_up={self.made_up}>"


class ManifestNames:
    """Whether a plugin and method are named by the manifest ``manifest()`` returns (a
    host's dispatcher's: after a reload, the new one's), any version of the plugin."""

    def __init__(self, manifest: Callable[[], Manifest[Any]]) -> None:
        self._manifest = manifest
        self._seen: Manifest[Any] | None = None
        self._names: frozenset[tuple[str, str]] = frozenset()

    def __call__(self, plugin: str, method: str) -> bool:
        manifest = self._manifest()
        if manifest is not self._seen:
            self._seen = manifest
            self._names = frozenset(
                (spec.id, name) for spec in manifest.plugins for name in spec.methods
            )
        return (plugin, method) in self._names

    def __repr__(self) -> str:
        return f"<ManifestNames {len(self._names)}>"


#: What a job route's caller is told of the job store's own failures (Redis or SQS down,
#: or too slow; an entry in it no dispatcher wrote) instead of a call's "the plugin could
#: not be reached" or "the plugin's target answered outside the protocol": a job route
#: reaches the store, never a plugin.
_JOB_STORE_MESSAGES = {
    "target_unavailable": "the job store could not be reached",
    "deadline_exceeded": "the job store did not answer in time",
    "provider_error": "the job store holds an entry no dispatcher wrote",
}


def _one_line(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, its line breaks and other unprintable
    characters escaped: a line break in a name a caller chose would start a log record of
    the caller's making in the text format (whichever formatter the host's log has)."""
    if len(text) > most:
        text = text[:most] + "…"
    return printable(text)


def _told(error: DispatchError, told: str) -> DispatchError:
    public = error.with_message(f"{told} (the gateway logs the detail)")
    public.details = {k: v for k, v in error.details.items() if k in PUBLIC_DETAILS}
    return public
