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
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["AVAILABLE", "configure_from_env", "continued_trace"]


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
    # provider shuts down (sending what is buffered) when the process exits.
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "linchkit-plugin")}
        )
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _trace.set_tracer_provider(provider)
    return True
