"""What a plugin sends over its connection, read and handed to what it answers (``FrameReader``).

    socket ──frame──► reader ─┬─ response, chunk, health, error ─► InFlight (the id's call,
                              │                                    stream or probe)
                              ├─ event, dropped ─► PluginEvents
                              ├─ goaway ─► the channel goes away
                              ├─ call, stream ─► refused: a ``forbidden`` error frame
                              └─ anything else ─► counted (``protocol_errors``)

The reader runs in the task that owns the connection (``Channel.run``) and only resolves
futures, queues chunks and hands events on, so a slow caller never stalls it. aiohttp
refuses a message over the connection's ``max_message_bytes`` (the connection closes,
1009), the largest of its targets'; an answer over the bound of its own call's target,
which is smaller, fails that call ``ProviderError`` (a stream is cancelled) and is counted
as a protocol error, the connection stays.

Answers for ids not in flight (late ones after a deadline, or made up) are counted in
``unknown_ids`` and dropped: a result reaches its caller once or not at all. A reply of a
kind that does not answer what its id asked (a ``health`` naming a call) is a protocol
error, and what its id asked still waits for its own answer. Frames that cannot be used are
counted in ``protocol_errors`` and logged sparingly (the first, the 1,000th, every
100,000th; what the plugin wrote escaped and cut): how many a plugin sends is its to
decide, how many lines the host writes is not. None costs the connection: the calls on it
that the plugin answers properly go on.

A plugin may not call the host over its connection (nor through it, the dispatcher's
other plugins): each call is refused with a typed error frame, at most
``MAX_REFUSALS_WAITING`` of them waiting to go out at once. The reader knows frames and
ids; what a goaway means, how a frame is sent and who owns the tasks that send them, the
channel says through the callbacks it passes in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSMsgType

from linchkit_plugin.errors import Forbidden, ProviderError, error_from_wire
from linchkit_plugin.ws_protocol import FrameError, decode_frame, error_frame
from providers._log_lines import sparingly
from providers.websocket.events import PluginEvents
from providers.websocket.in_flight import CallBounds, InFlight
from providers.websocket.read_watch import ReadWatch
from providers.websocket.writer import Socket

__all__ = ["MAX_REFUSALS_WAITING", "FrameReader"]

log = logging.getLogger("dispatcher.providers.websocket")

#: Refusals of a plugin's own calls waiting to be sent: past these a call frame is counted
#: and not answered. Each costs a task and an error frame: a plugin that sent calls and
#: read nothing back had the host hold some 1.3 kB per call frame of 30 bytes it sent.
MAX_REFUSALS_WAITING = 64


class FrameReader:
    """Reads one connection's frames until it closes; hands each to what it answers, or
    counts it (``unknown_ids``, ``protocol_errors``)."""

    def __init__(
        self,
        socket: Socket,
        describe: str,
        *,
        in_flight: InFlight,
        bounds: CallBounds,
        events: PluginEvents,
        watch: ReadWatch,
        cancel: Callable[[int], None],
        goaway: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        send_quietly: Callable[[bytes], Coroutine[Any, Any, None]],
    ) -> None:
        """``cancel(call_id)``: queue a ``cancel`` for a stream failed here. ``goaway()``:
        the plugin said it is stopping. ``spawn(work)``: run ``work`` as a task the channel
        owns. ``send_quietly(frame)``: send a frame no caller waits for."""
        self._socket = socket
        self._describe = describe
        self._in_flight = in_flight
        self._bounds = bounds
        self._events = events
        self._watch = watch
        self._cancel = cancel
        self._goaway = goaway
        self._spawn = spawn
        self._send_quietly = send_quietly
        self._refusals_waiting = 0
        #: Counters, for ``health`` and tests: what the peer sent that could not be used.
        self.unknown_ids = 0
        self.protocol_errors = 0

    async def run(self) -> str:
        """Read frames until the socket closes; why it closed (its close code aside)."""
        reason = "the connection closed"
        watch = self._watch
        watch.start()
        try:
            async for message in self._socket:
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    watch.frames += 1
                    self._received(message.data)
                elif message.type == WSMsgType.ERROR:
                    reason = f"the connection failed: {message.data}"
                    break
        except ConnectionError as error:
            reason = f"the connection failed: {type(error).__name__}"
        finally:
            watch.stop()  # also when the channel was closed before it read (it ends once)
        return reason

    def _received(self, data: str | bytes) -> None:
        try:
            frame = decode_frame(data)
        except FrameError as error:
            if self._count_protocol_error():
                log.warning(
                    "%s sent %s (%d unusable frames so far)",
                    self._describe,
                    error.message,
                    self.protocol_errors,
                )
            return
        kind = frame["type"]
        raw_id = frame.get("id")
        call_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        if (
            call_id is not None
            and len(data) > self._bounds.tightest
            and self._over_bound(kind, call_id, len(data))
        ):
            return
        if kind == "response" or kind == "chunk" or kind == "health":
            if call_id is None or not self._in_flight.reply(kind, call_id, frame):
                self._unanswered(kind, call_id)
        elif kind == "event":
            self._events.deliver(frame)
        elif kind == "error":
            self._peer_error(frame, call_id)
        elif kind in ("call", "stream"):
            # A plugin may not call the host over its connection (nor through it, the
            # dispatcher's other plugins): refused, typed, the connection stays.
            self.protocol_errors += 1
            if self._refusals_waiting < MAX_REFUSALS_WAITING:
                self._refusals_waiting += 1
                self._spawn(self._refuse(call_id))
        elif kind == "goaway":
            self._goaway()
        elif kind == "dropped":
            self._events.plugin_dropped(frame)
        elif self._count_protocol_error():
            log.warning(
                "%s sent an unknown frame type %.40r (%d unusable frames so far)",
                self._describe,
                kind,
                self.protocol_errors,
            )

    def _over_bound(self, kind: str, call_id: int, size: int) -> bool:
        """Whether a reply of ``size`` bytes that answers call or stream ``call_id`` is over
        the bound of the target it was made for (below the connection's, which the socket
        enforces). It then fails the call ``ProviderError`` (a stream is cancelled) and
        is counted, as a frame this side cannot use is; the connection stays, for the
        calls of targets that allow it."""
        bound = self._bounds.bound_of(call_id)
        if bound is None or size <= bound:
            return False
        asked = self._in_flight.asked(call_id)
        if (
            asked is None
            or kind not in ("response", "chunk", "error")
            or (kind == "chunk" and asked != "stream")
        ):
            return False  # answers nothing in flight: counted as such (``_unanswered``)
        error = ProviderError(
            f"{self._describe} answered {asked} {call_id} with a message of {size} bytes,"
            f" over its target's max_message_bytes={bound}"
        )
        if self._in_flight.fail(call_id, error) and asked == "stream":
            self._cancel(call_id)  # the plugin may be sending more
        if self._count_protocol_error():
            log.warning(
                "%s: %s (%d unusable frames so far)",
                self._describe,
                error.message,
                self.protocol_errors,
            )
        return True

    def _unanswered(self, kind: str, call_id: int | None) -> None:
        """A reply that answers nothing in flight. For an id not in flight (a late answer,
        a made-up id): counted as unknown. For an id that asked something else: a
        protocol error, as any frame this side cannot use is; what that id asked keeps
        waiting for its own answer, so a plugin's lie neither becomes a result nor fails
        a call with an error the plugin never sent."""
        asked = None if call_id is None else self._in_flight.asked(call_id)
        if asked is None:
            self.unknown_ids += 1
        elif self._count_protocol_error():
            log.warning(
                "%s answered %s %d with a %.40r frame (%d unusable frames so far)",
                self._describe,
                asked,
                call_id,
                kind,
                self.protocol_errors,
            )

    def _peer_error(self, frame: dict[str, Any], call_id: int | None) -> None:
        error = error_from_wire(frame.get("error"))
        if call_id is not None and self._in_flight.fail(call_id, error):
            return
        if self._count_protocol_error():
            log.warning(
                "%s could not use a frame this side sent: %.200r (%d unusable frames so far)",
                self._describe,
                error.message,
                self.protocol_errors,
            )

    def _count_protocol_error(self) -> bool:
        """Count a frame from the plugin that this side cannot use; whether to log it."""
        self.protocol_errors += 1
        return sparingly(self.protocol_errors)

    async def _refuse(self, call_id: int | None) -> None:
        refusal = Forbidden(f"{self._describe}: a plugin connection may not call the host")
        try:
            await self._send_quietly(error_frame(refusal, call_id))
        finally:
            self._refusals_waiting -= 1

    def __repr__(self) -> str:
        return (
            f"<FrameReader {self._describe} frames={self._watch.frames}"
            f" unknown_ids={self.unknown_ids} protocol_errors={self.protocol_errors}"
            f" refusals_waiting={self._refusals_waiting}>"
        )
