"""OpenTelemetry traces: a span per call, a child span per attempt and per batch sent.

Imported only when tracing is configured (``telemetry.tracing`` or the ``OTEL_*``
environment), so a dispatcher without it never imports OpenTelemetry.

    host span? ─► call span  "echo.say"          (Dispatcher.call; INTERNAL)
                    ├─ attempt span  "echo.say attempt"  (each provider.invoke: retries,
                    │                                     failovers, hedges; CLIENT)
                    └─ batch span    "echo.say batch"    (one per batch sent, linked to the
                                                          call span of every item in it)
                                        ─► the plugin's span (the SDK continues the trace)

**Sampling.** The dispatcher follows its caller: an explicit ``traceparent`` (the gateway
passes the request's) or, failing that, the host's current OpenTelemetry span decides, as
``parentbased_*`` samplers do. A call with neither is a root, traced with probability
``sample_ratio``. That root decision is made here with one ``random()`` before anything of
OpenTelemetry runs, so a call that is not traced costs a few attribute reads and nothing
is allocated (``bench/bench_telemetry.py``); the SDK's own sampler is then ``ALWAYS_ON``
for the roots this module decided to trace. A caller's unsampled ``traceparent`` is sent on
unchanged (the plugin sees the caller's decision); a host's current span that is not
sampled goes through the SDK, which makes non-recording spans whose context travels on.

**What the plugin receives.** The attempt span's ``traceparent`` replaces the invocation's
for that attempt, on every transport (each provider already sends
``Invocation.traceparent``: HTTP header and envelope, gRPC metadata, CloudEvents
extension, Lambda payload context). Items of a batch keep their own call span's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dispatcher.config import ResolvedTracing
from dispatcher.telemetry.errors import error_type
from dispatcher.telemetry.logs import CURRENT_TRACE_ID
from linchkit_plugin._span_export import (
    collector_shown,
    new_batch_processor,
    new_span_exporter,
    other_protocol,
)
from linchkit_plugin.errors import DispatchError, PluginError
from providers.invocation import Invocation, Outcome
from providers.target import TargetConfig, masked_url

__all__ = ["CallSpan", "Tracing", "traceparent_of"]

Next = Callable[[Invocation], Awaitable[Any]]
Invoke = Callable[[TargetConfig, Invocation], Awaitable[Any]]
InvokeBatch = Callable[[TargetConfig, Sequence[Invocation]], Awaitable[list[Outcome[Any]]]]

#: Longest error message a span keeps (plugin messages are unbounded).
MAX_STATUS_CHARS = 512
#: What a close gives the spans still buffered past the exporter's timeout (seconds).
CLOSE_MARGIN_SECONDS = 1.0

_PROPAGATOR = TraceContextTextMapPropagator()

log = logging.getLogger("dispatcher")


class CallSpan:
    """The span of one traced call and what its attempts tell it."""

    __slots__ = ("attempts", "batch_size", "in_flight", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.attempts = 0
        self.in_flight = 0
        self.batch_size = 0


#: The traced call the current task works for (None: not traced, or no call).
_TRACED: ContextVar[CallSpan | None] = ContextVar("dispatcher_traced_call", default=None)


def traceparent_of(span: trace.Span) -> str:
    """The W3C ``traceparent`` header value of ``span``."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _sampled_flag(traceparent: str) -> bool | None:
    """The sampled flag of a version-00 ``traceparent``; None when it is malformed."""
    if len(traceparent) != 55 or traceparent[2] != "-" or traceparent[52] != "-":
        return None
    try:
        return bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return None


class RouteSpans:
    """What every span of one route's calls carries, computed once."""

    __slots__ = ("attributes", "has_cache", "name")

    def __init__(self, plugin: str, version: str, method: str, kind: str, has_cache: bool) -> None:
        self.name = f"{plugin}.{method}"
        self.has_cache = has_cache
        self.attributes: dict[str, Any] = {
            "linchkit.plugin": plugin,
            "linchkit.plugin.version": version,
            "linchkit.method": method,
            "linchkit.target.kind": kind,
        }


class Tracing:
    """The tracer provider of one dispatcher and the spans of its calls."""

    def __init__(
        self, settings: ResolvedTracing, *, processors: Sequence[SpanProcessor] = ()
    ) -> None:
        self.settings = settings
        self.ratio = settings.sample_ratio
        # Roots are decided here (module docstring): the SDK follows parents, keeps roots.
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(ALWAYS_ON),
        )
        if settings.endpoint is not None:
            # Through a session no collector can hold or flood, with the settings the
            # manifest's load read and checked (the exporter and the batch processor
            # would read the variables again, and fail on a bad one at the first export).
            collector = collector_shown(settings.endpoint)
            if (protocol := other_protocol(os.environ)) is not None:
                log.warning(
                    "%s names a protocol the dispatcher does not send: spans go to %s over"
                    " OTLP/HTTP (protobuf), which a collector's gRPC port does not take",
                    protocol,
                    collector,
                )
            exporter = new_span_exporter(
                settings.export,
                collector=collector,
                log=log,
                endpoint=settings.endpoint,
                headers=settings.headers,
                environ=os.environ,
            )
            self.provider.add_span_processor(new_batch_processor(exporter, settings.export))
        for processor in processors:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("linchkit.dispatcher")
        # Traced calls by id(invocation): how a batch, sent from the batcher's own task,
        # finds the call span of each item. Entries live exactly as long as their call.
        self._calls: dict[int, CallSpan] = {}

    # -- the call span -------------------------------------------------------------------

    def parent(self, traceparent: str | None) -> context_api.Context | None:
        """The context to trace a call (stream, event) under, given the ``traceparent`` its
        caller sent; None: not traced (the hot path)."""
        if traceparent is not None:
            sampled = _sampled_flag(traceparent)
            if sampled is not None:
                if not sampled:
                    return None  # the caller's decision, sent on unchanged
                return _PROPAGATOR.extract({"traceparent": traceparent})
        else:
            current = context_api.get_current()
            # An empty context (most hosts, most calls) has no span: skip the API's lookups.
            if current and trace.get_current_span(current).get_span_context().is_valid:
                return current  # the host's span decides (sampled or not)
        if self.ratio >= 1.0 or random.random() < self.ratio:
            return context_api.Context()  # a root
        return None

    async def call(
        self,
        route: RouteSpans,
        invocation: Invocation,
        parent: context_api.Context,
        next_step: Next,
    ) -> Any:
        """Run ``next_step`` for ``invocation`` inside its call span."""
        span = self.tracer.start_span(
            route.name, context=parent, kind=SpanKind.INTERNAL, attributes=route.attributes
        )
        state = CallSpan(span)
        span_context = span.get_span_context()
        invocation = dataclasses.replace(invocation, traceparent=traceparent_of(span))
        key = id(invocation)
        self._calls[key] = state
        token = context_api.attach(trace.set_span_in_context(span, parent))
        traced_token = _TRACED.set(state)
        # Left set for the caller (CallStep) to record an error with, and to reset.
        CURRENT_TRACE_ID.set(f"{span_context.trace_id:032x}")
        outcome = "ok"
        try:
            return await next_step(invocation)
        except BaseException as error:
            outcome = error_type(error)
            _record_error(span, error, outcome)
            raise
        finally:
            del self._calls[key]
            _TRACED.reset(traced_token)
            context_api.detach(token)
            span.set_attribute("linchkit.outcome", outcome)
            span.set_attribute("linchkit.attempts", state.attempts)
            if state.batch_size:
                span.set_attribute("linchkit.batch_size", state.batch_size)
            if route.has_cache:
                span.set_attribute("linchkit.cache_hit", outcome == "ok" and not state.attempts)
            span.end()

    def span(
        self, name: str, parent: context_api.Context, attributes: dict[str, Any]
    ) -> trace.Span:
        """A span of a stream or a host event (``dispatcher.telemetry.flows``)."""
        return self.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )

    @staticmethod
    def traceparent(span: trace.Span) -> str:
        return traceparent_of(span)

    @staticmethod
    def end(span: trace.Span, error: BaseException | None, outcome: str) -> None:
        """End a span of ``span``'s making with the outcome of what it covered."""
        if error is not None:
            _record_error(span, error, outcome)
        span.set_attribute("linchkit.outcome", outcome)
        span.end()

    @staticmethod
    def untraced() -> Any:
        """For a call that is not traced inside one that is (a local plugin calling
        again): its attempts must not join the outer call's span. Returns a token or None."""
        if _TRACED.get() is None:
            return None
        return _TRACED.set(None)

    @staticmethod
    def reset_untraced(token: Any) -> None:
        _TRACED.reset(token)

    # -- the provider boundary -------------------------------------------------------------

    def invoke(self, invoke: Invoke) -> Invoke:
        """``invoke`` with a span per attempt of a traced call. An attempt of a call that
        is not traced gets ``invoke``'s own coroutine back: one context-variable read, and
        no frame of ours between the chain and the provider (the unsampled hot path)."""
        tracer = self.tracer

        def traced_invoke(target: TargetConfig, invocation: Invocation) -> Awaitable[Any]:
            state = _TRACED.get()
            if state is None:
                return invoke(target, invocation)
            return attempt(state, target, invocation)

        async def attempt(state: CallSpan, target: TargetConfig, invocation: Invocation) -> Any:
            state.attempts += 1
            attributes: dict[str, Any] = {
                "linchkit.attempt": state.attempts,
                "linchkit.target.kind": target.provider,
                "linchkit.instance": target.describe(),
            }
            if state.in_flight:  # another attempt of this call still runs: a hedge
                attributes["linchkit.hedge"] = True
            span = tracer.start_span(
                f"{invocation.plugin}.{invocation.method} attempt",
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
            token = context_api.attach(trace.set_span_in_context(span))
            state.in_flight += 1
            try:
                return await invoke(
                    target, dataclasses.replace(invocation, traceparent=traceparent_of(span))
                )
            except BaseException as error:
                _record_error(span, error, error_type(error))
                raise
            finally:
                state.in_flight -= 1
                context_api.detach(token)
                span.end()

        return traced_invoke

    def invoke_batch(self, invoke_batch: InvokeBatch) -> InvokeBatch:
        """``invoke_batch`` with a span per batch holding a traced call, linked to each."""
        tracer = self.tracer
        calls = self._calls

        async def traced_batch(
            target: TargetConfig, invocations: Sequence[Invocation]
        ) -> list[Outcome[Any]]:
            traced = [state for each in invocations if (state := calls.get(id(each))) is not None]
            if not traced:
                return await invoke_batch(target, invocations)
            size = len(invocations)
            for state in traced:
                state.attempts += 1
                state.batch_size = size
            first = invocations[0]
            span = tracer.start_span(
                f"{first.plugin}.{first.method} batch",
                context=trace.set_span_in_context(traced[0].span),
                kind=SpanKind.CLIENT,
                links=[Link(state.span.get_span_context()) for state in traced],
                attributes={
                    "linchkit.batch_size": size,
                    "linchkit.target.kind": target.provider,
                    "linchkit.instance": target.describe(),
                },
            )
            try:
                outcomes = await invoke_batch(target, invocations)
            except BaseException as error:
                _record_error(span, error, error_type(error))
                raise
            else:
                span.set_attribute(
                    "linchkit.batch_failed", sum(1 for outcome in outcomes if not outcome.ok)
                )
                return outcomes
            finally:
                span.end()

        return traced_batch

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter (blocking: run it in a thread)."""
        self.provider.shutdown()

    async def aclose(self) -> bool:
        """``shutdown`` for the exporter's timeout at most, plus ``CLOSE_MARGIN_SECONDS``:
        True when the spans still buffered were sent. A collector that does not take them
        (silent, or slow) held a dispatcher's close up to 30 s (OpenTelemetry's batch
        processor waits that long for its thread, one batch after another): they are
        dropped then, with one warning naming it by scheme, host and port. The sending
        goes on in a daemon thread, which holds neither the loop nor the process's exit."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def shut_down() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(settle)

        threading.Thread(target=shut_down, name="linchkit-span-flush", daemon=True).start()
        bound = self.settings.export.timeout + CLOSE_MARGIN_SECONDS
        try:
            await asyncio.wait_for(asyncio.shield(done), bound)
        except TimeoutError:
            log.warning(
                "spans dropped at the close: the trace collector at %s did not take them"
                " within %g s (the exporter's timeout); check that it is up and answers",
                collector_shown(self.settings.endpoint or ""),
                round(bound, 1),
            )
            return False
        return True

    def _shown_endpoint(self) -> str | None:
        """The endpoint without its password: a user and password in it are the
        exporter's basic credentials."""
        endpoint = self.settings.endpoint
        return None if endpoint is None else masked_url(endpoint)

    def __repr__(self) -> str:
        return (
            f"<Tracing ratio={self.ratio:g} endpoint={self._shown_endpoint()!r} "
            f"calls_in_flight={len(self._calls)}>"
        )


def _record_error(span: trace.Span, error: BaseException, kind: str) -> None:
    if kind == "cancelled":  # a hedge that lost, a caller that left: not a failure
        span.set_attribute("linchkit.cancelled", True)
        return
    span.set_attribute("error.type", kind)
    if isinstance(error, PluginError):
        span.set_attribute("linchkit.remote_type", error.remote_type[:MAX_STATUS_CHARS])
    message = error.message if isinstance(error, DispatchError) else type(error).__name__
    span.set_status(Status(StatusCode.ERROR, message[:MAX_STATUS_CHARS]))
