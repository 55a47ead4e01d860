"""The policies of a stream or a host event: admission at the start, accounting at the end.

A streaming call (``Dispatcher.stream``) and a host event (``Dispatcher.publish``) are not
request/response calls, so only part of the chain fits them:

* **rate limits** count a stream once, when it opens (and an event once);
* a **bulkhead** slot is held until the stream ends, so streams and calls share the cap;
* the target's **breaker** admits the stream when it opens and counts how it ends: a
  health failure (``TargetUnavailable``, ``DeadlineExceeded``) before or after chunks
  counts against the target, any other end as a success; with shared state it is the
  breaker every replica shares (``dispatcher.fleet.shared_breaker``), as for calls;
* the **deadline** travels to the target as for any call and the transport enforces it.

Not cache (a stream is not one value to keep), not batching (no batch form), not retry
(chunks already delivered cannot be taken back). A method's gate shares its limits,
bulkhead and breaker with the method's chain; an event's gate holds only what is scoped
to the target, since an event belongs to no method.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from dispatcher.fleet.breaker import CircuitBreaker, is_health_failure
from dispatcher.fleet.shared_breaker import SharedBreaker
from dispatcher.policies.concurrency import Bulkhead
from dispatcher.policies.ratelimit import LimitLike
from linchkit_plugin.errors import DispatchError
from providers.invocation import Invocation

__all__ = ["Gate"]


@dataclass(frozen=True, slots=True)
class Gate:
    """Admission and accounting for one method's streams or one target's events."""

    limits: Sequence[LimitLike] = ()
    bulkhead: Bulkhead | None = None
    breaker: CircuitBreaker | None = None
    #: With shared state, the breaker every replica shares (it wraps ``breaker``, which
    #: then decides only when the store cannot answer and ``fail_open`` says so).
    shared: SharedBreaker | None = None

    async def stream(
        self,
        invocation: Invocation,
        open_stream: Callable[[Invocation], AsyncGenerator[Any, None]],
    ) -> AsyncGenerator[Any, None]:
        """The chunks of ``open_stream(invocation)``, once the gate has let it through."""
        async with self._passage(invocation):
            chunks = open_stream(invocation)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

    async def send(self, invocation: Invocation, send: Callable[[], Awaitable[None]]) -> None:
        """Run ``send`` (one host event to one target) through the gate."""
        async with self._passage(invocation):
            await send()

    @asynccontextmanager
    async def _passage(self, invocation: Invocation) -> AsyncIterator[None]:
        """Admit ``invocation`` (limits, bulkhead slot, breaker), then account for its end."""
        for limit in self.limits:
            await limit.acquire(invocation)
        bulkhead = self.bulkhead
        if bulkhead is not None:
            await bulkhead.acquire(invocation)
        try:
            if self.shared is not None:
                async with self._shared_passage(self.shared, invocation):
                    yield
                return
            breaker = self.breaker
            probe = breaker.admit() if breaker is not None else False
            try:
                yield
            except DispatchError as error:
                self._record(probe, error)
                raise
            except BaseException:  # cancelled, or a stream left early: tells nothing
                if breaker is not None:
                    breaker.record_nothing(probe)
                raise
            self._record(probe, None)
        finally:
            if bulkhead is not None:
                bulkhead.release()

    @staticmethod
    @asynccontextmanager
    async def _shared_passage(
        breaker: SharedBreaker, invocation: Invocation
    ) -> AsyncIterator[None]:
        ticket = await breaker.admit(invocation)
        try:
            yield
        except DispatchError as error:
            await breaker.record(ticket, is_health_failure(error), invocation)
            raise
        except BaseException:
            breaker.record_nothing(ticket)
            raise
        await breaker.record(ticket, False, invocation)

    def _record(self, probe: bool, error: DispatchError | None) -> None:
        breaker = self.breaker
        if breaker is None:
            return
        if error is not None and is_health_failure(error):
            breaker.record_failure(probe)
        else:
            breaker.record_success(probe)
