"""Events over a plugin's gRPC server (``linchkit_plugin.grpc_server``): the plugin's
events fanned out to every open ``Events`` stream, and a host's events handed to the
plugin's ``on_event``.

Each stream holds at most ``EVENTS_PER_STREAM`` events its host has not read; past that the
oldest go, and the first drop is said on stderr (docs/protocol.md). A host event the plugin
cannot take is said on stderr and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterable
from typing import Any, TypeAlias

import orjson

from linchkit_plugin.errors import ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import encode_result, event_name_refused

log = logging.getLogger("linchkit_plugin")

__all__ = ["EVENTS_PER_STREAM", "EventStreams", "deliver_host_events"]

#: The most plugin events one Events stream holds while its host does not read them; the
#: oldest go first past it (docs/protocol.md). Unbounded, a host that stopped reading made
#: the plugin keep every event it emitted: 20,000 of 16 KB grew it by 390 MB.
EVENTS_PER_STREAM = 1024

#: One open stream's events: (name, data as JSON), or None once the server stops.
EventQueue: TypeAlias = asyncio.Queue[tuple[str, bytes] | None]


class EventStreams:
    """The open ``Events`` streams of one server, and the loop they are served on.

    ``emit`` may be called from any thread; each stream's queue is touched only on the
    server's loop.
    """

    def __init__(self) -> None:
        self._queues: set[EventQueue] = set()
        #: The server's loop, once it serves: until then an event has nobody to reach.
        self.loop: asyncio.AbstractEventLoop | None = None

    def emit(self, event: str, data: Any = None) -> None:
        """Send a plugin event to every open Events stream; callable from any thread. An
        event JSON cannot carry is logged and dropped, as over WebSocket (until 2026-12-07
        ``emit`` raised here, and sent a NaN as ``null``)."""
        loop = self.loop
        if loop is None:
            return
        if event_name_refused(event):
            return
        try:
            payload = (event, encode_result(data, f"the data of event {event!r:.80}"))
        except ProviderError as error:
            log.warning("event %r not sent: %s", event, error.message)
            return
        for queue in list(self._queues):
            loop.call_soon_threadsafe(_offer, queue, payload)

    def open(self) -> EventQueue:
        """A new stream's queue, reached by every event emitted from now on."""
        queue: EventQueue = asyncio.Queue()
        self._queues.add(queue)
        return queue

    def close(self, queue: EventQueue) -> None:
        self._queues.discard(queue)

    def end_all(self) -> None:
        """End every open stream (they never end by themselves): the server is stopping."""
        for queue in list(self._queues):
            queue.put_nowait(None)

    def __repr__(self) -> str:
        return f"<EventStreams open={len(self._queues)} serving={self.loop is not None}>"


def _offer(queue: EventQueue, payload: tuple[str, bytes]) -> None:
    """Queue ``payload`` for one Events stream, dropping its oldest event when it is full."""
    if queue.qsize() >= EVENTS_PER_STREAM:
        queue.get_nowait()
        dropped = _dropped.get(queue, 0)
        if not dropped:
            # Every SDK's words (the WebSocket sessions' too), so one search finds them all.
            log.warning("the host is not reading its Events stream; dropping the oldest events")
        _dropped[queue] = dropped + 1
    queue.put_nowait(payload)


#: Events dropped per stream (its first drop is logged, not each one).
_dropped: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


async def deliver_host_events(host: PluginHost, request_iterator: AsyncIterable[Any]) -> None:
    """Hand each host event of one ``Events`` stream to the plugin's ``on_event``."""
    async for event in request_iterator:
        try:
            data = orjson.loads(event.data_json) if event.data_json else None
            await host.deliver(event.name, data)
        except Exception as error:  # one bad event must not end the stream
            # A level the host reads (subprocess plugins: providers/subprocess/levels.py).
            log.error("host event %r failed: %r", event.name, error)
