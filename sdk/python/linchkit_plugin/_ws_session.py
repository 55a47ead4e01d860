"""One open WebSocket serving a plugin (``linchkit_plugin.ws_server``), whichever side
dialled: the dispatcher (served) or the plugin (reverse mode, ``_ws_dial``).

A ``PluginSession`` sends ``hello``, runs each ``call`` and ``stream`` frame as a task of
its own (at most ``max_in_flight`` at once; beyond that it stops reading, so TCP pushes back
on the host instead of this process buffering), cancels a task on ``cancel``, answers
``health``, hands ``event`` frames to the plugin's ``on_event`` and sends the plugin's
events. A stream sends no more chunks than the host's credit allows (``STREAM_WINDOW``,
then what ``credit`` frames grant).

One writer task per session writes every frame, in order (``_write``); the call tasks, the
reader and the events sender queue theirs (``_send``), and wait for a frame to go out only
while the writer waits for the socket to drain, so a host that reads slowly slows the
plugin's answers instead of growing a buffer here. A host that reads nothing at all is
not waited for for ever: a write it takes nothing of for ``STALL_HEARTBEATS`` heartbeats
drops the connection, as the dispatcher drops a plugin that does so
(``providers/websocket/writer.py``); the session ends, and a dialling plugin dials again.

The plugin's events wait in a queue of their own while the socket takes no more (while the
writer waits for it to drain), at most ``_SESSION_EVENT_QUEUE`` of them, the oldest dropped
and counted past it (said once per session), as the Go, Rust and Java SDKs' sessions and an
Events stream do; the ``dropped`` frame behind those that waited for a host is never
dropped. The events sender hands the writer one event at a time, so a call's answer waits
behind one event at most, never behind every event emitted meanwhile (and may so go out
before an event its method emitted earlier: see docs/protocol.md).

No frame goes out over the session's send cap (``send_cap``: its own read cap, or the
host's announced one where smaller, ``_ws_send_cap``): a call's answer over it is answered
``provider_error`` (``too_large``) instead, a stream's chunk over it ends the stream so, and
an event over it is not sent (the first logged), so that the host does not close the
connection with every other call on it.

An ``error`` frame from the host (it could not use a frame of ours) is logged at INFO, the
host's message escaped and cut as a close reason is, and never answered: the first
``LOGGED_HOST_ERRORS`` of a connection, then one line saying the rest are not logged, so
that a host sending a flood of them does not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from linchkit_plugin._method_failures import cancelled_from_outside, unanswerable
from linchkit_plugin._ws_events import EventOutbox
from linchkit_plugin._ws_send_cap import bare_name, too_large
from linchkit_plugin.errors import DeadlineExceeded, DispatchError, ProviderError
from linchkit_plugin.host import PluginHost
from linchkit_plugin.wire import encode_result, error_response, ok_response, parse_request
from linchkit_plugin.ws_protocol import (
    CLOSE_GOING_AWAY,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_BYTES,
    GOAWAY_GRACE,
    MAX_ANNOUNCED_CAP,
    STREAM_WINDOW,
    FrameError,
    announced_cap,
    decode_frame,
    encode_frame,
    error_frame,
    hello_frame,
    shown_close_reason,
)

__all__ = ["LOGGED_HOST_ERRORS", "STALL_HEARTBEATS", "PluginSession", "Socket", "hello_of"]

log = logging.getLogger("linchkit_plugin.websocket")

Socket = web.WebSocketResponse[Any] | aiohttp.ClientWebSocketResponse[Any]

#: Frames of one session's events waiting to be written; beyond it the oldest is dropped.
_SESSION_EVENT_QUEUE = 1024
#: Frames given up by their senders that may wait in the writer's queue before it is pruned.
_GIVEN_UP_KEPT = 64
#: Heartbeats a write may wait for the host to take anything before the connection is
#: dropped: as long as the heartbeat takes to find a silent peer gone (a ping after one
#: heartbeat of silence, its pong due within half of one). The heartbeat alone does not
#: find a host that stops reading but goes on sending: any frame it sends puts aiohttp's
#: ping off. The dispatcher's bound on a plugin, the same way round.
STALL_HEARTBEATS = 1.5
#: The host's ``error`` frames logged on one connection; one line says the rest are not.
LOGGED_HOST_ERRORS = 10


def _say_first_few(count: int, frames: str) -> bool:
    """Whether the ``count``-th of the host's ``frames`` on a connection is to be logged:
    the first ``LOGGED_HOST_ERRORS`` are; past them one line says the rest are not, since
    the host chooses how many it sends (every one was logged until 2026-12-07)."""
    if count == LOGGED_HOST_ERRORS + 1:
        log.info(
            "the host sent more than %d %s on this connection; further ones are not logged",
            LOGGED_HOST_ERRORS,
            frames,
        )
    return count <= LOGGED_HOST_ERRORS


class _Window:
    """How many chunks a stream may still send before the host grants more."""

    __slots__ = ("_credit", "_granted")

    def __init__(self, credit: int) -> None:
        self._credit = credit
        self._granted = asyncio.Event()

    async def take(self) -> None:
        while self._credit <= 0:
            self._granted.clear()
            await self._granted.wait()
        self._credit -= 1

    def grant(self, count: int) -> None:
        self._credit += count
        self._granted.set()


class PluginSession:
    """Serves the plugin over one open WebSocket until it closes."""

    def __init__(
        self,
        host: PluginHost,
        socket: Socket,
        outbox: EventOutbox,
        *,
        hello: bytes,
        max_in_flight: int = 1024,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        host_cap: int | None = None,
    ) -> None:
        """``heartbeat``: the connection's (seconds); a write may wait ``STALL_HEARTBEATS``
        of it for the host to take anything (None: for ever). ``max_message_bytes``: the
        largest message this side reads; ``host_cap``: the host's, where the upgrade
        announced a valid one (``cap_of_header``: the dispatcher's request, or the
        gateway's answer in reverse mode; a ``welcome``'s later replaces it). No frame
        larger than either is sent."""
        self.host = host
        self.socket = socket
        self.outbox = outbox
        self._hello = hello
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, _Window] = {}
        #: Event frames not yet handed to the writer, oldest first (``queue_event``), each
        #: with whether it may be dropped: all but the ``dropped`` frame may.
        self._events: deque[tuple[bytes, bool]] = deque()
        #: Done once ``_events`` has a frame for the idle events sender.
        self._events_queued: asyncio.Future[None] | None = None
        #: Events dropped from ``_events`` for a host that did not read them.
        self.events_dropped = 0
        # 0: aiohttp reads messages of any size; then only the host's cap bounds the sends.
        self._max_message_bytes = max_message_bytes if max_message_bytes > 0 else MAX_ANNOUNCED_CAP
        #: The largest frame sent: the host's cap where it announced a smaller one (in the
        #: upgrade request, or in reverse mode its ``welcome``).
        self.send_cap = self._max_message_bytes
        if host_cap is not None:
            self.send_cap = min(self._max_message_bytes, host_cap)
        #: Events not sent for being over ``send_cap`` (the first is logged).
        self.events_too_large = 0
        self.protocol_errors = 0
        #: ``error`` frames the host sent (the first ``LOGGED_HOST_ERRORS`` logged).
        self.host_errors = 0
        #: ``dropped`` frames the host sent (the first ``LOGGED_HOST_ERRORS`` logged).
        self.host_dropped = 0
        #: The gateway accepted the hello (reverse mode): only then the redial backoff resets.
        self.welcomed = False
        #: Frames for the writer, in order, each with the future its sender may wait on.
        self._outbox: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        #: What the idle writer waits on: done once something is queued.
        self._outbox_filled: asyncio.Future[None] | None = None
        #: Frames in ``_outbox`` whose senders gave up (counted since it was last pruned).
        self._given_up = 0
        #: The writer waits for the socket to drain: senders wait for their frames.
        self._draining = False
        #: Set while the writer does not wait for the socket: the events sender waits on it.
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer: asyncio.Task[None] | None = None
        self._writing_ended = False
        #: How long one write may wait for the socket to drain (None: no bound).
        self.stall_after = None if heartbeat is None else STALL_HEARTBEATS * heartbeat
        #: Set when ``run`` has ended (the connection closed).
        self.ended = asyncio.Event()
        #: The reason in the peer's close frame: why the host closed (a reload replaced
        #: or removed this plugin, the gateway stops), for the log.
        self.close_reason = ""

    def queue_event(self, frame: bytes, event: str = "", *, droppable: bool = True) -> None:
        """Queue an event frame for the host; never waits. Past ``_SESSION_EVENT_QUEUE``
        frames waiting the oldest event is dropped: a host that reads nothing gets the
        newest events once it reads again, as from every SDK (this one used to keep the
        oldest). A frame over ``send_cap`` is not sent: the event ``event`` (its name) is
        lost, not the connection. ``droppable=False``: the ``dropped`` frame, never dropped
        (a flood used to drop it once it was the oldest, and the count it carried)."""
        if self._too_large(frame, event):
            return
        if len(self._events) >= _SESSION_EVENT_QUEUE:
            # At most one frame is not droppable, the outbox's one ``dropped`` frame: when
            # it is the oldest, the oldest event is the next.
            del self._events[0 if self._events[0][1] else 1]
            if not self.events_dropped:
                log.warning("the host is not reading its Events stream; dropping the oldest events")
            self.events_dropped += 1
        self._events.append((frame, droppable))
        queued = self._events_queued
        if queued is not None and not queued.done():
            queued.set_result(None)

    def _too_large(self, frame: bytes, event: str) -> bool:
        """Whether the event ``frame`` is over ``send_cap``: then it is not sent, and the
        first such on this connection is logged."""
        if len(frame) <= self.send_cap:
            return False
        if not self.events_too_large:
            log.warning(
                "event %s is %d bytes, over the WebSocket message cap of %d bytes: not sent",
                bare_name(event),
                len(frame),
                self.send_cap,
            )
        self.events_too_large += 1
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        sender: asyncio.Task[None] | None = None
        try:
            await self._send(self._hello)
            self.outbox.join(self)
            sender = loop.create_task(self._send_events())
            await self._read()
        finally:
            self.outbox.leave(self)
            tasks = list(self._tasks.values())
            if sender is not None:
                tasks.append(sender)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._end_writing()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self.ended.set()

    async def go_away(self, grace: float = GOAWAY_GRACE) -> None:
        """The plugin stops: say ``goaway``, answer what still arrives, and wait for the
        host to close the connection once its calls are answered; after ``grace`` seconds
        close it (1001), cutting off what is still running."""
        await self._send(encode_frame({"type": "goaway"}))
        try:
            async with asyncio.timeout(grace):
                await self.ended.wait()
        except TimeoutError:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.socket.close(code=CLOSE_GOING_AWAY)

    async def _read(self) -> None:
        while True:
            # ``receive``, not ``async for``: iterating hides the close frame and its reason.
            message = await self.socket.receive()
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                if message.type == WSMsgType.CLOSE:  # shown to the operator: made safe
                    self.close_reason = shown_close_reason(str(message.extra or ""))
                break  # ERROR (too large, broken framing) or CLOSE: the session ends
            try:
                frame = decode_frame(message.data)
            except FrameError as error:
                self.protocol_errors += 1
                await self._send(error_frame(error))
                continue
            await self._handle(frame)

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        call_id = frame.get("id")
        if kind in ("call", "stream"):
            if type(call_id) is not int or call_id in self._tasks:
                self.protocol_errors += 1
                await self._send(error_frame(ProviderError(f"{kind} needs a new integer id")))
                return
            await self._slots.acquire()  # full: stop reading; TCP pushes back on the host
            task = asyncio.get_running_loop().create_task(self._run_call(kind, call_id, frame))
            self._tasks[call_id] = task
        elif kind == "credit":
            window = self._windows.get(call_id) if type(call_id) is int else None
            count = frame.get("n")
            if window is not None and type(count) is int and 0 < count <= 1 << 20:
                window.grant(count)
        elif kind == "cancel":
            running = self._tasks.get(call_id) if type(call_id) is int else None
            if running is not None:  # an unknown id: the call ended meanwhile, nothing to do
                running.cancel()
        elif kind == "health":
            healthy, detail = await self.host.health()
            status = "serving" if healthy else "not_serving"
            await self._send(
                encode_frame({"type": "health", "id": call_id, "status": status, "detail": detail})
            )
        elif kind == "event":
            name = frame.get("event")
            if type(name) is str:
                try:
                    await self.host.deliver(name, frame.get("data"))
                except Exception:
                    log.exception("on_event(%r) raised", name)
        elif kind == "welcome":
            self.welcomed = True
            # The gateway's cap, said again (its answer to the upgrade said it first) as
            # the plugin's targets stand now: a valid one replaces the upgrade's.
            announced = announced_cap(frame.get("max_message_bytes"))
            if announced is not None:
                self.send_cap = min(self._max_message_bytes, announced)
        elif kind == "dropped":
            self._host_dropped(frame)
        elif kind == "error":
            self._host_error(frame.get("error"))
        else:
            self.protocol_errors += 1
            await self._send(
                error_frame(ProviderError(f"unknown frame type {kind!r:.40}"), call_id)
            )

    def _host_error(self, error: Any) -> None:
        """The host could not use a frame of ours (a host that predates ``goaway`` says so
        of it): logged, never answered, or two peers could trade errors forever."""
        self.host_errors += 1
        if _say_first_few(self.host_errors, "error frames"):
            log.info("the host could not use a frame: %s", shown_close_reason(_error_text(error)))

    def _host_dropped(self, frame: dict[str, Any]) -> None:
        """The host's count of its events lost for this plugin (one comes after a
        reconnect), the peer's text escaped and cut as a close reason is: printed by a
        dialling plugin's executable, it must neither forge a line nor run in a terminal."""
        self.host_dropped += 1
        if _say_first_few(self.host_dropped, "dropped frames"):
            log.info("host says: %s", shown_close_reason(str(frame)))

    async def _run_call(self, kind: str, call_id: int, frame: dict[str, Any]) -> None:
        method = ""
        try:
            try:
                request = parse_request(frame.get("request"))
                method = request.method
                deadline_ms = request.deadline_ms  # positive, or None (no deadline)
                timeout = None if deadline_ms is None else deadline_ms / 1000
                if kind == "call":
                    result = await self.host.call_with_deadline(
                        request.method, request.params, request.context, timeout
                    )
                    response = ok_response(result)
                else:
                    await self._stream(
                        call_id, request.method, request.params, request.context, timeout
                    )
                    response = ok_response(None)
            except DispatchError as error:
                response = error_response(error)
            except BaseException as error:  # past the host's own mapping: still one answer
                if isinstance(error, asyncio.CancelledError) and cancelled_from_outside():
                    raise
                response = error_response(unanswerable(method, error))
            try:
                data = encode_result({"type": "response", "id": call_id, "response": response})
            except ProviderError as not_json:
                data = encode_frame(
                    {"type": "response", "id": call_id, "response": error_response(not_json)}
                )
            if len(data) > self.send_cap:
                answer = "result" if response["ok"] else "error"
                failure = too_large(
                    f"the {answer} of {bare_name(method)}", len(data), self.send_cap
                )
                data = encode_frame(
                    {"type": "response", "id": call_id, "response": error_response(failure)}
                )
            await self._send(data)
        except asyncio.CancelledError:
            pass  # the host cancelled the call (or the connection ended): nobody to answer
        finally:
            self._tasks.pop(call_id, None)
            self._slots.release()

    async def _stream(
        self, call_id: int, method: str, params: Any, context: dict[str, Any], timeout: float | None
    ) -> None:
        window = self._windows[call_id] = _Window(STREAM_WINDOW)
        try:
            # aclosing: the generator ends in this task, in the context it started in,
            # also when the host cancels; left to the garbage collector it ended in
            # another context and logged a traceback.
            async with (
                asyncio.timeout(timeout),
                contextlib.aclosing(self.host.stream(method, params, context)) as chunks,
            ):
                async for chunk in chunks:
                    data = encode_result({"type": "chunk", "id": call_id, "data": chunk})
                    if len(data) > self.send_cap:
                        # Out of the loop: aclosing stops the producer, as a cancel does.
                        raise too_large(f"a chunk of {bare_name(method)}", len(data), self.send_cap)
                    await window.take()  # the host's credit: a slow reader slows this stream
                    await self._send(data)
        except TimeoutError:
            raise DeadlineExceeded(f"stream {method!r} passed its deadline") from None
        finally:
            self._windows.pop(call_id, None)

    async def _send_events(self) -> None:
        """Hand the writer the waiting events, oldest first, one at a time and only while
        the socket takes more: those that wait meanwhile stay in ``_events``, where the
        bound applies, not in the writer's queue, ahead of the calls' answers."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._events:
                self._events_queued = loop.create_future()
                await self._events_queued
                continue
            if self._draining:
                await self._drained.wait()
                continue
            frame, _ = self._events.popleft()
            await self._send(frame, until_written=True)

    async def _send(self, data: bytes, *, until_written: bool = False) -> None:
        """Queue ``data`` for the writer; while the writer waits for the socket to drain,
        or always with ``until_written``, wait for it to go out (a host that reads slowly
        slows the sender). A sender cancelled before its frame's turn keeps it from being
        written."""
        if self._writing_ended:
            return  # the connection is gone: nobody to send to
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((data, written))
        filled = self._outbox_filled
        if filled is not None and not filled.done():
            filled.set_result(None)
        if not (self._draining or until_written):
            return
        try:
            await written
        except asyncio.CancelledError:
            self._gave_up()
            raise

    def _gave_up(self) -> None:
        """A sender gave up before its frame's turn. The frame stays queued until the
        writer reaches and skips it, which a writer waiting for a host that does not read
        does not: once most of the queue is given up, it is rebuilt without those, so it
        never grows with the calls the host cancels meanwhile."""
        self._given_up += 1
        if self._given_up <= _GIVEN_UP_KEPT or self._given_up * 2 <= len(self._outbox):
            return
        wanted = [entry for entry in self._outbox if not entry[1].done()]
        self._outbox.clear()
        self._outbox.extend(wanted)
        self._given_up = 0

    async def _write(self) -> None:
        """Write the queued frames in order, each once the socket has drained the last:
        the one task of this session that writes to the socket.

        Senders do not write themselves, because aiohttp (3.14) has every writer that waits
        for the socket to drain await one shared future, and keeps that future once a
        waiter is cancelled: a call the host cancelled while its answer waited cancelled
        it, and every later wait on it raised ``CancelledError`` at once, into senders
        nobody had cancelled (another call's stream ended without its answer, the events
        sender or the reader ended). Only ``run`` cancels this task, as the session ends.
        aiohttp's own frames (pong, ping, close) never land inside one of ours: it hands a
        whole frame to the transport before it awaits the drain."""
        outbox, loop = self._outbox, asyncio.get_running_loop()
        while not self._writing_ended:
            if not outbox:
                self._outbox_filled = loop.create_future()
                await self._outbox_filled
                continue
            data, written = outbox.popleft()
            if written.done():
                continue  # its sender gave up before its turn: it is never written
            self._draining = True
            self._drained.clear()
            try:
                async with asyncio.timeout(self.stall_after):
                    await self.socket.send_frame(data, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError):
                pass  # the connection is closing: ``run`` ends the session
            except TimeoutError:
                self._stalled()
                return
            finally:
                self._draining = False
                self._drained.set()
            if not written.done():
                written.set_result(None)

    def _stalled(self) -> None:
        """The host took nothing of a write for ``stall_after`` seconds: drop the
        connection. Its transport is aborted, not closed: asyncio keeps a closed
        transport's socket open until what is buffered for it drains, which a host that
        reads nothing never lets happen. The reader then sees the connection gone, and
        ``run`` ends the session."""
        log.warning(
            "the host took nothing written to it for %g s; dropping the connection",
            self.stall_after,
        )
        self._end_writing()
        # aiohttp (3.14) offers no abort of a WebSocket; both of its WebSocket classes
        # write through a writer whose ``transport`` is the connection's. No close frame:
        # behind a full buffer it would never reach the host.
        transport = getattr(getattr(self.socket, "_writer", None), "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()

    def _end_writing(self) -> None:
        """No frame goes out any more: the senders still waiting are let go."""
        self._writing_ended = True
        queued = list(self._outbox)
        self._outbox.clear()
        for _, written in queued:
            if not written.done():
                written.set_result(None)

    def __repr__(self) -> str:
        return (
            f"<PluginSession in_flight={len(self._tasks)} events_waiting={len(self._events)}"
            f" events_dropped={self.events_dropped} send_cap={self.send_cap}"
            f" events_too_large={self.events_too_large} protocol_errors={self.protocol_errors}"
            f" host_errors={self.host_errors}>"
        )


def _error_text(error: Any) -> str:
    """What the host's ``error`` frame says, for the log: its ``message``, an error given
    as a bare string, or else the value's JSON text (for ``shown_close_reason`` to make
    safe to show)."""
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        return message
    if isinstance(error, str):
        return error
    return orjson.dumps(error).decode()


def hello_of(
    host: PluginHost,
    plugin_id: str,
    version: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """The ``hello`` frame every session of ``host`` opens with (``PluginHost.identity``):
    the gateway closes a connection whose ``hello`` names another plugin than the one it
    admitted. It says the largest message the session reads, ``max_message_bytes``, which
    the host sends none over (0, any size: it says none)."""
    plugin_id, version = host.identity(plugin_id, version)
    return hello_frame(
        plugin_id,
        version,
        list(host.methods),
        streaming=list(host.streaming),
        max_message_bytes=max_message_bytes if max_message_bytes > 0 else None,
    )
