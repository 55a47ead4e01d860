"""The one task that writes a channel's frames to its WebSocket, in order (``FrameWriter``).

    sender ──queue(frame)──► outbox ──► writer task ──send_frame, drain──► socket
                              │            └─ a write the plugin takes nothing of for
                              │               ``stall_after`` seconds: ``stalled`` (the
                              │               channel drops the connection)
                              └─ a frame whose sender gave up before its turn: never written

Each frame waits for the socket to drain before the next goes, so a plugin that reads
slowly slows its senders, not the heap. A sender waits for its frame to go out only while
the writer waits for the socket (``draining``). A frame whose sender gave up before its
turn is never written (and its call gets no ``cancel``); a ``cancel`` is a queued frame,
not a task, and the queue is pruned of given-up frames once they are most of it.

The writer knows frames, not calls: what a frame that is never written means to its call,
and what a stalled or lost connection means to the channel, is the channel's to say, told
through the callbacks it passes in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType, web

from linchkit_plugin.ws_protocol import encode_frame

__all__ = ["FrameWriter", "Socket", "cancelled_by_owner"]

Socket = ClientWebSocketResponse[Any] | web.WebSocketResponse[Any]

#: Frames given up by their senders that may wait in a channel's queue before it is pruned.
_GIVEN_UP_KEPT = 64


def cancelled_by_owner() -> bool:
    """Whether the running task is being cancelled (``Task.cancelling``), as opposed to
    woken with ``CancelledError`` by a future someone else cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class FrameWriter:
    """Writes one channel's frames to its socket, in order, from one task of its own."""

    def __init__(
        self,
        socket: Socket,
        describe: str,
        *,
        stall_after: float,
        never_sent: Callable[[int, BaseException], None],
        stalled: Callable[[], Awaitable[None]],
        lost: Callable[[str], None],
    ) -> None:
        """``stall_after``: seconds a write may wait for the plugin to take anything before
        ``stalled`` is awaited (it closes the channel). ``never_sent(call_id, error)``: the
        frame of call ``call_id`` will never go out. ``lost(reason)``: aiohttp ended a
        write as the connection closed under it."""
        self._socket = socket
        self._never_sent = never_sent
        self._on_stalled = stalled
        self._lost = lost
        self._loop = asyncio.get_running_loop()
        #: Frames for the writer, in order: (bytes, the future its sender waits on or None,
        #: the id a ``cancel`` names if its sender gives up while it is being written).
        self._outbox: deque[tuple[bytes, asyncio.Future[None] | None, int | None]] = deque()
        #: What the idle writer waits on: done once something is queued.
        self._outbox_filled: asyncio.Future[None] | None = None
        #: Frames in ``_outbox`` whose senders gave up (counted since it was last pruned).
        self._given_up = 0
        self.stall_after = stall_after
        #: When the write in progress began (None: the writer is idle), and the timer that
        #: looks whether it has stalled (``_watch_writes``): one timer, not one per write.
        self._write_began: float | None = None
        self._write_watch: asyncio.TimerHandle | None = None
        self._write_stalled = False
        #: The writer waits for the socket to drain: senders wait for their frames.
        self.draining = False
        #: Set by ``stop``: nothing more is written, and why.
        self._stopped = False
        self._stop_reason = ""
        self.task = self._loop.create_task(self._write(), name=f"writing {describe}")

    def __len__(self) -> int:
        """Frames waiting to be written, given-up ones not yet pruned included."""
        return len(self._outbox)

    def queue(self, data: bytes, call_id: int | None = None) -> asyncio.Future[None]:
        """Queue ``data`` (the frame of call ``call_id``, if it is one) for the writer.
        The future is done once the frame went out, or failed with ``ConnectionError`` if
        it never will; a call's answer then fails too. Cancelling it before its turn (the
        sender gave up) keeps the frame from being written."""
        written: asyncio.Future[None] = self._loop.create_future()
        if self._stopped:
            written.set_exception(ConnectionError(self._stop_reason))
            return written
        self._outbox.append((data, written, call_id))
        self._wake()
        return written

    def queue_cancel(self, call_id: int) -> None:
        """Queue a ``cancel`` for call ``call_id``: nobody waits for it to go out."""
        if self._stopped:
            return
        self._outbox.append((encode_frame({"type": "cancel", "id": call_id}), None, None))
        self._wake()

    def cancel(self, call_id: int, written: asyncio.Future[None]) -> None:
        """Tell the plugin that the caller of ``call_id`` gave up, if its frame went out.
        One still queued is not written at all; one being written at this moment gets its
        ``cancel`` from the writer, once it is out."""
        if self._stopped:
            return
        if written.cancel():
            self.gave_up()
            return
        if written.cancelled() or written.exception() is not None:
            return
        self.queue_cancel(call_id)

    def gave_up(self) -> None:
        """A sender gave up before its frame's turn. The frame stays queued until the
        writer reaches and skips it, which a stalled writer does not: once most of the
        queue is given up, it is rebuilt without those, so that what is queued stays near
        what is still wanted and never grows with the calls abandoned while a plugin does
        not read."""
        self._given_up += 1
        if self._given_up <= _GIVEN_UP_KEPT or self._given_up * 2 <= len(self._outbox):
            return
        wanted = [entry for entry in self._outbox if entry[1] is None or not entry[1].done()]
        self._outbox.clear()
        self._outbox.extend(wanted)
        self._given_up = 0

    def stop(self, reason: str) -> None:
        """The connection is closed: every frame still queued fails as never sent (not
        as in flight), nothing more is queued, and the writer task ends."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_reason = reason
        queued = list(self._outbox)
        self._outbox.clear()
        for _, written, call_id in queued:  # never sent: failed as such, not as in flight
            if written is not None:
                self._not_written(written, call_id, ConnectionError(reason))
        self._wake()  # the writer ends
        if self._write_watch is not None:
            self._write_watch.cancel()
            self._write_watch = None

    def _wake(self) -> None:
        filled = self._outbox_filled
        if filled is not None and not filled.done():
            filled.set_result(None)

    def _not_written(
        self, written: asyncio.Future[None], call_id: int | None, error: BaseException
    ) -> None:
        """A frame that will never go out: its future fails (read here, for a sender that
        is not waiting on it), and so does its call, as one never sent."""
        if not written.done():
            written.set_exception(error)
            written.exception()
        if call_id is not None:
            self._never_sent(call_id, error)

    async def _write(self) -> None:
        """Write the queued frames in order, each once the socket has drained the last:
        the one task of ours that writes to the socket. A sender goes on to wait for its
        answer at once, unless this task is waiting for the socket to drain: then it waits
        for its frame to go out first, so a plugin that reads slowly slows its callers.

        Callers do not write themselves, because aiohttp (3.14) has every writer that waits
        for the socket to drain await one shared future, and keeps that future once a
        waiter is cancelled: a caller whose deadline passed while it waited cancelled it,
        and every later wait on it (another caller's, aiohttp's own ping) raised
        ``CancelledError`` at once, into callers nobody had cancelled. This task is
        cancelled only by the channel's ``close`` and by the stall timer (``_watch_writes``).

        A plugin that stops reading stalls it. Dropping the connection once a write has
        waited ``stall_after`` (rather than only bounding what waits behind it) ends every
        call on it at once, with a typed error, and lets the dialer dial again or the
        fleet fail calls over, where the stall would otherwise hold each call to its
        deadline for as long as the plugin kept the connection open."""
        # aiohttp writes frames of its own beside this task's, unordered with them: the
        # reader's automatic pong, the heartbeat's ping, a close. None can land inside one
        # of our frames (aiohttp 3.14, ``_websocket/writer.py``): ``send_frame`` hands a
        # whole frame to the transport synchronously (header and payload in one
        # ``transport.write``, or two with no await between them past 16 KiB) and awaits
        # only afterwards, to drain; compressed data frames are made and written under
        # aiohttp's own lock, and control frames are never compressed, so they do not touch
        # the compressor either. Another writer's frame can only come between two of ours,
        # which RFC 6455 allows of control frames (section 5.4). So no lock of ours covers
        # them: what they share with this task is the drain future above, which only a
        # stall (the connection is being dropped) or aiohttp's own closing cancels.
        outbox, loop = self._outbox, self._loop
        while not self._stopped:
            if not outbox:
                self._outbox_filled = loop.create_future()
                await self._outbox_filled
                continue
            data, written, call_id = outbox.popleft()
            if written is not None and written.done():
                continue  # its sender gave up before its turn: it is never written
            self._write_began = loop.time()
            if self._write_watch is None:
                self._write_watch = loop.call_at(
                    self._write_began + self.stall_after, self._watch_writes
                )
            self.draining = True
            try:
                await self._socket.send_frame(data, WSMsgType.TEXT)
            except (ConnectionError, RuntimeError) as error:
                # aiohttp refuses a frame for a closing connection before writing any of it.
                if written is not None:
                    self._not_written(written, call_id, error)
                continue
            except asyncio.CancelledError:
                if written is not None and not written.done():
                    written.set_result(None)  # in the socket's buffer: its call fails in_flight
                if self._write_stalled:  # cancelled by ``_watch_writes``
                    if (task := asyncio.current_task()) is not None:
                        task.uncancel()
                    await self._on_stalled()
                    return
                if cancelled_by_owner():
                    raise
                # aiohttp cancelled the shared drain future itself (its ping's task, as the
                # connection closes): the frame is out and the connection is going.
                self._lost("the connection closed while the dispatcher wrote to it")
                return
            finally:
                self.draining = False
                self._write_began = None
            if written is None:
                continue
            if not written.done():
                written.set_result(None)
            elif call_id is not None:  # its sender gave up while it was being written
                self.queue_cancel(call_id)

    def _watch_writes(self) -> None:
        """The stall timer: ends the write in progress once it has waited ``stall_after``
        for the socket to drain; looks again when the write now in progress is due."""
        self._write_watch = None
        began = self._write_began
        if began is None or self._stopped:
            return  # idle: the next write sets the timer again
        due = began + self.stall_after
        if self._loop.time() < due:
            self._write_watch = self._loop.call_at(due, self._watch_writes)
            return
        self._write_stalled = True
        self.task.cancel()
