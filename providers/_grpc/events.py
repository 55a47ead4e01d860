"""A plugin's ``Events`` stream (``proto/plugin.proto``), kept open in a task it owns: what
the plugin emits goes to the host's sink, host events queued with ``send`` go to the plugin.

A stream that ends (the plugin restarted or went away) is reopened after a wait that starts
at 0.05 s, doubles with each end up to 2 s, and starts over once an event arrives. A plugin
that answers UNIMPLEMENTED has no ``Events`` stream and is not asked again; a closed channel
ends the task. Events beyond ``max_per_second`` (the target's ``max_events_per_second``,
as on the WebSocket binding: ``providers._event_rate``) are dropped before their data is
decoded, counted (``events_dropped``) and logged sparingly; a flood costs the host what
reading it from gRPC costs, never a decode or a handler per event. An event whose data is
not JSON is skipped and counted (``bad_events``), and logged sparingly (the first, the
1,000th, every 100,000th; its name escaped and cut); a sink that raises is logged, and the
stream goes on. ``PluginConnection`` opens the RPC on its channel
(``OpenEvents``) and ends the task with ``close`` before it closes that channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.wire import encode_json
from providers._event_rate import DEFAULT_MAX_EVENTS_PER_SECOND, EventRate
from providers._grpc.replies import loads
from providers._log_lines import sparingly
from providers.host_events import HostEvents

__all__ = ["EventsStream", "OpenEvents"]

log = logging.getLogger("dispatcher.providers.grpc")


class OpenEvents(Protocol):
    """Open the ``Events`` RPC with ``outgoing`` as the host's side of it, and return the
    call as grpc.aio makes it; ``grpc.aio.BaseError`` when the channel is closed."""

    def __call__(self, outgoing: AsyncIterator[Any], /) -> Any: ...


class EventsStream:
    """One plugin's ``Events`` stream, reopened whenever it ends until ``close``.

    ``host_event`` builds the ``HostEvent`` message of a name and its JSON; ``describe``
    names the plugin's connection in logs and errors; ``max_per_second`` bounds the
    plugin's events (``EventRate``).
    """

    def __init__(
        self,
        host_event: Callable[..., Any],
        describe: str,
        *,
        max_per_second: float = DEFAULT_MAX_EVENTS_PER_SECOND,
    ) -> None:
        self._host_event = host_event
        self.describe = describe
        #: Events beyond ``max_per_second`` are dropped, counted and logged sparingly.
        self._rate = EventRate(max_per_second, describe, log)
        self._task: asyncio.Task[None] | None = None
        self._outgoing: HostEvents[tuple[str, bytes]] = HostEvents(describe)
        self._open = asyncio.Event()
        self._closed = False
        #: Events whose data was not JSON: skipped, and logged sparingly.
        self.bad_events = 0

    @property
    def running(self) -> bool:
        """Whether ``open`` started the stream's task (and ``close`` has not ended it)."""
        return self._task is not None

    def open(self, open_call: OpenEvents, sink: Callable[[str, Any], None]) -> None:
        """Keep the stream open in a task; its events go to ``sink``. Once only."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(open_call, sink), name=f"events {self.describe}"
            )

    async def ready(self, timeout: float) -> bool:
        """Wait until the plugin has answered the stream's headers (so an ``emit`` from now
        on is not lost); False after ``timeout`` (plugins that send headers only with their
        first event)."""
        try:
            async with asyncio.timeout(timeout):
                await self._open.wait()
        except TimeoutError:
            return False
        return True

    def send(self, name: str, data: Any) -> None:
        """Queue a host event for the plugin (delivered while the stream is open; at most
        ``HOST_EVENTS_HELD`` wait, past that the oldest goes)."""
        if self._task is None:
            raise ProviderError(f"{self.describe} has no open Events stream")
        self._outgoing.hold((name, encode_json(data)))

    async def close(self) -> None:
        """End the stream's task, and wait until it has ended; it is not reopened."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait, not ``await task`` under suppress(CancelledError): that would
            # also swallow a cancellation of *our* caller arriving meanwhile (a supervisor
            # being stopped would then carry on and launch a new child).
            await asyncio.wait([task])

    def counters(self) -> dict[str, int]:
        """What the plugin sent that did not reach the host's handlers, when anything
        did not (``dispatcher health`` shows them)."""
        counts = {"events_dropped": self.events_dropped, "bad_events": self.bad_events}
        return {name: count for name, count in counts.items() if count}

    @property
    def events_dropped(self) -> int:
        """Events beyond ``max_per_second``, dropped."""
        return self._rate.dropped

    async def _outgoing_events(self, ended: asyncio.Future[None]) -> AsyncIterator[Any]:
        """The host events of one ``Events`` stream, until ``ended``.

        grpc.aio reads this in a task of its own, which it cancels only when the call is
        cancelled while still running: a stream the plugin's exit ended left that task
        waiting on the queue for good, one per restart, each taking host events meant for
        the next stream. So each stream's reader stops when its stream ends."""
        queue = self._outgoing
        while not ended.done():
            getting = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait((getting, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getting.done():
                    getting.cancel()  # Queue.get gives up without taking an item
            if getting.cancelled():
                return
            item = getting.result()
            if item is None:
                return
            yield self._host_event(name=item[0], data_json=item[1])

    async def _run(self, open_call: OpenEvents, sink: Callable[[str, Any], None]) -> None:
        import grpc.aio

        backoff = 0.05
        loop = asyncio.get_running_loop()
        while not self._closed:
            ended: asyncio.Future[None] = loop.create_future()
            try:
                call = open_call(self._outgoing_events(ended))
            except grpc.aio.BaseError as error:  # the channel closed under us
                log.debug("%s Events stream cannot open: %s", self.describe, error)
                return
            try:
                await call.initial_metadata()
                self._open.set()
                async for event in call:
                    backoff = 0.05
                    if not self._rate.admit():
                        continue
                    try:
                        data = loads(event.data_json, self.describe)
                    except ProviderError:
                        self.bad_events += 1
                        bad = self.bad_events
                        if sparingly(bad):
                            log.warning(
                                "%s sent event %.80r with bad JSON (%d so far)",
                                self.describe,
                                event.name,
                                bad,
                            )
                        continue
                    try:
                        sink(event.name, data)
                    except Exception:  # one bad handler must not end the stream
                        log.exception("%s: delivering event %r failed", self.describe, event.name)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("%s has no Events stream", self.describe)
                    return
                log.debug("%s Events stream ended: %s", self.describe, error.code().name)
            except grpc.aio.BaseError as error:
                log.debug("%s Events stream failed: %s", self.describe, error)
            finally:
                self._open.clear()
                call.cancel()
                ended.set_result(None)
            # The stream ended (the plugin restarted or went away): reopen it, gently.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
