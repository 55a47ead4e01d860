"""What one connection has asked its plugin and not yet had answered, by id, and which
of the plugin's replies answers it (``InFlight``).

    call ─────► future ◄── response
    health ───► future ◄── health          (the read watch's probes: their ids, no future)
    stream ───► queue  ◄── chunk …, then response
    any of them        ◄── error (the plugin could not use the frame)

A reply answers its id only if its kind answers what that id asked. One of another kind
(a ``health`` naming a call, a ``response`` naming a probe, a ``chunk`` naming a call)
answers nothing: the channel counts it as a protocol error, and what its id asked goes on
waiting for its own answer, so a lie never becomes a result, nor fails a call the plugin
may still answer. A reply naming an id not in flight (a late one, a made-up one) is the
channel's to count too.

The read watch's probes are waited on by nobody: their answers' coming is the point
(``read_watch``). Every probe not yet answered is kept (the last ``WATCH_PROBES_KEPT``),
not only the last one sent: a plugin may answer one after the watch, having seen other
frames from it meanwhile, has sent the next, and that answer is then still an answer, not
a stray. Each is answered once.

How many calls one target may have in flight on a connection, and how large a message
each may send and take, is a ``CallLimits``: a dialled connection serves one target, a
plugin dialling in serves all its inbound targets over one, each held to its own.

A stream's queue holds its chunks up to ``STREAM_QUEUE``, and one place more for what
ends it (its response, an error, ``Overloaded``, the connection's end), which chunks never
take: its reader learns of its end right after the chunks it has, not at its deadline.
The channel waits on these futures and queues with its callers' deadlines; nothing here
does I/O or keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from linchkit_plugin.errors import Overloaded
from linchkit_plugin.ws_protocol import STREAM_WINDOW

__all__ = ["STREAM_QUEUE", "WATCH_PROBES_KEPT", "CallBounds", "CallLimits", "InFlight"]

#: Chunks of one stream held for its consumer: the plugin's window (it sends no more
#: until granted ``credit``) and some to spare. A plugin that ignores the window fills it,
#: and its stream fails ``Overloaded``.
STREAM_QUEUE = STREAM_WINDOW + 8
#: The read watch's probes kept waiting for their answers. The watch sends one at most
#: every two of its bounds, and only after a silence: more than a few outstanding is a
#: plugin that does not answer ``health`` at all (its other frames keep it), whose
#: probes are then forgotten oldest first rather than kept for the connection's life.
WATCH_PROBES_KEPT = 16


class CallLimits:
    """What one target allows its calls and streams on one connection: at most
    ``max_in_flight`` at once (``in_flight`` counts them), each message at most
    ``max_message_bytes``, the calls' own and the plugin's answers to them."""

    __slots__ = ("in_flight", "max_in_flight", "max_message_bytes")

    def __init__(self, *, max_in_flight: int, max_message_bytes: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.in_flight = 0

    def __repr__(self) -> str:
        return (
            f"<CallLimits in_flight={self.in_flight}/{self.max_in_flight}"
            f" max_message_bytes={self.max_message_bytes}>"
        )


class CallBounds:
    """Each call's target limits on one connection: its calls in flight counted against
    their target's ``CallLimits``, and the message bound of each whose target allows less
    than the socket reads (the socket enforces its own bound; the channel these).

    ``own`` is the connection's: a dialled one serves one target, whose calls use it. A
    plugin dialling in serves all its inbound targets over one connection, each held to
    its own ``CallLimits``.
    """

    __slots__ = ("_below_socket", "own", "tightest")

    def __init__(self, own: CallLimits) -> None:
        self.own = own
        #: Calls and streams in flight whose target's bound is below the socket's: id →
        #: that bound.
        self._below_socket: dict[int, int] = {}
        #: The smallest bound of any call made: a reply no larger is within its call's
        #: bound, and is not looked up (``bound_of``).
        self.tightest = own.max_message_bytes

    def count(self, call_id: int, limits: CallLimits) -> None:
        """Call ``call_id`` of a target with ``limits`` is in flight (until ``release``)."""
        limits.in_flight += 1
        bound = limits.max_message_bytes
        if bound < self.own.max_message_bytes:
            self._below_socket[call_id] = bound
            if bound < self.tightest:
                self.tightest = bound

    def release(self, call_id: int, limits: CallLimits) -> None:
        """Call ``call_id`` (counted with ``limits``) has ended."""
        limits.in_flight -= 1
        if self._below_socket:
            self._below_socket.pop(call_id, None)

    def bound_of(self, call_id: int) -> int | None:
        """The bound of call ``call_id``'s messages, if its target's is below the socket's."""
        return self._below_socket.get(call_id)

    def __repr__(self) -> str:
        return (
            f"<CallBounds own={self.own!r} below_socket={len(self._below_socket)}"
            f" tightest={self.tightest}>"
        )


class InFlight:
    """The calls, health probes and streams in flight on one connection, by id."""

    __slots__ = ("_calls", "_describe", "_overflowed", "_probes", "_watch_probes", "streams")

    def __init__(self, describe: str, *, overflowed: Callable[[int], None]) -> None:
        """``overflowed(call_id)``: stream ``call_id`` was failed for a reader that fell
        ``STREAM_QUEUE`` chunks behind; its plugin is still sending (cancel it)."""
        self._describe = describe
        self._overflowed = overflowed
        #: Unary calls: id → the future of their response.
        self._calls: dict[int, asyncio.Future[Any]] = {}
        #: Health probes a caller waits on: id → the future of their ``health`` frame.
        self._probes: dict[int, asyncio.Future[Any]] = {}
        #: Streams: id → the queue of their chunks and what ends them.
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        #: The read watch's probes not yet answered, oldest first: their answers are
        #: wanted, not waited on (the values are unused).
        self._watch_probes: dict[int, None] = {}

    def __len__(self) -> int:
        return len(self._calls) + len(self._probes) + len(self.streams)

    # -- what this side asks ---------------------------------------------------------------

    def call(self, call_id: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        return future

    def probe(self, call_id: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._probes[call_id] = future
        return future

    def watch_probe(self, call_id: int) -> None:
        """The read watch sent health probe ``call_id``: its answer is one, whenever it
        comes, while the last ``WATCH_PROBES_KEPT`` probes are kept."""
        probes = self._watch_probes
        if len(probes) >= WATCH_PROBES_KEPT:
            del probes[next(iter(probes))]
        probes[call_id] = None

    def stream(self, call_id: int) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_QUEUE + 1)
        self.streams[call_id] = queue
        return queue

    def forget_call(self, call_id: int) -> bool:
        """Stop waiting for call ``call_id``; whether it was still in flight."""
        return self._calls.pop(call_id, None) is not None

    def forget_probe(self, call_id: int) -> None:
        self._probes.pop(call_id, None)

    def forget_stream(self, call_id: int) -> bool:
        """Stop waiting for stream ``call_id``; whether it was still in flight."""
        return self.streams.pop(call_id, None) is not None

    # -- what the plugin replies -----------------------------------------------------------

    def reply(self, kind: str, call_id: int, frame: dict[str, Any]) -> bool:
        """Hand a ``response``, ``chunk`` or ``health`` frame to what its id asked, if its
        kind answers that: a ``response`` a call or a stream, a ``chunk`` a stream, a
        ``health`` a health probe. Whether it did."""
        if kind == "response":
            future = self._calls.pop(call_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(frame.get("response"))
                return True
        elif kind == "health":
            future = self._probes.pop(call_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(frame)
                return True
            # The answer to one of the read watch's probes: its coming was the point.
            return self._watch_probe_answered(call_id)
        queue = self.streams.get(call_id)
        if queue is None:
            return False
        self._to_stream(call_id, queue, frame)
        return True

    def asked(self, call_id: int) -> str | None:
        """What id ``call_id`` asked the plugin, if it is in flight."""
        if call_id in self._calls:
            return "call"
        if call_id in self.streams:
            return "stream"
        if call_id in self._probes or call_id in self._watch_probes:
            return "health probe"
        return None

    def fail(self, call_id: int, error: BaseException) -> bool:
        """End what ``call_id`` asked with ``error`` (the plugin's ``error`` frame, or its
        frame never went out); whether anything was in flight under it."""
        future = self._calls.pop(call_id, None) or self._probes.pop(call_id, None)
        if future is not None:
            if not future.done():
                future.set_exception(error)
            return True
        queue = self.streams.pop(call_id, None)
        if queue is not None:
            end_stream(queue, error)
            return True
        # A plugin that could not use one of the read watch's probes said so: an answer,
        # and its coming was the point.
        return self._watch_probe_answered(call_id)

    def _watch_probe_answered(self, call_id: int) -> bool:
        """Whether ``call_id`` is one of the read watch's probes not yet answered; it is
        answered now."""
        if call_id not in self._watch_probes:
            return False
        del self._watch_probes[call_id]
        return True

    def cut_off(self, error: Callable[[], BaseException]) -> None:
        """The connection ended: everything in flight fails, each with an ``error()``."""
        futures = [*self._calls.values(), *self._probes.values()]
        queues = list(self.streams.values())
        self._calls, self._probes, self.streams = {}, {}, {}
        self._watch_probes.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error())
        for queue in queues:
            end_stream(queue, error())

    def _to_stream(self, call_id: int, queue: asyncio.Queue[Any], frame: dict[str, Any]) -> None:
        if frame["type"] != "chunk":
            end_stream(queue, frame)
            return
        if queue.qsize() < STREAM_QUEUE:
            queue.put_nowait(frame)
            return
        # The consumer reads slower than the plugin writes: end the stream rather than
        # hold its chunks without bound, or stall the reader every other call shares.
        self.streams.pop(call_id, None)
        end_stream(
            queue,
            Overloaded(
                f"{self._describe} stream {call_id}: its reader fell {STREAM_QUEUE} chunks behind"
            ),
        )
        self._overflowed(call_id)

    def __repr__(self) -> str:
        return (
            f"<InFlight calls={len(self._calls)} probes={len(self._probes)}"
            f" streams={len(self.streams)} watch_probes={len(self._watch_probes)}>"
        )


def end_stream(queue: asyncio.Queue[Any], end: Any) -> None:
    """Queue what ends a stream, in the place its queue keeps for it (chunks never take
    it). Full only when an end is queued already, which the reader stops at."""
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(end)
