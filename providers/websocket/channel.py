"""One open WebSocket to one plugin instance, its calls multiplexed by id (``Channel``):
what its callers send over it and how they wait for the answers, the parts put together.

    call ──frame {type: call, id, request}──► plugin ──{type: response, id, response}──► future
    deadline (asyncio.timeout_at) ─► DeadlineExceeded to the caller, {type: cancel, id} out
    socket closes ─► every call in flight: TargetUnavailable (stage "in_flight")

A call costs two futures, one timeout and one dict entry; no task. The reader
(``FrameReader``, ``reader.py``) runs in the task that owns the connection (``run``) and
only resolves futures and hands events to the sink, so a slow caller never stalls it. One
writer task per channel writes every frame (``FrameWriter``, ``writer.py``), in order; a
sender waits for its frame to go out. Memory stays bounded on both ways:

* out: at most ``max_in_flight`` calls (then ``Overloaded``), each message at most
  ``max_message_bytes`` (``InvalidParams`` for that call), both those of the call's target
  (``CallLimits``: a plugin dialling in serves several targets over one connection, each
  held to its own), and every frame waits for the
  socket to drain before the next goes, so a plugin that reads slowly slows its callers,
  not the heap. A frame whose sender gave up before its turn is never written (and its
  call gets no ``cancel``); a ``cancel`` is a queued frame, not a task. A write that the
  plugin takes nothing of for 1.5 heartbeats drops the connection (``lifecycle.py``);
* in: a message over the connection's ``max_message_bytes`` closes it (1009), one over its
  call's target's fails that call (``reader.py``); a stream's chunks queue up to
  ``STREAM_QUEUE`` (then the stream fails ``Overloaded`` and is cancelled); events beyond
  ``max_events_per_second`` are dropped and counted (``PluginEvents``, ``events.py``).

What is in flight, and which reply answers it, is kept by ``InFlight`` (``in_flight.py``);
what the plugin sends that answers nothing is counted by the reader (``unknown_ids``,
``protocol_errors``), and costs no call the plugin answers properly.

Whether the channel is open, going away or closed, how it gets from one to the next and
the tasks that takes are ``ChannelLifecycle``'s (``lifecycle.py``): a call on a channel
going away or closed is refused as never sent (stage ``connect``), and ``leaving`` tells
its owner to stop using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

from linchkit_plugin.errors import (
    DeadlineExceeded,
    DispatchError,
    InvalidParams,
    Overloaded,
    TargetUnavailable,
)
from linchkit_plugin.wire import decode_response
from linchkit_plugin.ws_protocol import STREAM_WINDOW, encode_frame
from providers.base import Health
from providers.invocation import Invocation
from providers.websocket.events import EventSink, PluginEvents
from providers.websocket.in_flight import CallBounds, CallLimits, InFlight
from providers.websocket.lifecycle import (
    CLOSE_STALLED,
    READ_STALLED_REASON,
    STALL_HEARTBEATS,
    ChannelLifecycle,
)
from providers.websocket.read_watch import ReadWatch
from providers.websocket.reader import MAX_REFUSALS_WAITING, FrameReader
from providers.websocket.writer import FrameWriter, Socket

__all__ = [
    "CLOSE_STALLED",
    "MAX_REFUSALS_WAITING",
    "READ_STALLED_REASON",
    "STALL_HEARTBEATS",
    "Channel",
    "EventSink",
    "Socket",
]

#: Consumed chunks that earn the plugin a ``credit`` frame: half a window at a time.
_CREDIT_EVERY = STREAM_WINDOW // 2


class Channel:
    """Calls, streams, health probes and events over one open WebSocket."""

    def __init__(
        self,
        socket: Socket,
        describe: str,
        *,
        ids: Iterator[int] | None = None,
        heartbeat: float,
        max_in_flight: int,
        max_message_bytes: int,
        max_events_per_second: float,
        sink: EventSink | None,
    ) -> None:
        """``heartbeat``: the connection's, in seconds; a write the plugin takes nothing of
        for ``STALL_HEARTBEATS`` of it drops the connection. ``max_message_bytes``: the
        largest message the socket reads (its own bound, aiohttp's); with ``max_in_flight``
        also the limits of a call made without ``CallLimits`` of its own."""
        self.socket = socket
        self.describe = describe
        #: The largest message the plugin reads, as its ``hello`` said (None: it said
        #: none, and is sent what its target allows). A larger call or host event is
        #: refused here, typed: sent, the plugin would close the connection (1009) under
        #: every call on it.
        self.plugin_reads: int | None = None
        self._ids = ids if ids is not None else itertools.count(1)
        self._bounds = CallBounds(
            CallLimits(max_in_flight=max_in_flight, max_message_bytes=max_message_bytes)
        )
        self._events = PluginEvents(
            sink, max_events_per_second=max_events_per_second, describe=describe
        )
        self._loop = asyncio.get_running_loop()
        # The writer and the read watch tell the lifecycle of a stall or a loss, and the
        # lifecycle is made of them: their callbacks look it up when they are called.
        self._writer = FrameWriter(
            socket,
            describe,
            stall_after=STALL_HEARTBEATS * heartbeat,
            never_sent=self._frame_never_sent,
            stalled=lambda: self._life.writes_stalled(),
            lost=lambda reason: self._life.end(reason),
        )
        self._in_flight = InFlight(describe, overflowed=self._writer.queue_cancel)
        #: Whole frames read, looked at once every 1.5 heartbeats (``read_watch``).
        self._read_watch = ReadWatch(
            self._loop,
            STALL_HEARTBEATS * heartbeat,
            probe=self._probe,
            stalled=lambda: self._life.reads_stalled(),
        )
        self._life = ChannelLifecycle(
            socket,
            describe,
            writer=self._writer,
            in_flight=self._in_flight,
            read_watch=self._read_watch,
        )
        self._reader = FrameReader(
            socket,
            describe,
            in_flight=self._in_flight,
            bounds=self._bounds,
            events=self._events,
            watch=self._read_watch,
            cancel=self._writer.queue_cancel,
            goaway=self._life.plugin_goes_away,
            spawn=self._life.spawn,
            send_quietly=self._send_quietly,
        )

    @property
    def usable(self) -> bool:
        """Open and not going away: new calls may be sent on it."""
        return self._life.usable

    @property
    def closed(self) -> bool:
        return self._life.closed

    @property
    def close_reason(self) -> str:
        """Why the channel closed ("" while it is open)."""
        return self._life.close_reason

    @property
    def going_away(self) -> bool:
        """Either side said ``goaway``: nothing new is sent; it closes once drained."""
        return self._life.going_away

    @property
    def leaving(self) -> asyncio.Event:
        """Set on ``goaway`` or when the channel closes: its owner stops using it."""
        return self._life.leaving

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def to_write(self) -> int:
        """Frames waiting for the writer (``FrameWriter``), given-up ones not yet pruned."""
        return len(self._writer)

    @property
    def background_tasks(self) -> int:
        """Tasks the channel started beside its reader and writer that still run: a refusal
        sent, a probe, a close once drained or a drop (``ChannelLifecycle.spawn``);
        ``close`` ends them."""
        return self._life.background_tasks

    @property
    def unknown_ids(self) -> int:
        """Answers for ids not in flight (late, or made up), dropped (``FrameReader``)."""
        return self._reader.unknown_ids

    @property
    def protocol_errors(self) -> int:
        """Frames from the plugin that this side could not use (``FrameReader``)."""
        return self._reader.protocol_errors

    @property
    def max_message_bytes(self) -> int:
        """The largest message the socket reads: what the plugin is told to send at most."""
        return self._bounds.own.max_message_bytes

    @property
    def events_dropped(self) -> int:
        """The plugin's events beyond ``max_events_per_second``, dropped."""
        return self._events.dropped

    @property
    def events_dropped_by_plugin(self) -> int:
        """The events the plugin said it dropped while disconnected."""
        return self._events.dropped_by_plugin

    # -- calls -----------------------------------------------------------------------------

    def _frame(
        self, kind: str, call_id: int, invocation: Invocation, now: float, limits: CallLimits
    ) -> bytes:
        data = encode_frame({"type": kind, "id": call_id, "request": invocation.request_wire(now)})
        if len(data) > limits.max_message_bytes:
            raise _too_large(
                f"{invocation.plugin}.{invocation.method}: the call is {len(data)} bytes,"
                f" over its target's max_message_bytes={limits.max_message_bytes}"
                f" ({self.describe})",
                len(data),
                limits.max_message_bytes,
            )
        reads = self.plugin_reads
        if reads is not None and len(data) > reads:
            raise _too_large(
                f"{invocation.plugin}.{invocation.method}: the call is {len(data)} bytes,"
                f" over the {reads} bytes the plugin reads (its hello's max_message_bytes)"
                f" ({self.describe})",
                len(data),
                reads,
            )
        return data

    def _admit(self, invocation: Invocation, limits: CallLimits) -> tuple[int, float]:
        """An id for a call or stream of a target with ``limits``, counted there as in
        flight: the caller releases it (``CallBounds.release``) once it ends."""
        life = self._life
        if not life.usable:
            reason = (
                "is going away" if not life.closed else f"is not connected: {life.close_reason}"
            )
            raise TargetUnavailable(f"{self.describe} {reason}", details={"stage": "connect"})
        if limits.in_flight >= limits.max_in_flight:
            raise Overloaded(
                f"{self.describe} has {limits.in_flight} calls of"
                f" {invocation.plugin}.{invocation.method}'s target in flight"
                f" (its max_in_flight)"
            )
        now = self._loop.time()
        if invocation.deadline <= now:
            raise DeadlineExceeded(f"deadline passed before calling {self.describe}")
        call_id = next(self._ids)
        self._bounds.count(call_id, limits)
        return call_id, now

    async def call(self, invocation: Invocation, limits: CallLimits | None = None) -> Any:
        """``invocation``'s answer; ``limits``: its target's (the connection's own if
        None: a dialled connection serves one target)."""
        if limits is None:
            limits = self._bounds.own
        call_id, now = self._admit(invocation, limits)
        try:
            data = self._frame("call", call_id, invocation, now, limits)
            future = self._in_flight.call(call_id)
            written = self._writer.queue(data, call_id)
            try:
                # One deadline over the send and the answer: a plugin that stops reading
                # blocks the send (the socket does not drain), and must not hold the caller
                # past its deadline there either.
                async with asyncio.timeout_at(invocation.deadline):
                    if self._writer.draining:  # backpressure: wait for the call to go out
                        await self._sent(written, invocation)
                    response = await future
            except TimeoutError:
                self._forget(call_id, future)
                self._writer.cancel(call_id, written)  # the plugin may stop working on it
                raise DeadlineExceeded(
                    f"{self.describe} {invocation.plugin}.{invocation.method}"
                    " did not answer in time"
                ) from None
            except asyncio.CancelledError:
                if self._in_flight.forget_call(call_id):
                    self._writer.cancel(call_id, written)  # the caller gave up: so may the plugin
                raise
            except TargetUnavailable:
                self._forget(call_id, future)
                raise
        finally:
            self._bounds.release(call_id, limits)
        return decode_response(response)

    def _forget(self, call_id: int, future: asyncio.Future[Any]) -> None:
        """Drop a call that failed before its answer, reading whatever the reader may have
        set on its future meanwhile (an unread exception would be logged as lost)."""
        self._in_flight.forget_call(call_id)
        if future.done() and not future.cancelled():
            future.exception()

    async def stream(
        self, invocation: Invocation, limits: CallLimits | None = None
    ) -> AsyncGenerator[Any, None]:
        """``invocation``'s chunks; ``limits`` as ``call``'s."""
        if limits is None:
            limits = self._bounds.own
        call_id, now = self._admit(invocation, limits)
        try:
            data = self._frame("stream", call_id, invocation, now, limits)
        except BaseException:
            self._bounds.release(call_id, limits)
            raise
        queue = self._in_flight.stream(call_id)
        written = self._writer.queue(data, call_id)
        what = f"{self.describe} {invocation.plugin}.{invocation.method} stream"
        finished = False
        consumed = 0
        try:
            try:
                async with asyncio.timeout_at(invocation.deadline):
                    if self._writer.draining:
                        await self._sent(written, invocation)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{what}: the plugin did not take the call in time"
                ) from None
            while True:
                left = invocation.deadline - self._loop.time()
                try:
                    async with asyncio.timeout(left if left > 0 else 0):
                        item = await queue.get()
                except TimeoutError:
                    raise DeadlineExceeded(f"{what} passed its deadline") from None
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if type(item) is dict and item.get("type") == "response":
                    finished = True
                    decode_response(item.get("response"))  # raises the stream's error
                    return
                consumed += 1
                if consumed == _CREDIT_EVERY:
                    consumed = 0
                    await self._send_quietly(
                        encode_frame({"type": "credit", "id": call_id, "n": _CREDIT_EVERY})
                    )
                yield item.get("data") if type(item) is dict else None
        finally:
            self._bounds.release(call_id, limits)
            if self._in_flight.forget_stream(call_id) and not finished:
                self._writer.cancel(call_id, written)

    async def health(self, timeout: float) -> Health:
        if self.closed:
            return Health("not_serving", f"not connected: {self.close_reason}")
        if self.going_away:
            return Health("not_serving", "going away: the plugin is stopping")
        call_id = next(self._ids)
        future = self._in_flight.probe(call_id)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await self._sent(
                    self._writer.queue(encode_frame({"type": "health", "id": call_id})), None
                )
                answer = await future
        except TimeoutError:
            return Health("not_serving", f"no health answer within {timeout:.1f} s")
        except DispatchError as error:
            return Health("not_serving", error.message)
        finally:
            self._in_flight.forget_probe(call_id)
        latency_ms = (time.perf_counter() - started) * 1000
        status = answer.get("status") if type(answer) is dict else None
        detail = str(answer.get("detail", ""))[:500] if type(answer) is dict else ""
        extra = self.counters()
        if status == "serving":
            return Health("serving", detail, latency_ms, extra)
        return Health("not_serving", detail or f"plugin says {status!r:.40}", latency_ms, extra)

    def counters(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "unknown_ids": self.unknown_ids,
            "protocol_errors": self.protocol_errors,
            "events_dropped": self.events_dropped,
            "events_dropped_by_plugin": self.events_dropped_by_plugin,
        }

    async def send_event(self, data: bytes) -> None:
        """Send the frame ``data`` (an event, or the welcome); ``InvalidParams`` if it is
        larger than the plugin reads."""
        reads = self.plugin_reads
        if reads is not None and len(data) > reads:
            raise _too_large(
                f"{self.describe}: the event is {len(data)} bytes, over the {reads} bytes"
                " the plugin reads (its hello's max_message_bytes)",
                len(data),
                reads,
            )
        await self._sent(self._writer.queue(data), None)

    # -- sending ---------------------------------------------------------------------------

    async def _sent(self, written: asyncio.Future[None], invocation: Invocation | None) -> None:
        """Wait for ``written``; ``TargetUnavailable`` (stage ``connect``) if it never goes out."""
        try:
            await written
        except asyncio.CancelledError:
            self._writer.gave_up()
            raise
        except (ConnectionError, RuntimeError) as error:
            # Nothing was written: the call provably never reached the plugin.
            what = f" {invocation.plugin}.{invocation.method}" if invocation else ""
            raise self._never_sent(f"{what}: the connection closed", error) from None

    def _never_sent(self, what: str, error: BaseException) -> TargetUnavailable:
        return TargetUnavailable(
            f"{self.describe}{what} before the call was sent ({error})",
            details={"stage": "connect"},
        )

    def _frame_never_sent(self, call_id: int, error: BaseException) -> None:
        """The frame of call ``call_id`` will never go out: the call fails as never sent."""
        self._in_flight.fail(call_id, self._never_sent(": the connection closed", error))

    async def _send_quietly(self, data: bytes) -> None:
        # The connection is gone, and whatever this was about with it.
        with contextlib.suppress(TargetUnavailable):
            await self._sent(self._writer.queue(data), None)

    # -- reading ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the socket closes (``FrameReader``); then fail every call
        still in flight."""
        reason = "the connection closed"
        try:
            reason = await self._reader.run()
        finally:
            code = self.socket.close_code
            self._life.end(f"{reason} (close code {code})" if code else reason)

    def _probe(self) -> None:
        """No whole frame for a bound: ask for one (``ReadWatch``), its answer unused."""
        probe_id = next(self._ids)
        self._in_flight.watch_probe(probe_id)
        self._life.spawn(self._send_quietly(encode_frame({"type": "health", "id": probe_id})))

    # -- ending (``ChannelLifecycle``) ------------------------------------------------------

    def go_away(self, code: int, reason: str) -> None:
        """This side's goaway: send the plugin nothing new (``leaving`` is set: the owner
        stops using the channel), and close with ``code`` and ``reason`` once the calls
        and streams in flight have ended, by their answers or their deadlines."""
        self._life.go_away(code, reason)

    async def close(self, code: int = 1000, reason: str = "", *, at_once: bool = False) -> None:
        """Close the connection with ``code`` and ``reason`` (what the peer reads: it decides
        whether to dial again), failing what is still in flight on it. ``at_once``: drop
        it (``hang_up``), not waiting for the plugin's close frame.

        Once it returns nothing of the channel runs, and its socket is let go: a plugin
        that closed first with data still buffered for it has had its grace (it read the
        rest, or 1.5 heartbeats passed and the socket was aborted). A loop timer used to
        abort it after ``close`` had returned, holding the socket and what was buffered
        for as long, whoever had let go of the channel."""
        await self._life.close(code, reason, at_once=at_once)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "going away" if self.going_away else "open"
        return (
            f"<Channel {self.describe} {state} in_flight={self.in_flight}"
            f" to_write={self.to_write} unknown_ids={self.unknown_ids}>"
        )


def _too_large(message: str, size: int, limit: int) -> InvalidParams:
    """A message of ``size`` bytes that would be over ``limit``: the caller's to make
    smaller (not retryable), as HTTP's 413 and gRPC's over-cap refusal are."""
    return InvalidParams(message, details={"reason": "too_large", "bytes": size, "limit": limit})
