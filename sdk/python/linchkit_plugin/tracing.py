"""Continues the dispatcher's trace inside the plugin, when OpenTelemetry is installed.

The dispatcher sends each attempt's W3C ``traceparent`` in the call's context (every
transport carries it). When tracing is on, each call runs inside a ``SERVER`` span
``linchkit.plugin/<method>``, as in every SDK: child of the dispatcher's attempt span when
the call carries a valid ``traceparent``, else the root of a new trace (a malformed one is
ignored, as the W3C rule says, never failing the call). Its attributes are
``linchkit.method``, ``linchkit.plugin`` (the plugin's id), ``linchkit.request_id`` (cut to
128 characters), ``linchkit.outcome`` (``ok``, or the type the call's error has on the
wire) and ``code.namespace`` (the plugin's class); a failure adds ``error.type`` (that
wire type) and an error status (its message cut to 512). The method runs with the span
current, so the plugin's own spans nest under it; a streaming method's span lasts the
whole stream. A call of a method the plugin lacks has no span (nor a name the caller made
up), as in Go and TypeScript.

Tracing is on for a ``PluginHost`` when the process has a tracer provider, decided once,
at the host's first call (``call_tracing``): the one ``configure_from_env()`` installs,
which every way the SDK serves a plugin calls at start, or one the plugin set up itself
(at import, or in its ``init``), or the one given as ``PluginHost(tracer_provider=…)``.
Otherwise a call pays one ``is None`` check: no import of OpenTelemetry, no parsing of the
``traceparent``, no span. The SDK has no dependency on OpenTelemetry.

``configure_from_env()`` sets up a provider from the standard variables when the plugin
did not: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` with
``opentelemetry-sdk`` and the OTLP/HTTP exporter installed (``pip install
'linchkit-plugin[tracing]'``); its ``service.name`` is ``OTEL_SERVICE_NAME``, else the
plugin's id, as in Go and TypeScript.

That provider buffers the spans and sends them in batches. A stop sends those still
buffered with ``flush_within(seconds)``, after the plugin's stop and destroy hooks, for
what remains of the hooks' cap or ``SPAN_FLUSH_MARGIN_SECONDS`` when less remains (as the
Go and TypeScript SDKs do): a collector that accepts the connection and never answers, or
an endpoint that drops every packet, must not keep the plugin past grace + hooks + the
margin, where a platform may kill it. The spans it could not send are dropped then, with a
warning that names the collector by scheme, host and port only: never the exporter's
headers, nor a password in its URL. Otherwise the provider sends them when the process
exits, for the exporter's own timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from linchkit_plugin._span_export import (
    ExportSettingsError,
    collector_shown,
    new_batch_processor,
    new_span_exporter,
    other_protocol,
    read_export_settings,
)
from linchkit_plugin.errors import DispatchError

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "AVAILABLE",
    "SPAN_FLUSH_MARGIN_SECONDS",
    "CallSpan",
    "CallTracing",
    "call_tracing",
    "configure_from_env",
    "exporting",
    "flush_at_stop",
    "flush_within",
]

log = logging.getLogger("linchkit_plugin.tracing")

#: The least a stop gives the spans still buffered, after its hooks: they get what remains
#: of the hooks' cap, or this when less remains, so a whole stop ends within grace + hooks
#: + this margin whatever the collector does (1 s, as in the Go and TypeScript SDKs).
SPAN_FLUSH_MARGIN_SECONDS = 1.0

#: A W3C traceparent is 55 characters; anything far longer is not one, and is not parsed.
MAX_TRACEPARENT = 512
#: What a span keeps of a call's request id, and of the plugin id a caller's envelope
#: names (both the caller's words), and of a failure's message (its status).
MAX_REQUEST_ID = 128
MAX_PLUGIN_ID = 128
MAX_STATUS_MESSAGE = 512

_TRACER_PROVIDER_ENV = "OTEL_PYTHON_TRACER_PROVIDER"


#: OpenTelemetry's API is installed here. Found without importing it: a plugin (or a host
#: importing the SDK) that is never traced never pays OpenTelemetry's import.
def _api_installed() -> bool:
    # opentelemetry.trace, not the namespace package: opentelemetry-proto alone provides
    # the latter; finding a submodule imports only the (empty) namespace package.
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:
        return False


AVAILABLE = _api_installed()


def _disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"


def call_tracing(tracer_provider: Any = None, *, new_traces: bool = True) -> CallTracing | None:
    """The spans a plugin host gives its calls, or None: tracing off, calls untraced.

    On with ``tracer_provider``, else with the process's global provider once one is set
    (by ``configure_from_env`` or by the plugin); off when OpenTelemetry is not installed,
    ``OTEL_SDK_DISABLED`` is true, or there is no provider but OpenTelemetry's no-op one.
    ``new_traces``: whether a call without a valid ``traceparent`` starts a trace (see
    ``CallTracing``). Never imports OpenTelemetry when nothing else did: then no provider
    can have been set."""
    if not AVAILABLE or _disabled():
        return None
    if tracer_provider is None:
        if "opentelemetry.trace" not in sys.modules and _TRACER_PROVIDER_ENV not in os.environ:
            return None
        from opentelemetry import trace as _trace

        tracer_provider = _trace.get_tracer_provider()
        if isinstance(tracer_provider, _trace.ProxyTracerProvider):
            return None  # nobody set one: spans would go nowhere
    from opentelemetry.trace import NoOpTracerProvider

    if isinstance(tracer_provider, NoOpTracerProvider):
        return None
    return CallTracing(tracer_provider.get_tracer("linchkit.plugin"), new_traces=new_traces)


class CallTracing:
    """Opens the span of each call of a plugin with one tracer: ``linchkit.plugin/<method>``,
    ``SERVER``, continuing the call's ``traceparent`` when it is a valid one.

    ``new_traces``: a call without one (or with a malformed one) starts a new trace, as in
    every SDK's servers. A host embedding plugins in its own process passes False (the
    dispatcher's ``local`` provider): it traces each call itself, and decided already
    whether to (``sample_ratio``); the plugin's span then only joins a trace the host
    continues, never starts one per call the host chose not to trace."""

    __slots__ = ("_context", "_empty", "_propagator", "_trace", "_tracer", "new_traces")

    def __init__(self, tracer: Tracer, *, new_traces: bool = True) -> None:
        # Imported here, once tracing is on: never by a plugin that is not traced.
        from opentelemetry import context as _context
        from opentelemetry import trace as _trace
        from opentelemetry.context import Context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._trace = _trace
        self._context = _context
        self._empty = Context
        self._propagator = TraceContextTextMapPropagator()
        self.new_traces = new_traces

    def begin(
        self, method: str, context: dict[str, Any] | None, plugin_id: str, namespace: str
    ) -> CallSpan | None:
        """The span of a call of ``method``, started; None when the call has no valid
        ``traceparent`` and this starts no trace. Never raises: tracing cannot fail a call."""
        try:
            return self._begin(method, context, plugin_id, namespace)
        except Exception:  # a span processor of the plugin's that fails, say
            log.debug("linchkit plugin: could not open the span of a call", exc_info=True)
            return None

    def _begin(
        self, method: str, context: dict[str, Any] | None, plugin_id: str, namespace: str
    ) -> CallSpan | None:
        parent: Context | None = None
        traceparent = context.get("traceparent") if context else None
        if isinstance(traceparent, str) and 0 < len(traceparent) <= MAX_TRACEPARENT:
            # Extracted into an empty context: a malformed value leaves it empty, never
            # falls back on whatever span the server's own instrumentation made current.
            extracted = self._propagator.extract({"traceparent": traceparent}, self._empty())
            if self._trace.get_current_span(extracted).get_span_context().is_valid:
                parent = extracted
        if parent is None:
            if not self.new_traces:
                return None
            parent = self._empty()  # the root of a new trace
        attributes: dict[str, str] = {
            "linchkit.method": method,
            "linchkit.plugin": plugin_id,
            "code.namespace": namespace,
        }
        request_id = context.get("request_id") if context else None
        if isinstance(request_id, str) and request_id:
            attributes["linchkit.request_id"] = request_id[:MAX_REQUEST_ID]
        span = self._tracer.start_span(
            f"linchkit.plugin/{method}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes=attributes,
        )
        return CallSpan(span, self._trace.set_span_in_context(span, parent), self._context)

    def __repr__(self) -> str:
        return f"<CallTracing new_traces={self.new_traces}>"


class CallSpan:
    """One call's span: current while the method runs (``enter``, ``leave``, around each
    step of a stream), then ``end``-ed with how the call ended."""

    __slots__ = ("_active", "_context", "_span")

    def __init__(self, span: Span, active: Context, context_api: Any) -> None:
        self._span = span
        self._active = active
        self._context = context_api

    def enter(self) -> Token[Context]:
        """Make the span current (in this task): the plugin's own spans nest under it."""
        token: Token[Context] = self._context.attach(self._active)
        return token

    def leave(self, token: Token[Context]) -> None:
        self._context.detach(token)

    def end(self, failure: BaseException | None) -> None:
        """Record how the call ended (``ok`` or the type of ``failure`` on the wire) and
        end the span. Never raises."""
        try:
            if failure is None:
                self._span.set_attribute("linchkit.outcome", "ok")
            else:
                from opentelemetry.trace import Status, StatusCode

                error_type, message = _wire_failure(failure)
                self._span.set_attributes(
                    {"linchkit.outcome": error_type, "error.type": error_type}
                )
                self._span.set_status(Status(StatusCode.ERROR, message[:MAX_STATUS_MESSAGE]))
            self._span.end()
        except Exception:
            log.debug("linchkit plugin: could not end the span of a call", exc_info=True)

    def __repr__(self) -> str:
        return f"<CallSpan {self._span!r}>"


def _wire_failure(failure: BaseException) -> tuple[str, str]:
    """The type and message the caller sees for ``failure``: a ``DispatchError``'s wire
    ``type`` (a plugin's own error its ``remote_type``); a call the host cancelled (or
    whose stream it closed) is ``deadline_exceeded``, as the Go and TypeScript SDKs record
    it; anything else by its class name, as ``PluginError`` names it."""
    if isinstance(failure, DispatchError):
        wire = failure.to_wire()
        return str(wire["type"]), failure.message
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        return "deadline_exceeded", "the host cancelled the call"
    return type(failure).__name__, str(failure) or type(failure).__name__


@dataclass(frozen=True, slots=True)
class _Installed:
    """The provider ``configure_from_env`` installed, and its collector as a warning may
    name it (``_collector_shown``)."""

    provider: Any = field(repr=False)
    collector: str


#: Set by ``configure_from_env``, taken by ``flush_within``: the process has one global
#: tracer provider, and the SDK installs it at most once.
_installed: _Installed | None = None


def configure_from_env(*, plugin_id: str = "", version: str = "") -> bool:
    """Install an OTLP/HTTP-exporting tracer provider from ``OTEL_*`` variables, unless the
    process has one already. True when one was installed. Its ``service.name`` is
    ``OTEL_SERVICE_NAME``, else ``plugin_id``, else ``linchkit-plugin``; its
    ``service.version`` is ``version`` when given (as the Go and TypeScript SDKs name
    theirs)."""
    if _disabled():
        return False
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return False
    if not AVAILABLE:
        _say_not_installed()
        return False
    from opentelemetry import trace as _trace

    if not isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        return False  # the plugin set up its own
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        _say_not_installed()
        return False
    collector = _collector_shown()
    try:
        settings = read_export_settings(os.environ)
    except ExportSettingsError as error:  # names the variable, never its value
        log.warning(
            "linchkit plugin: %s: no span is sent to the trace collector at %s. Fix or"
            " unset the variable",
            error,
            collector,
        )
        return False
    if (protocol := other_protocol(os.environ)) is not None:
        log.warning(
            "linchkit plugin: %s names a protocol this SDK does not send: spans go to %s"
            " over OTLP/HTTP (protobuf), which a collector's gRPC port does not take",
            protocol,
            collector,
        )
    # Ours win over OTEL_RESOURCE_ATTRIBUTES', which Resource.create merges in.
    resource = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME") or plugin_id or "linchkit-plugin"
    }
    if version:
        resource["service.version"] = version
    # The exporter reads the endpoint and headers from the same variables (checked above:
    # none is printed) and sends through a session no collector can hold or flood
    # (linchkit_plugin._collector_session); the provider shuts down (sending what is
    # buffered) at a stop, flush_within, or else when the process exits.
    provider = TracerProvider(resource=Resource.create(resource))
    exporter = new_span_exporter(settings, collector=collector, log=log, environ=os.environ)
    provider.add_span_processor(new_batch_processor(exporter, settings))
    _trace.set_tracer_provider(provider)
    global _installed
    _installed = _Installed(provider, collector)
    return True


def _say_not_installed() -> None:
    """The variables name a collector and nothing here can send to it: said once, at
    start, as the TypeScript SDK says it, rather than a plugin served untraced unseen."""
    log.warning(
        "linchkit plugin: OTEL_EXPORTER_OTLP_* names a trace collector (%s) but OpenTelemetry's"
        " SDK and OTLP/HTTP exporter are not installed: no span is sent. Install them with"
        " pip install 'linchkit-plugin[tracing]', or unset the variables",
        _collector_shown(),
    )


def flush_within(seconds: float) -> bool:
    """Send the spans still buffered by the provider ``configure_from_env`` installed, and
    shut it down, for ``seconds`` at most: a stop's last step. True when they were sent
    (or there was nothing to send); False when the collector did not take them in time:
    they are dropped then, with a warning, and the process may exit without them (the
    sending goes on in a daemon thread, which does not hold the exit)."""
    global _installed
    installed, _installed = _installed, None
    if installed is None:
        return True
    provider = installed.provider
    # Not again at the exit, for the exporter's own timeout, when this gave up.
    atexit.unregister(provider.shutdown)
    done = threading.Event()

    def shut_down() -> None:
        try:
            provider.shutdown()
        finally:
            done.set()

    threading.Thread(target=shut_down, name="linchkit-span-flush", daemon=True).start()
    if done.wait(seconds):
        return True
    log.warning(
        "linchkit plugin: spans dropped at the stop: the trace collector at %s did not take"
        " them within the %g s the stop's caps left; check that it is up and answers",
        installed.collector,
        round(seconds, 1),
    )
    return False


def flush_at_stop(hooks_left: float) -> bool:
    """A stop's last step, after the plugin's hooks: ``flush_within`` what remains of the
    hooks' cap (``PluginHost.hooks_left``), or ``SPAN_FLUSH_MARGIN_SECONDS`` when less."""
    return flush_within(max(hooks_left, SPAN_FLUSH_MARGIN_SECONDS))


@contextlib.contextmanager
def exporting(
    hooks_left: Callable[[], float], *, plugin_id: str = "", version: str = ""
) -> Iterator[None]:
    """A served plugin's spans from its start to its stop, as every way the SDK serves one
    runs it: ``configure_from_env`` first, then, however serving ends (a stop, a refusal,
    an interrupt), ``flush_at_stop`` for what ``hooks_left()`` says the hooks left. Ended
    otherwise, the spans went at the interpreter's exit, for the exporter's 10 s."""
    configure_from_env(plugin_id=plugin_id, version=version)
    try:
        yield
    finally:
        flush_at_stop(hooks_left())


def _collector_shown() -> str:
    """The collector the exporter sends to, as scheme://host:port: a password in the URL,
    its path and query stay out of a log line."""
    return collector_shown(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    )
