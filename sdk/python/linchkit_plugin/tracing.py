"""Continues the dispatcher's trace inside the plugin, when OpenTelemetry is installed.

The dispatcher sends each attempt's W3C ``traceparent`` in the call's context (every
transport carries it). If the plugin's environment has ``opentelemetry-api``, each call
that arrives with one runs inside a ``SERVER`` span, child of the dispatcher's attempt
span, so one trace shows host → dispatcher → plugin, and the plugin's own spans nest
under it. Without OpenTelemetry, or without a ``traceparent``, nothing happens: the SDK
has no dependency on OpenTelemetry and starts no trace of its own.

Where the spans go is the plugin process's OpenTelemetry setup (its global tracer
provider). ``configure_from_env()``, which the SDK's servers call at start, sets one up
from the standard variables when the plugin did not: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` with ``opentelemetry-sdk`` and the OTLP/HTTP
exporter installed (``pip install 'linchkit-plugin[tracing]'``).

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

import atexit
import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "AVAILABLE",
    "SPAN_FLUSH_MARGIN_SECONDS",
    "configure_from_env",
    "continued_trace",
    "flush_at_stop",
    "flush_within",
]

log = logging.getLogger("linchkit_plugin.tracing")

#: The least a stop gives the spans still buffered, after its hooks: they get what remains
#: of the hooks' cap, or this when less remains, so a whole stop ends within grace + hooks
#: + this margin whatever the collector does (1 s, as in the Go and TypeScript SDKs).
SPAN_FLUSH_MARGIN_SECONDS = 1.0


#: OpenTelemetry's API is installed here: calls with a ``traceparent`` get a span. Found
#: without importing it: a plugin (or a host importing the SDK) that never sees a traced
#: call never pays OpenTelemetry's import.
def _api_installed() -> bool:
    # opentelemetry.trace, not the namespace package: opentelemetry-proto alone provides
    # the latter; finding a submodule imports only the (empty) namespace package.
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:
        return False


AVAILABLE = _api_installed()


@contextlib.contextmanager
def continued_trace(
    method: str, context: dict[str, Any] | None, namespace: str | None = None
) -> Iterator[None]:
    """Run the body inside a span continuing ``context["traceparent"]``, if there is one
    and OpenTelemetry is installed; otherwise just run it."""
    traceparent = context.get("traceparent") if context else None
    if not AVAILABLE or not isinstance(traceparent, str) or len(traceparent) > 512:
        yield
        return
    assert context is not None
    # Imported on the first traced call (then from sys.modules): optional, and not paid
    # by plugins that are never traced.
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace import SpanKind as _SpanKind
    from opentelemetry.trace import Status as _Status
    from opentelemetry.trace import StatusCode as _StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    if not _trace.get_current_span(parent).get_span_context().is_valid:
        yield  # malformed: the W3C rule is to ignore it, never to fail the call
        return
    attributes: dict[str, Any] = {"linchkit.method": method}
    request_id = context.get("request_id")
    if isinstance(request_id, str):
        attributes["linchkit.request_id"] = request_id[:128]
    if namespace is not None:  # the plugin's class: the SDK does not know its manifest id
        attributes["code.namespace"] = namespace
    tracer = _trace.get_tracer("linchkit.plugin")
    span = tracer.start_span(
        f"{namespace}.{method}" if namespace else method,
        context=parent,
        kind=_SpanKind.SERVER,
        attributes=attributes,
    )
    token = _context.attach(_trace.set_span_in_context(span, parent))
    try:
        yield
    except BaseException as error:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(_Status(_StatusCode.ERROR, str(error)[:512]))
        raise
    finally:
        _context.detach(token)
        span.end()


@dataclass(frozen=True, slots=True)
class _Installed:
    """The provider ``configure_from_env`` installed, and its collector as a warning may
    name it (``_collector_shown``)."""

    provider: Any = field(repr=False)
    collector: str


#: Set by ``configure_from_env``, taken by ``flush_within``: the process has one global
#: tracer provider, and the SDK installs it at most once.
_installed: _Installed | None = None


def configure_from_env() -> bool:
    """Install an OTLP/HTTP-exporting tracer provider from ``OTEL_*`` variables, unless the
    process has one already. True when one was installed."""
    if not AVAILABLE or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        return False
    from opentelemetry import trace as _trace

    if not isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        return False  # the plugin set up its own
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return False
    # The exporter reads the endpoint, headers and timeouts from the same variables; the
    # provider shuts down (sending what is buffered) at a stop, flush_within, or else when
    # the process exits.
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "linchkit-plugin")}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _trace.set_tracer_provider(provider)
    global _installed
    _installed = _Installed(provider, _collector_shown())
    return True


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


def _collector_shown() -> str:
    """The collector the exporter sends to, as scheme://host:port: a password in the URL,
    its path and query stay out of a log line."""
    url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # the exporter refuses it, or fails each send: nothing to show
        return "(its URL is malformed)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
