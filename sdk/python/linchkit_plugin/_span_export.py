"""How spans leave the process: OpenTelemetry's OTLP/HTTP exporter, held to bounds that a
collector, or a malformed ``OTEL_*`` variable, cannot stretch. The plugin's own
``configure_from_env`` (``linchkit_plugin.tracing``) and the dispatcher's tracing both
export through it.

**The settings** (``read_export_settings``). The exporter and OpenTelemetry's batch
processor would read these variables themselves, and react to a bad one in ways a served
process must not: the processor raises (a non-positive ``OTEL_BSP_MAX_QUEUE_SIZE``: the
plugin or the dispatcher fails to start with a traceback) or logs a traceback (``abc``); a
timeout of ``nan``, ``inf`` or ``-1`` fails every export, one error line per batch;
OpenTelemetry's header parser drops an item it cannot read with a warning that prints
it, the token in it too. So they are read here, once, and a bad one is an
``ExportSettingsError`` that names the variable and never its value; the exporter and the
processor are then given explicit values.

**The collector**: the exporter sends through a ``CollectorSession``
(``linchkit_plugin._collector_session``), which holds each request to its timeout and
the answer to a bound, follows no redirect, and names the collector in its errors by
scheme, host and port only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "ExportSettings",
    "ExportSettingsError",
    "collector_shown",
    "new_batch_processor",
    "new_span_exporter",
    "other_protocol",
    "read_export_settings",
]

#: What the exporter's timeout is when no variable sets it (OpenTelemetry's own default).
DEFAULT_TIMEOUT_SECONDS = 10.0

_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
_HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
#: The batch processor's variables and OpenTelemetry's defaults for them.
_BATCH_VARIABLES = {
    "OTEL_BSP_SCHEDULE_DELAY": 5000,
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,
}
#: The variables that would let a caller of ours choose the exporter's session instead.
_SESSION_VARIABLES = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)

# How OpenTelemetry's exporter splits and reads the headers' variable
# (``opentelemetry.util.re.parse_env_headers``, liberal): name=value items separated by
# commas; a value URL-encoded when it fits the strict form, as written when it fits the
# liberal one (spaces allowed). An item fitting neither is printed by its warning.
_HEADER_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")
_HEADER_NAME = re.compile(r"[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+")
_ENCODED_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
_LIBERAL_VALUE = re.compile(r"[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
#: What a header's value may hold once decoded: printable ASCII and tabs.
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


class ExportSettingsError(ValueError):
    """An ``OTEL_*`` variable of the span export holds what cannot be used. Names the
    variable (``variable``) and what is wrong (``reason``), never the value: a header's
    token, say."""

    def __init__(self, variable: str, reason: str) -> None:
        super().__init__(f"{variable}: {reason}")
        self.variable = variable
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """The export's settings, read from the environment once (``read_export_settings``)."""

    timeout: float = DEFAULT_TIMEOUT_SECONDS
    schedule_delay_millis: int = 5000
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    export_timeout_millis: int = 30000


def read_export_settings(environ: Mapping[str, str]) -> ExportSettings:
    """The exporter's timeout and the batch processor's settings the ``OTEL_*`` variables
    set, defaults for those unset; ``ExportSettingsError`` for the first one that is
    malformed, and for a headers' variable OpenTelemetry could not read without printing
    it (or whose decoded value no header could carry)."""
    _check_headers(environ)
    return ExportSettings(
        timeout=_timeout(environ),
        schedule_delay_millis=_positive_int(environ, "OTEL_BSP_SCHEDULE_DELAY"),
        max_queue_size=(queue := _positive_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE")),
        max_export_batch_size=_batch_size(environ, queue),
        export_timeout_millis=_positive_int(environ, "OTEL_BSP_EXPORT_TIMEOUT"),
    )


def _timeout(environ: Mapping[str, str]) -> float:
    """The exporter's timeout in seconds, from a variable in milliseconds: the
    specification's unit and the other SDKs', where OpenTelemetry's Python exporter reads
    seconds (``10000``, meant as 10 s for a whole fleet, would be 2.8 hours)."""
    for variable in _TIMEOUT_VARIABLES:
        if raw := environ.get(variable, "").strip():
            try:
                millis = float(raw)
            except ValueError:
                millis = math.nan
            if not (math.isfinite(millis) and millis > 0):
                raise ExportSettingsError(
                    variable, "not a number of milliseconds greater than 0 (OpenTelemetry: 10000)"
                )
            return millis / 1000
    return DEFAULT_TIMEOUT_SECONDS


def _positive_int(environ: Mapping[str, str], variable: str) -> int:
    raw = environ.get(variable, "").strip()
    if not raw:
        return _BATCH_VARIABLES[variable]
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ExportSettingsError(
            variable,
            f"not a whole number greater than 0 (OpenTelemetry: {_BATCH_VARIABLES[variable]})",
        )
    return value


def _batch_size(environ: Mapping[str, str], queue: int) -> int:
    """At most the queue: unset, OpenTelemetry's 512 or the queue when it is smaller."""
    size = _positive_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    if not environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "").strip():
        return min(size, queue)
    if size > queue:
        raise ExportSettingsError(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            "larger than the queue (OTEL_BSP_MAX_QUEUE_SIZE) it is taken from",
        )
    return size


def _check_headers(environ: Mapping[str, str]) -> None:
    """The headers' variable the exporter reads (the traces' own, else the root one): each
    item one it reads without a warning (which would print it, token and all), whose name
    and value, as it decodes them, a header can carry (a decoded CR or LF would split the
    request). The dispatcher holds its own exporter to these same rules."""
    variable = next((name for name in _HEADER_VARIABLES if environ.get(name)), None)
    if variable is None:
        return
    for item in _HEADER_SEPARATOR.split(environ[variable].strip()):
        if item:
            _check_header_item(variable, item)


def _check_header_item(variable: str, item: str) -> None:
    name, equals, value = (part.strip() for part in item.partition("="))
    if not (equals and _HEADER_NAME.fullmatch(name) and _LIBERAL_VALUE.fullmatch(value)):
        raise ExportSettingsError(
            variable,
            "every header is name=value, separated by commas: the name a token (letters,"
            " digits and !#$%&'*+-.^_`|~), the value URL-encoded",
        )
    if _ENCODED_VALUE.fullmatch(value):  # the exporter decodes it, and the name with it
        name, value = unquote(name).strip(), unquote(value).strip()
        if not _HEADER_NAME.fullmatch(name):
            raise ExportSettingsError(variable, "a header's name, decoded, is not a token")
    if not _HEADER_VALUE.fullmatch(value):
        raise ExportSettingsError(
            variable,
            f"the value of header {name[:40]!r}, decoded, must be printable ASCII (no CR, LF"
            " or other control characters)",
        )


def other_protocol(environ: Mapping[str, str]) -> str | None:
    """The variable naming a protocol other than OTLP/HTTP with protobuf, the only one
    this exporter speaks (``grpc``, ``http/json``); None when none does. Spans still go
    over OTLP/HTTP, which a collector's gRPC port (4317) does not take: worth a line."""
    for variable in _PROTOCOL_VARIABLES:
        if protocol := environ.get(variable, "").strip():
            return None if protocol.lower() == "http/protobuf" else variable
    return None


def collector_shown(url: str) -> str:
    """A collector's URL as lines and errors name it: scheme://host:port, without the
    user and password, path and query it may hold (a token in either)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # the exporter refuses it, or fails each send: nothing to show
        return "(its URL is malformed)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def new_span_exporter(
    settings: ExportSettings,
    *,
    collector: str,
    log: logging.Logger,
    endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    environ: Mapping[str, str],
) -> Any:
    """OpenTelemetry's ``OTLPSpanExporter`` sending through a ``CollectorSession``, with
    the timeout of ``settings`` (``endpoint`` and ``headers`` as the exporter takes them;
    it reads the variables for what they leave unset). ``collector`` names it in lines and
    errors (scheme://host:port). A session that a credential-provider variable names is
    the operator's choice, and is left to the exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from linchkit_plugin._collector_session import CollectorSession

    session = None
    if not any(environ.get(variable) for variable in _SESSION_VARIABLES):
        session = CollectorSession(collector, log)
    return OTLPSpanExporter(
        endpoint=endpoint, headers=headers, timeout=settings.timeout, session=session
    )


def new_batch_processor(exporter: Any, settings: ExportSettings) -> Any:
    """OpenTelemetry's ``BatchSpanProcessor`` for ``exporter`` with the settings read here,
    never from the variables itself."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(
        exporter,
        max_queue_size=settings.max_queue_size,
        schedule_delay_millis=settings.schedule_delay_millis,
        max_export_batch_size=settings.max_export_batch_size,
        export_timeout_millis=settings.export_timeout_millis,
    )
