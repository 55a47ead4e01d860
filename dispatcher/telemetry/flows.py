"""Telemetry of streams and host events: what ``CallStep`` is to calls.

    Dispatcher.stream ─► StreamStep ─► the method's gate ─► provider.stream
    Dispatcher.publish ─► EventStep ─► every target's event gate ─► provider.send_event

Both are put in place only when telemetry is configured. A stream is counted when it ends:
its outcome (``ok``; ``closed`` when its consumer stopped reading first, which is no
failure; or the error's type), the time from opening to its end, and its chunks. A host
event is counted once for the whole publish (every target it went to), by plugin, event
and outcome; its event name is a label, bounded per plugin (``MAX_EVENT_NAMES``).

Traced, a stream gets one span, ``<plugin>.<method> stream``, whose ``traceparent`` the
plugin receives (so it continues the trace), with the chunk count; a publish gets
``<plugin> event <name>``. Sampling is decided as for calls (``Tracing.parent``): the
caller's ``traceparent``, else the host's current span, else ``sample_ratio``.

The log context (``CURRENT_CALL``) is not set for a stream: its generator runs in the
context of whoever reads it, so a value set there would leak into the reader's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from time import perf_counter
from typing import TYPE_CHECKING, Any

from dispatcher.telemetry.errors import ErrorLog, error_type
from dispatcher.telemetry.metrics import DispatcherMetrics
from linchkit_plugin.errors import PluginNotFound
from providers.invocation import Invocation

if TYPE_CHECKING:
    from dispatcher.telemetry.tracing import Tracing

__all__ = ["EventStep", "OpenStream", "StreamStep"]

OpenStream = Callable[[Invocation], AsyncGenerator[Any, None]]


class StreamStep:
    """Telemetry around the streams of one route."""

    __slots__ = ("attributes", "errors", "method", "metrics", "next", "plugin", "tracing")

    def __init__(
        self,
        plugin: str,
        version: str,
        method: str,
        kind: str,
        next_step: OpenStream,
        *,
        errors: ErrorLog,
        metrics: DispatcherMetrics | None,
        tracing: Tracing | None,
    ) -> None:
        self.plugin = plugin
        self.method = method
        self.next = next_step
        self.errors = errors
        self.metrics = metrics
        self.tracing = tracing
        self.attributes: dict[str, Any] = {
            "linchkit.plugin": plugin,
            "linchkit.plugin.version": version,
            "linchkit.method": method,
            "linchkit.target.kind": kind,
        }

    async def __call__(self, invocation: Invocation) -> AsyncGenerator[Any, None]:
        tracing, span = self.tracing, None
        if tracing is not None:
            parent = tracing.parent(invocation.traceparent)
            if parent is not None:
                span = tracing.span(f"{self.plugin}.{self.method} stream", parent, self.attributes)
                invocation = replace(invocation, traceparent=tracing.traceparent(span))
        chunks, failure, outcome = 0, None, "ok"
        started = perf_counter()
        stream = self.next(invocation)
        try:
            async for chunk in stream:
                chunks += 1
                yield chunk
        except GeneratorExit:
            outcome = "closed"  # the consumer stopped reading: no failure
            raise
        except BaseException as error:
            failure, outcome = error, error_type(error)
            self.errors.record(invocation, error, None)
            raise
        finally:
            await stream.aclose()
            self._count(outcome, chunks, perf_counter() - started)
            if span is not None:
                span.set_attribute("linchkit.chunks", chunks)
                tracing.end(span, failure, outcome)  # type: ignore[union-attr]

    def _count(self, outcome: str, chunks: int, elapsed: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        record = metrics.stream_record(self.plugin, self.method, outcome)
        record.buckets[bisect_left(metrics.bounds, elapsed)] += 1
        record.sum += elapsed
        key = (self.plugin, self.method)
        metrics.stream_chunks[key] = metrics.stream_chunks.get(key, 0) + chunks


class EventStep:
    """Telemetry around host events sent to plugins."""

    __slots__ = ("errors", "metrics", "tracing")

    def __init__(
        self, *, errors: ErrorLog, metrics: DispatcherMetrics | None, tracing: Tracing | None
    ) -> None:
        self.errors = errors
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(
        self, plugin: str, event: str, publish: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``publish`` (the event to every target of ``plugin``), counted and traced."""
        tracing, span = self.tracing, None
        if tracing is not None:
            parent = tracing.parent(None)
            if parent is not None:
                attributes = {"linchkit.plugin": plugin, "linchkit.event": event}
                span = tracing.span(f"{plugin} event {event}", parent, attributes)
        failure, outcome = None, "ok"
        started = perf_counter()
        try:
            await publish()
        except BaseException as error:
            failure, outcome = error, error_type(error)
            if isinstance(error, PluginNotFound):  # a name anyone may send is no label
                plugin = event = "?"
            self.errors.count(plugin, outcome)
            raise
        finally:
            self._count(plugin, event, outcome, perf_counter() - started)
            if span is not None:
                tracing.end(span, failure, outcome)  # type: ignore[union-attr]

    def _count(self, plugin: str, event: str, outcome: str, elapsed: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        record = metrics.event_record(plugin, event, outcome)
        record.buckets[bisect_left(metrics.bounds, elapsed)] += 1
        record.sum += elapsed
