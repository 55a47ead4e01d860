"""The level a subprocess plugin gave a line it wrote to stderr, when the line says.

The host logs each stderr line of a plugin under ``dispatcher.plugin.<id>``; a plugin's
own WARNING or ERROR must stay one there, or a host logging at WARNING loses it. The
level is read from the start of the line, in the shapes plugins write:

    WARNING svc: disk almost full              Python (the SDK's format: LEVEL name: msg)
    WARNING:svc:disk almost full               Python's logging.basicConfig() default
    SEVERE: disk almost full                   Java's java.util.logging (its second line)
    2026/12/04 00:10:00 WARN disk almost full  Go's log/slog default handler
    2026-12-04T00:10:00Z  WARN svc: disk ...   Rust's tracing-subscriber fmt
    time=... level=WARN msg="disk almost full" Go's slog.TextHandler (logfmt)
    {"time":...,"level":"warn","msg":...}      JSON lines: slog.JSONHandler, pino (40)
    [0.012s][warning][gc] ...                  the JVM's unified logging (-Xlog), any decorators
    OpenJDK 64-Bit Server VM warning: ...      the JVM's own warnings (HotSpot, OpenJ9 alike)

A bare level word must be upper case (``Error reading x`` is a message, not a level);
``level=`` and JSON ``"level"`` take any case. A line with none of these stays INFO, as
before. One compiled regular expression per shape, matched against the line's first
``_HEAD`` characters: a megabyte line costs what a short one does.
"""

from __future__ import annotations

import logging
import re

__all__ = ["line_level"]

_HEAD = 96  # the level sits in a line's first characters in every shape above

_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "FINE": logging.DEBUG,
    "INFO": logging.INFO,
    "NOTICE": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "ERR": logging.ERROR,
    "SEVERE": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
    "PANIC": logging.CRITICAL,
}
_PINO = {10: logging.DEBUG, 20: logging.DEBUG, 30: logging.INFO, 40: logging.WARNING}

_WORDS = "|".join(sorted(_LEVELS, key=len, reverse=True))
# An optional timestamp (digits and - / : . T Z + and spaces), then the bare word,
# perhaps in brackets, then a space, a colon or the line's end.
_BARE = re.compile(
    rf"[0-9][0-9TZ:./+\- ]*[ T]\[?({_WORDS})\]?(?:[ :]|$)|\[?({_WORDS})\]?(?:[ :]|$)"
)
_LOGFMT = re.compile(r"(?:^|\s)level=\"?([A-Za-z]+)")
_JSON = re.compile(r"\"level\"\s*:\s*(?:\"([A-Za-z]+)\"|([0-9]+))")
# -Xlog's decorators come first, each in brackets (uptime, time, pid, tags...), the level
# among them in lower case: ``[0.012s][warning][gc]``, ``[2026-...][0.5s][error][os,thread]``.
_JVM = re.compile(r"(?:\[[^\[\]]*\]){0,6}?\[(trace|debug|info|warning|error)\]")
_JVM_LEVELS = {"warning": logging.WARNING, "error": logging.ERROR, "info": logging.INFO}
_VM_WARNING = re.compile(r"[\w().\- ]{0,60} VM warning: ")


def line_level(line: str) -> int:
    """The logging level ``line`` carries at its start, else ``logging.INFO``."""
    head = line[:_HEAD]
    if head.startswith("{"):
        found = _JSON.search(head)
        if found is None:
            return logging.INFO
        if found.group(2) is not None:
            number = int(found.group(2))
            if number >= 50:
                return logging.CRITICAL if number >= 60 else logging.ERROR
            return _PINO.get(number, logging.INFO)
        return _LEVELS.get(found.group(1).upper(), logging.INFO)
    if head.startswith("["):
        found = _JVM.match(head)
        if found is not None:
            return _JVM_LEVELS.get(found.group(1), logging.DEBUG)
    found = _BARE.match(head)
    if found is not None:
        return _LEVELS[found.group(1) or found.group(2)]
    found = _LOGFMT.search(head)
    if found is not None:
        return _LEVELS.get(found.group(1).upper(), logging.INFO)
    if _VM_WARNING.match(head) is not None:
        return logging.WARNING
    return logging.INFO
