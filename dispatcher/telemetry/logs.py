"""Structured logs: every line of a call says which call it belongs to.

``CallContextFilter`` adds ``request_id``, ``trace_id``, ``plugin``, ``method`` (and
``instance`` where a provider gave one) to each record, read from the call in progress
(``CURRENT_CALL``, set by the telemetry step of ``Dispatcher.call``) — so a log line of a
policy, a provider or a local plugin, written anywhere below the call, carries them
without being passed anything. Lines a subprocess plugin writes on its stderr arrive on
the logger ``dispatcher.plugin.<id>`` outside any call: the filter takes the plugin from
the logger's name and the provider tags the instance.

``JsonFormatter`` writes one JSON object per line (``telemetry.logs.format: json``); the
text format is the usual one with those fields appended. Hosts with their own logging
setup can add the filter and formatter to their handlers instead.

``install`` puts a dispatcher's handler on the ``dispatcher`` logger and stops that
logger's records from propagating to the root logger's handlers while one is installed:
otherwise a host with a root handler (``logging.basicConfig``, ``dispatcher serve``)
wrote each record twice, once in each format — plain lines among JSON ones.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from providers._log_lines import printable
from providers.invocation import Invocation

__all__ = [
    "CURRENT_CALL",
    "CURRENT_TRACE_ID",
    "CallContextFilter",
    "JsonFormatter",
    "OneLineFormatter",
    "TelemetryLogHandler",
    "formatter_for",
    "install",
    "text_formatter",
    "uninstall",
]

#: The call the current task is working on (innermost, for a call made inside a call).
CURRENT_CALL: ContextVar[Invocation | None] = ContextVar("dispatcher_current_call", default=None)
#: The trace id of the current call's span, hex, when it is sampled.
CURRENT_TRACE_ID: ContextVar[str | None] = ContextVar("dispatcher_trace_id", default=None)

#: The logger ``telemetry.logs`` writes (and every logger under it).
LOGGER = "dispatcher"
_FIELDS = ("request_id", "trace_id", "plugin", "method", "instance")
_PLUGIN_LOGGER = "dispatcher.plugin."
#: Longest message a JSON line carries: a plugin flooding one huge line costs a bounded line.
MAX_MESSAGE_CHARS = 16_384


class CallContextFilter(logging.Filter):
    """Adds the current call's fields to every record it sees (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = CURRENT_CALL.get()
        fields = record.__dict__
        if call is not None:
            fields.setdefault("request_id", call.request_id)
            fields.setdefault("plugin", call.plugin)
            fields.setdefault("method", call.method)
            trace_id = CURRENT_TRACE_ID.get()
            if trace_id is not None:
                fields.setdefault("trace_id", trace_id)
        elif record.name.startswith(_PLUGIN_LOGGER):
            fields.setdefault("plugin", record.name[len(_PLUGIN_LOGGER) :])
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for field in _FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # default=str: an `extra` value JSON cannot hold is shown, not lost with the line.
        return orjson.dumps(line, default=str).decode()


def text_formatter() -> logging.Formatter:
    """The text format: the usual line, then the call's fields as ``key=value``."""
    return _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class OneLineFormatter(logging.Formatter):
    """A text format whose every record is one line: a message's line breaks and other
    control characters are escaped (``\\n``, ``\\x1b``), its traceback still follows.

    Messages quote what peers sent: a plugin's error message, the id a plugin reports, a
    name a caller made up. Written as they came, a line break there starts a line of the
    peer's making that reads as the dispatcher's own record, and an escape sequence
    rewrites the operator's terminal. The JSON format escapes them already.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class _TextFormatter(OneLineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{field}={record.__dict__[field]}"
            for field in _FIELDS
            if record.__dict__.get(field) is not None
        )
        return f"{line} [{extras}]" if extras else line


def formatter_for(format: str) -> logging.Formatter:
    """The formatter of ``telemetry.logs.format``: ``json`` or ``text``."""
    return JsonFormatter() if format == "json" else text_formatter()


class TelemetryLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``telemetry.logs`` installs: stderr, the format asked for, the call's
    fields on every record."""

    def __init__(self, format: str, level: int | str) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(formatter_for(format))
        self.addFilter(CallContextFilter())
        self.setLevel(level)


#: Whether the ``dispatcher`` logger propagated before the first handler was installed.
_propagated: list[bool] = []


def install(handler: TelemetryLogHandler) -> None:
    """Add ``handler`` to the ``dispatcher`` logger, which from then on writes its records
    there only (not to the root logger's handlers too) until the last one is removed."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(each, TelemetryLogHandler) for each in logger.handlers):
        _propagated[:] = [logger.propagate]
        logger.propagate = False
    logger.addHandler(handler)


def uninstall(handler: TelemetryLogHandler) -> None:
    """Remove ``handler``; the last one removed lets records propagate as before."""
    logger = logging.getLogger(LOGGER)
    logger.removeHandler(handler)
    if _propagated and not any(isinstance(each, TelemetryLogHandler) for each in logger.handlers):
        logger.propagate = _propagated.pop()
