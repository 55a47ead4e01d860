"""Telemetry of one dispatcher: metrics, traces, structured logs and recent errors.

Configured by the manifest's ``telemetry:`` (``dispatcher.config.telemetry``) and the
standard ``OTEL_*`` environment; ``docs/observability.md`` is the user's guide.

* ``metrics``: a Prometheus registry per dispatcher, its per-call counter and histogram,
  and a collector exporting ``Dispatcher.stats()`` at scrape time; an aiohttp handler and
  an ASGI app to serve it.
* ``tracing``: OpenTelemetry spans per call, attempt and batch (imported only when on).
* ``logs``: a JSON formatter and a filter adding the call's ids to every log line.
* ``errors``: error counts by plugin and type, and a bounded ring of recent errors.
* ``step``: ``CallStep``, the outermost link of a route's chain.
* ``flows``: ``StreamStep`` and ``EventStep``, the same for streams and host events.

``TelemetryRuntime.from_manifest`` returns None when nothing is configured: the
dispatcher then adds no step and no wrapper anywhere, so telemetry off costs nothing.
Where it hooks in: ``around_call`` wraps each route's chain when the route is built, and
``boundary`` (given to ``PolicyRuntime``) wraps what every chain calls its provider with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dispatcher.config import Telemetry
from dispatcher.telemetry.errors import ErrorLog, RecentError
from dispatcher.telemetry.flows import EventStep, OpenStream, StreamStep
from dispatcher.telemetry.logs import (
    CallContextFilter,
    JsonFormatter,
    TelemetryLogHandler,
    formatter_for,
    install,
    uninstall,
)
from dispatcher.telemetry.metrics import (
    DispatcherMetrics,
    StatsCollector,
    asgi_app,
    metrics_handler,
)
from dispatcher.telemetry.step import CallStep, Next
from linchkit_plugin.errors import DispatchError
from providers.invocation import Invocation, Outcome
from providers.target import TargetConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from dispatcher.telemetry.tracing import Tracing

__all__ = [
    "CallContextFilter",
    "CallStep",
    "DispatcherMetrics",
    "ErrorLog",
    "JsonFormatter",
    "RecentError",
    "StatsCollector",
    "TelemetryRuntime",
    "asgi_app",
    "formatter_for",
    "metrics_handler",
]

log = logging.getLogger("dispatcher")

Invoke = Callable[[TargetConfig, Invocation], Any]
InvokeBatch = Callable[[TargetConfig, Sequence[Invocation]], Any]


class TelemetryRuntime:
    """What telemetry one dispatcher runs, and the hooks the dispatcher calls."""

    def __init__(
        self,
        settings: Telemetry,
        stats: Callable[[], Mapping[str, Any]],
        *,
        span_processors: Sequence[SpanProcessor] = (),
    ) -> None:
        self.settings = settings
        self.errors = ErrorLog(settings.recent_errors)
        self.metrics = (
            DispatcherMetrics(settings.metrics, stats) if settings.metrics.enabled else None
        )
        self.tracing: Tracing | None = None
        tracing = settings.tracing.resolved()
        if tracing is not None:
            self.tracing = _new_tracing(tracing, span_processors)
        self._log_handler: TelemetryLogHandler | None = None
        self._set_level = False
        #: Around every ``Dispatcher.publish``: host events counted and traced.
        self.events = EventStep(errors=self.errors, metrics=self.metrics, tracing=self.tracing)

    @classmethod
    def from_manifest(
        cls,
        settings: Telemetry,
        stats: Callable[[], Mapping[str, Any]],
        *,
        span_processors: Sequence[SpanProcessor] = (),
    ) -> TelemetryRuntime | None:
        """The runtime ``settings`` ask for, or None when they ask for nothing."""
        wanted = (
            settings.metrics.enabled
            or settings.logs.format is not None
            or settings.tracing.resolved() is not None
            or bool(span_processors)
        )
        return cls(settings, stats, span_processors=span_processors) if wanted else None

    # -- hooks -------------------------------------------------------------------------------

    def around_call(
        self, plugin: str, version: str, method: str, kind: str, has_cache: bool, chain: Next
    ) -> CallStep:
        """The route's chain with telemetry around it."""
        spans = None
        if self.tracing is not None:
            from dispatcher.telemetry.tracing import RouteSpans

            spans = RouteSpans(plugin, version, method, kind, has_cache)
        return CallStep(
            plugin,
            method,
            chain,
            errors=self.errors,
            metrics=self.metrics,
            tracing=self.tracing,
            spans=spans,
        )

    def around_stream(
        self, plugin: str, version: str, method: str, kind: str, open_stream: OpenStream
    ) -> StreamStep:
        """The route's streams, counted and traced (``dispatcher.telemetry.flows``)."""
        return StreamStep(
            plugin,
            version,
            method,
            kind,
            open_stream,
            errors=self.errors,
            metrics=self.metrics,
            tracing=self.tracing,
        )

    @property
    def boundary(self) -> TelemetryRuntime | None:
        """What wraps ``provider.invoke``/``invoke_batch`` (``PolicyRuntime``), when
        anything needs to: spans per attempt, batch sizes."""
        return self if self.tracing is not None or self.metrics is not None else None

    def invoke(self, invoke: Any) -> Any:
        return invoke if self.tracing is None else self.tracing.invoke(invoke)

    def invoke_batch(self, invoke_batch: Any) -> Any:
        wrapped = invoke_batch if self.tracing is None else self.tracing.invoke_batch(invoke_batch)
        metrics = self.metrics
        if metrics is None:
            return wrapped

        async def counted_batch(
            target: TargetConfig, invocations: Sequence[Invocation]
        ) -> list[Outcome[Any]]:
            metrics.batch_size.labels(target.provider).observe(len(invocations))
            result: list[Outcome[Any]] = await wrapped(target, invocations)
            return result

        return counted_batch

    def refused(self, plugin: str, method: str, error: DispatchError) -> None:
        """A call refused before its chain ran (draining, unknown plugin or method,
        invalid params, unauthorized): counted under its error type, with no latency."""
        if self.metrics is not None:
            self.metrics.record(plugin, method, error.type).buckets[0] += 1
        self.errors.count(plugin, error.type)

    def breaker_changed(self, breaker: Any, old: Any, new: Any) -> None:
        if self.metrics is not None:
            self.metrics.breaker_changed(breaker, old, new)

    def breaker_forgotten(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.breaker_forgotten(name)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Install the log handler the manifest asks for on the ``dispatcher`` logger."""
        logs = self.settings.logs
        if logs.format is None:
            return
        handler = TelemetryLogHandler(logs.format, logs.level)
        logger = logging.getLogger("dispatcher")
        if logger.level == logging.NOTSET:  # a level the host set stays
            logger.setLevel(logs.level)
            self._set_level = True
        install(handler)  # and the records stop there: none written twice
        self._log_handler = handler

    async def aclose(self) -> None:
        """Send the spans still buffered, stop the exporter, remove the log handler."""
        if self.tracing is not None:
            # Off the loop, so calls of other dispatchers go on meanwhile; for the
            # exporter's timeout at most, whatever the collector does.
            await self.tracing.aclose()
        if self._log_handler is not None:
            uninstall(self._log_handler)
            self._log_handler = None
            if self._set_level:
                logging.getLogger("dispatcher").setLevel(logging.NOTSET)

    def __repr__(self) -> str:
        return (
            f"<TelemetryRuntime metrics={self.metrics is not None} tracing={self.tracing!r}"
            f" logs={self.settings.logs.format} {self.errors!r}>"
        )


def _new_tracing(settings: Any, processors: Sequence[SpanProcessor]) -> Tracing:
    try:
        from dispatcher.telemetry.tracing import Tracing
    except ImportError as error:  # the optional SDK: say which install fixes it
        raise RuntimeError(
            "tracing is configured (telemetry.tracing or OTEL_EXPORTER_OTLP_*) but "
            f"OpenTelemetry is not installed ({error.name}): "
            "pip install 'linchkit-dispatcher[telemetry]'"
        ) from error
    return Tracing(settings, processors=processors)
