"""Draining: which calls and streams are in flight, and ending them when the grace runs out.

``Dispatcher.drain(grace)`` stops admitting work, lets what is in flight finish, and cuts
off what is still running when ``grace`` has passed. For that the dispatcher has to know
what is in flight, on the hot path of every call, without slowing it: ``InFlight`` is a
dict of the tasks inside ``Dispatcher.call`` (one store and one ``pop`` per call, no
lock: everything runs on the loop's thread), each with the plugin versions its route may
reach, and a set of the open streams. A reload waits only for those that may reach a
version it retires (``wait_settled``): a long call or an open stream to a plugin it keeps
does not hold up the detaching of one it removed.

Cutting off a call cancels the task awaiting it, the only way to stop a chain wherever it
waits (a rate limiter, a bulkhead, a batch, a socket) without each step knowing about
draining. The task is remembered in ``cut``; ``Dispatcher.call`` sees it there, takes the
cancellation back (``Task.uncancel``, so a ``TaskGroup`` or ``asyncio.timeout`` of the
host is not fooled) and raises ``ShuttingDown`` instead: the caller gets a typed,
retryable error, not a ``CancelledError`` it did not ask for.

A stream is cut off the same way while it waits for a chunk; a stream suspended at a
``yield`` (its consumer is busy elsewhere) is only marked, and its next step raises
``ShuttingDown``: cancelling its consumer's task would cancel unrelated work.

``aclose`` without a grace closes the targets under what is in flight: a subprocess
plugin's connection closes, an HTTP client's session ends, and the provider fails the call
with ``TargetUnavailable`` as if the plugin had gone away. Once ``closing`` is set, such a
failure (``CLOSED_UNDER``) is the dispatcher's own doing: the call ends in the same
``ShuttingDown`` (``stage`` ``cut_off``) as an in-process plugin's call, with the
provider's error as its cause. While the dispatcher runs, a plugin going away is still
``TargetUnavailable``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    ProviderError,
    ShuttingDown,
    TargetUnavailable,
)

__all__ = [
    "CLOSED_UNDER",
    "CUT_OFF_SECONDS",
    "InFlight",
    "OpenStream",
    "Reaches",
    "checked_grace",
    "current_task_getter",
]

log = logging.getLogger("dispatcher")

T = TypeVar("T")

#: How long cut-off calls get to unwind (release slots, close their connections) after
#: the grace has run out, before the dispatcher closes under whatever still ignores its
#: cancellation.
CUT_OFF_SECONDS = 1.0

#: What a provider raises for a call whose target the closing dispatcher took away.
CLOSED_UNDER = (TargetUnavailable, ProviderError)


def current_task_getter(
    loop: asyncio.AbstractEventLoop,
) -> Callable[[], asyncio.Task[Any] | None]:
    """``asyncio.current_task`` for ``loop``, as cheap as this Python makes it.

    On 3.11 ``asyncio.current_task`` is Python code (get the running loop, then look it up
    in ``asyncio.tasks._current_tasks``): ~300 ns, most of what tracking a call would
    cost. The same lookup bound to the loop once is ~40 ns. 3.12 made ``current_task``
    C code; there, and wherever the private table is not a dict, the public function.
    """
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info < (3, 12) and isinstance(table, dict):
        return functools.partial(table.get, loop)
    return functools.partial(asyncio.current_task, loop)


#: What a call or stream in flight may reach: plugin keys (``id@version``), or None for
#: any (a fallback, a call made from inside a call, an event): ``Route.reaches``.
Reaches = frozenset[str] | None


class OpenStream:
    """One stream in flight: the task waiting for its next chunk, if any, whether it was
    cut, and what it may reach."""

    __slots__ = ("cut", "reaches", "task")

    def __init__(self, reaches: Reaches) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.cut = False
        self.reaches = reaches


def checked_grace(grace: object) -> float:
    """A drain's or a reload's grace: seconds in [0, 86400]; ``InvalidParams`` if not."""
    if (type(grace) is float or type(grace) is int) and 0 <= grace <= 86_400:  # NaN fails
        return float(grace)
    raise InvalidParams(f"grace must be a number of seconds in [0, 86400], got {grace!r:.40}")


class InFlight:
    """The calls and streams in flight of one dispatcher, and the wake-up of a drain."""

    __slots__ = (
        "_idle",
        "_settled",
        "_settling",
        "_settling_streams",
        "calls",
        "closing",
        "cut",
        "streams",
        "tell_left",
    )

    def __init__(self) -> None:
        self.calls: dict[asyncio.Task[Any], Reaches] = {}
        self.streams: set[OpenStream] = set()
        #: Tasks cancelled by a cut-off, so their call raises ``ShuttingDown``.
        self.cut: set[asyncio.Task[Any]] = set()
        #: Whether a call or stream ending must call ``left`` (a drain or a reload waits
        #: for it); one attribute check on the hot path otherwise.
        self.tell_left = False
        #: Set by ``aclose`` as it closes the targets: what their calls then fail with
        #: (``CLOSED_UNDER``) is the dispatcher's doing, not the plugin's.
        self.closing = False
        self._idle: asyncio.Future[None] | None = None
        # A reload waiting for the calls and streams in flight when routes swapped
        # (``wait_settled``); calls that started later do not hold it up.
        self._settled: asyncio.Future[None] | None = None
        self._settling: set[asyncio.Task[Any]] = set()
        self._settling_streams: set[OpenStream] = set()

    @property
    def count(self) -> int:
        return len(self.calls) + len(self.streams)

    def left(self, task: asyncio.Task[Any] | None) -> None:
        """A call or stream ended while draining or settling: wake the drain when it was
        the last, the reload when the last of those it waits for ended."""
        if task is not None:
            self.cut.discard(task)  # a call that ended in spite of its cut-off
            self._settling.discard(task)
        idle = self._idle
        if idle is not None and not self.calls and not self.streams and not idle.done():
            idle.set_result(None)
        settled = self._settled
        if (
            settled is not None
            and not self._settling
            and not (self._settling_streams & self.streams)
            and not settled.done()
        ):
            settled.set_result(None)

    async def wait_settled(
        self, deadline: float, spare: asyncio.Task[Any] | None, retired: Reaches = None
    ) -> bool:
        """Wait until every call and stream in flight now that may reach one of the
        ``retired`` plugin versions (None: any) has ended (those starting later do not
        count; ``spare``: the waiting task itself), or the loop's clock reaches
        ``deadline``; settled? The caller must have ``left`` called meanwhile."""
        self._settling = {
            task
            for task, reaches in self.calls.items()
            if task is not spare and _may_reach(reaches, retired)
        }
        self._settling_streams = {
            stream for stream in self.streams if _may_reach(stream.reaches, retired)
        }
        if not self._settling and not self._settling_streams:
            return True
        self._settled = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout_at(deadline):
                await self._settled
        except TimeoutError:
            return False
        finally:
            self._settled = None
            self._settling = set()
            self._settling_streams = set()
        return True

    async def wait_idle(self, deadline: float) -> bool:
        """Wait until nothing is in flight or the loop's clock reaches ``deadline``; idle?"""
        if not self.calls and not self.streams:
            return True
        self._idle = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout_at(deadline):
                await self._idle
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True

    def cut_off(
        self, spare: asyncio.Task[Any] | None, why: str = "the dispatcher's drain grace ran out"
    ) -> int:
        """Cancel every call and stream still in flight (but ``spare``, the drain's own task).

        Returns how many were cut off. Streams suspended at a ``yield`` are marked and no
        longer counted: nothing of theirs is running.
        """
        cut = 0
        for task in self.calls:
            if task is not spare and task not in self.cut:
                self.cut.add(task)
                task.cancel(why)
                cut += 1
        for stream in list(self.streams):
            stream.cut = True
            cut += 1
            waiting = stream.task
            if waiting is None:
                self.streams.discard(stream)
            elif waiting is not spare:
                waiting.cancel(why)
        return cut

    async def cut_off_and_wait(self, spare: asyncio.Task[Any] | None, why: str) -> int:
        """``cut_off``, then wait ``CUT_OFF_SECONDS`` at most for what was cut to end;
        returns how many were cut off."""
        self.tell_left = True
        cut = self.cut_off(spare, why)
        if not await self.wait_idle(asyncio.get_running_loop().time() + CUT_OFF_SECONDS):
            log.error("%d calls ignored their cut-off; closing under them", self.count)
        return cut

    def cut_off_error(
        self, task: asyncio.Task[Any] | None, what: str, error: BaseException | None = None
    ) -> ShuttingDown:
        """The error of ``what``, cut off by a drain: its task's cancellation taken back,
        so a ``TaskGroup`` or ``asyncio.timeout`` of the host sees no cancellation of its own.
        (``error`` is what the chain raised: ``CancelledError``, or a provider's
        translation of it.)"""
        if task is not None and task in self.cut:
            self.cut.discard(task)
            task.uncancel()
        if isinstance(error, DispatchError):
            log.debug("cut off %s: the chain ended with %r", what, error)
        return self._shutting_down(what)

    def closed_under(self, error: BaseException) -> bool:
        """Whether ``error`` ended a call because ``aclose`` closed its target under it."""
        return self.closing and isinstance(error, CLOSED_UNDER)

    def closed_under_error(self, what: str, error: BaseException) -> ShuttingDown:
        """The error of ``what``, whose target ``aclose`` closed under it (``error``: the
        provider's, which the caller raises it from)."""
        log.debug("cut off %s: its target closed under it with %r", what, error)
        return self._shutting_down(what)

    @staticmethod
    def _shutting_down(what: str) -> ShuttingDown:
        return ShuttingDown(
            f"the dispatcher shut down while {what} was in flight (a drain's grace ran out, or"
            " it closed without one); it may have reached the plugin",
            details={"stage": "cut_off"},
        )

    async def tracked(self, work: Awaitable[T], what: str, reaches: Reaches = None) -> T:
        """Await ``work`` as a call in flight that may reach ``reaches``: a drain waits for
        it and may cut it off (then ``ShuttingDown``). A call from inside a call is not
        counted again: the outer one counts, as one that may reach anything.
        ``Dispatcher.call`` inlines the same on its hot path."""
        task = asyncio.current_task()
        calls = self.calls
        if task is None:
            return await work
        if task in calls:
            calls[task] = None
            return await work
        calls[task] = reaches
        try:
            return await work
        except (asyncio.CancelledError, DispatchError) as error:
            if self.cut and task in self.cut:
                raise self.cut_off_error(task, what, error) from None
            if self.closing and self.closed_under(error):
                raise self.closed_under_error(what, error) from error
            raise
        finally:
            calls.pop(task, None)
            if self.tell_left:
                self.left(task)

    async def tracked_stream(
        self, chunks: AsyncGenerator[Any, None], what: str, reaches: Reaches = None
    ) -> AsyncGenerator[Any, None]:
        """``chunks``, counted as a stream in flight that may reach ``reaches``: a drain
        waits for it and may cut it off (then ``ShuttingDown``, as a call gets).
        ``chunks`` is closed when this ends."""
        stream = OpenStream(reaches)
        self.streams.add(stream)
        try:
            while True:
                stream.task = task = asyncio.current_task()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (asyncio.CancelledError, DispatchError) as error:
                    if stream.cut:
                        if task is not None:
                            task.uncancel()
                        raise self.cut_off_error(None, what) from None
                    if self.closing and self.closed_under(error):
                        raise self.closed_under_error(what, error) from error
                    raise
                finally:
                    stream.task = None
                yield chunk
                if stream.cut:  # cut off while its consumer held the chunk
                    raise self.cut_off_error(None, what)
        finally:
            self.streams.discard(stream)
            try:
                await chunks.aclose()
            finally:
                if self.tell_left:
                    self.left(None)

    def __repr__(self) -> str:
        return f"<InFlight calls={len(self.calls)} streams={len(self.streams)} cut={len(self.cut)}>"


def _may_reach(reaches: Reaches, retired: Reaches) -> bool:
    return reaches is None or retired is None or not reaches.isdisjoint(retired)
