"""Whether a channel is open, going away or closed, and how it gets from one to the next
(``ChannelLifecycle``).

    open ──goaway (the plugin's, or this side's go_away)──► going away ──drained──► closed
      └──── the socket closes, a write or a read stalls, ``close`` ───────────────► closed

A plugin that is stopping sends ``goaway``: from then on no call or stream is sent on the
channel (``going_away``; a call is refused as never sent), the ones in flight are
answered, and the channel closes itself (1000) once none is left. ``leaving`` is set then,
or when the channel closes, so its owner can stop using it: the dialer dials anew, the
gateway's fleet lets the instance go.

Once closed, every call still in flight fails ``TargetUnavailable`` (stage
``in_flight``), every frame still queued as never sent, and the read watch stops. A plugin
that takes nothing written to it for ``STALL_HEARTBEATS`` heartbeats (``writer.py``), or
sends no whole frame for as long and then does not answer a probe (``read_watch.py``), is
dropped at once with ``CLOSE_STALLED``: it will most likely never read a graceful close
either.

Every task the channel starts is this object's (the drain, the stall drops, the refusals
and probes the reader sends, the grace after a close: ``closing.let_go``), and ``close``
ends them all with the writer's, so nothing of a channel outlives its ``close``. The
socket-level steps of a close are ``closing.py``'s; what they mean to the channel, here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from linchkit_plugin.errors import TargetUnavailable
from providers.websocket.closing import close_socket, hang_up, let_go
from providers.websocket.in_flight import InFlight
from providers.websocket.read_watch import ReadWatch
from providers.websocket.writer import FrameWriter, Socket

__all__ = ["CLOSE_STALLED", "READ_STALLED_REASON", "STALL_HEARTBEATS", "ChannelLifecycle"]

log = logging.getLogger("dispatcher.providers.websocket")

#: How often a channel that was told ``goaway`` looks whether its last call has ended.
_DRAIN_POLL_SECONDS = 0.01
#: Heartbeats a write may wait for the plugin to take anything before the connection is
#: dropped: as long as the heartbeat takes to find a silent peer gone (a ping after one
#: heartbeat of silence, its pong due within half of one). The heartbeat alone does not
#: find a plugin that stops reading but goes on sending: any frame it sends puts
#: aiohttp's ping off.
STALL_HEARTBEATS = 1.5
#: The close code of a connection dropped because its writes stalled (policy violation:
#: the plugin does not read what it is sent). It will most likely never read it either.
CLOSE_STALLED = 1008
#: Why a connection whose plugin sent no whole frame for 1.5 heartbeats, nor answered the
#: health probe it was sent then within 1.5 more, was dropped (``read_watch``): one that
#: trickles a frame would hold the reader (and every call) until its frame ends.
READ_STALLED_REASON = (
    "the plugin sent no whole frame for 1.5 heartbeats, nor answered a health probe in 1.5 more"
)


class ChannelLifecycle:
    """One channel's state (``closed``, ``going_away``, ``leaving``), the ways it ends, and
    the tasks it starts on the way, which ``close`` ends."""

    def __init__(
        self,
        socket: Socket,
        describe: str,
        *,
        writer: FrameWriter,
        in_flight: InFlight,
        read_watch: ReadWatch,
    ) -> None:
        self._socket = socket
        self._describe = describe
        self._writer = writer
        self._in_flight = in_flight
        self._read_watch = read_watch
        self._loop = asyncio.get_running_loop()
        self._background: set[asyncio.Task[None]] = set()
        #: The grace after a graceful close (``closing.let_go``): the channel's own, so
        #: ``close`` ends it and nothing of the channel outlives ``close``.
        self._letting_go: asyncio.Task[None] | None = None
        self.closed = False
        self.close_reason = ""
        #: The plugin said ``goaway``: nothing new is sent; the channel closes once drained.
        self.going_away = False
        #: Set on ``goaway`` or when the channel closes: its owner stops using it.
        self.leaving = asyncio.Event()
        #: Open and not going away: new calls may be sent. Kept with the two flags above
        #: (set where ``leaving`` is) so that every call reads one attribute, not two.
        self.usable = True

    @property
    def background_tasks(self) -> int:
        """The tasks started on the way (``spawn``) that still run."""
        return len(self._background)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of the channel's, which ``close`` cancels if it still runs."""
        task = self._loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- going away ------------------------------------------------------------------------

    def plugin_goes_away(self) -> None:
        """The plugin is stopping: send it nothing new, close once its calls are answered."""
        if self.going_away or self.closed:
            return
        log.info(
            "%s is going away: its %d calls in flight finish",
            self._describe,
            len(self._in_flight),
        )
        self._drain_then_close(1000, "")

    def go_away(self, code: int, reason: str) -> None:
        """This side's goaway: see ``Channel.go_away``."""
        if self.going_away or self.closed:
            return
        log.info(
            "%s: %s; its %d calls in flight finish first",
            self._describe,
            reason,
            len(self._in_flight),
        )
        self._drain_then_close(code, reason)

    def _drain_then_close(self, code: int, reason: str) -> None:
        self.going_away = True
        self.usable = False
        self.leaving.set()
        self.spawn(self._close_when_drained(code, reason))

    async def _close_when_drained(self, code: int, reason: str) -> None:
        # Calls end by their answers, deadlines or cancellation, in several places: looked
        # at rather than signalled from each (a drain happens once per connection).
        while self._in_flight and not self.closed:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        await self._close_socket(code, reason)  # ends ``Channel.run``

    # -- ending ----------------------------------------------------------------------------

    def end(self, reason: str) -> None:
        """The channel is closed, for ``reason`` (once: later calls change nothing). What
        is in flight fails, what is queued fails as never sent, the read watch stops."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.usable = False
        self.leaving.set()
        self._read_watch.stop()
        self._writer.stop(reason)  # what is still queued fails as never sent
        self._in_flight.cut_off(lambda: self._cut_off(reason))

    def _cut_off(self, reason: str) -> TargetUnavailable:
        # Sent and maybe run: retryable, but only the retry policy (idempotent methods)
        # may send it again; the fleet does not fail it over ("in_flight", not "connect").
        return TargetUnavailable(
            f"{self._describe}: {reason} with the call in flight; it may have run",
            details={"stage": "in_flight"},
        )

    async def writes_stalled(self) -> None:
        """The writer waited ``stall_after`` for the plugin to take anything: drop it."""
        reason = f"the plugin took nothing written to it for {self._writer.stall_after:g} s"
        log.warning("%s: %s; dropping the connection", self._describe, reason)
        self.end(f"{reason} (writes stalled)")
        await self._drop(CLOSE_STALLED, reason)

    def reads_stalled(self) -> None:
        """The read watch found no whole frame, nor an answer to its probe: drop it."""
        log.warning("%s: %s; dropping the connection", self._describe, READ_STALLED_REASON)
        self.end(READ_STALLED_REASON)
        self.spawn(self._drop(CLOSE_STALLED, READ_STALLED_REASON))

    async def _drop(self, code: int, reason: str) -> None:
        await hang_up(self._socket, code, reason)
        await self._close_socket(code, reason)  # aiohttp's own state: closed, timers off

    async def _close_socket(self, code: int, reason: str) -> None:
        buffered = await close_socket(self._socket, code, reason)
        if buffered is not None and self._letting_go is None:
            # As long as a write may wait for the plugin to take anything.
            self._letting_go = self._loop.create_task(
                let_go(buffered, self._writer.stall_after), name=f"letting go of {self._describe}"
            )

    async def close(self, code: int, reason: str, *, at_once: bool) -> None:
        """End the channel and close its socket (``Channel.close``); once it returns, none
        of the channel's tasks runs and the socket is let go."""
        self.end(
            f"the dispatcher closed the connection ({code}: {reason})"
            if reason
            else "the dispatcher closed the connection"
        )
        if at_once:
            await self._drop(code, reason)
        else:
            await self._close_socket(code, reason)
        letting_go = self._letting_go
        if letting_go is not None:
            # Within 1.5 heartbeats. Waited for, not awaited: two close at once (the reader
            # as it ends, and the provider), and a cancel of one must not reach the grace
            # through its await and fail the other's close. A cancelled close aborts it.
            try:
                await asyncio.wait([letting_go])
            except asyncio.CancelledError:
                letting_go.cancel()
                raise
        tasks = [*self._background, self._writer.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "going away" if self.going_away else "open"
        return (
            f"<ChannelLifecycle {self._describe} {state} tasks={self.background_tasks}"
            f" letting_go={self._letting_go is not None}>"
        )
