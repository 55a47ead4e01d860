"""``CallStep``: the telemetry of one route's calls, the outermost link of its chain.

    Dispatcher.call ─► CallStep ─► [fallback ─►] cache ─► … ─► provider

Inserted when the route is built, and only when telemetry is configured: a dispatcher
without it runs the chain it always ran (not even a branch is added). Per call it sets the
log context (``CURRENT_CALL``), counts the call and its latency by outcome, records an
error in the ``ErrorLog``, and, when tracing is configured, asks ``Tracing`` whether the
call is traced; one that is not costs a flag read and a ``random()``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from dispatcher.telemetry.errors import ErrorLog, error_type
from dispatcher.telemetry.logs import CURRENT_CALL, CURRENT_TRACE_ID
from dispatcher.telemetry.metrics import MAX_OUTCOMES_PER_ROUTE, CallRecord, DispatcherMetrics
from providers.invocation import Invocation

if TYPE_CHECKING:
    from dispatcher.telemetry.tracing import RouteSpans, Tracing

__all__ = ["CallStep"]

Next = Callable[[Invocation], Awaitable[Any]]


class CallStep:
    """Telemetry around one route's chain."""

    __slots__ = (
        "_bounds",
        "_ok",
        "_outcomes",
        "errors",
        "method",
        "metrics",
        "next",
        "plugin",
        "spans",
        "tracing",
    )

    def __init__(
        self,
        plugin: str,
        method: str,
        next_step: Next,
        *,
        errors: ErrorLog,
        metrics: DispatcherMetrics | None = None,
        tracing: Tracing | None = None,
        spans: RouteSpans | None = None,
    ) -> None:
        self.plugin = plugin
        self.method = method
        self.next = next_step
        self.errors = errors
        self.metrics = metrics
        self.tracing = tracing
        self.spans = spans
        # Records found once (the `ok` one now, so its series exists from the start): a
        # lookup per call would cost more than the update itself.
        self._outcomes: dict[str, CallRecord] = {}
        self._ok: CallRecord | None = None
        self._bounds: tuple[float, ...] = ()
        if metrics is not None:
            self._bounds = metrics.bounds
            self._ok = self._record("ok")

    def _record(self, outcome: str) -> CallRecord:
        record = self._outcomes.get(outcome)
        if record is None:
            assert self.metrics is not None
            if len(self._outcomes) >= MAX_OUTCOMES_PER_ROUTE:
                outcome = "other"
            record = self._outcomes[outcome] = self.metrics.record(
                self.plugin, self.method, outcome
            )
        return record

    async def __call__(self, invocation: Invocation) -> Any:
        tracing = self.tracing
        untraced = None
        if tracing is not None:
            parent = tracing.parent(invocation.traceparent)
            if parent is not None:
                return await self._traced(tracing, invocation, parent)
            untraced = tracing.untraced()
        token = CURRENT_CALL.set(invocation)
        start = perf_counter()
        try:
            result = await self.next(invocation)
        except BaseException as error:
            self._failed(invocation, error, perf_counter() - start)
            raise
        finally:
            CURRENT_CALL.reset(token)
            if untraced is not None:
                tracing.reset_untraced(untraced)  # type: ignore[union-attr]
        ok = self._ok
        if ok is not None:
            elapsed = perf_counter() - start
            ok.buckets[bisect_left(self._bounds, elapsed)] += 1
            ok.sum += elapsed
        return result

    async def _traced(self, tracing: Tracing, invocation: Invocation, parent: Any) -> Any:
        assert self.spans is not None
        token = CURRENT_CALL.set(invocation)
        trace_token = CURRENT_TRACE_ID.set(None)  # tracing.call sets it; reset here, after
        start = perf_counter()  # the error is recorded with it
        try:
            result = await tracing.call(self.spans, invocation, parent, self.next)
        except BaseException as error:
            self._failed(invocation, error, perf_counter() - start)
            raise
        finally:
            CURRENT_TRACE_ID.reset(trace_token)
            CURRENT_CALL.reset(token)
        ok = self._ok
        if ok is not None:
            elapsed = perf_counter() - start
            ok.buckets[bisect_left(self._bounds, elapsed)] += 1
            ok.sum += elapsed
        return result

    def _failed(self, invocation: Invocation, error: BaseException, elapsed: float) -> None:
        if self.metrics is not None:
            record = self._record(error_type(error))
            record.buckets[bisect_left(self._bounds, elapsed)] += 1
            record.sum += elapsed
        self.errors.record(invocation, error, CURRENT_TRACE_ID.get())

    def __repr__(self) -> str:
        return (
            f"<CallStep {self.plugin}.{self.method} metrics={self.metrics is not None}"
            f" tracing={self.tracing is not None}>"
        )
