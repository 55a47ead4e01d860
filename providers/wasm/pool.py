"""The instances of one attached wasm plugin, and the threads its calls run on.

At most ``pool_size`` calls run at once, each in a lane of its own (``_Lane``: a compiled
module and its instance, so cancelling one call never stops another) and on a thread of
the pool's own (``Workers``: a busy plugin never takes another's threads, the event loop
never runs wasm, and a thread asleep in a host call holds up neither the close nor the
process's exit).
A call holds its slot until its thread is done, even after its caller was answered: a
module blocked in a host call (a WASI sleep) cannot be interrupted, and a slot freed
early would let threads pile up behind it.

What survives a call:

* ``pooled``: the instance goes back to the pool, its linear memory (globals, the Go
  heap) intact, for whichever call takes it next. Calls spread over up to ``pool_size``
  instances, so a plugin may cache there but must not count on seeing its own state.
* ``fresh``: nothing; every call gets a new instance and it is dropped after.
* Either way an instance whose call was cancelled (deadline, cpu cap) or trapped
  (memory limit, crash) is dropped: its state is whatever the interruption left. A call
  libextism was told to stop takes its lane's compiled module too: libextism's cancel
  moves the epoch of the module's engine, which every instance made from it shares,
  when its timer thread gets to it, and that may be after the call has returned.

Deadlines: a call waits for a free slot, and for its instance's start code (which no
cancel reaches), until its deadline at most; ``cancel`` is scheduled on the event loop at
the call's end time and stops the module at its next instruction boundary (wasmtime epoch
interruption inside libextism). A cancel that comes before the thread enters libextism
stays with the instance, and the call is not begun (``Instance.cancel``: libextism would
forget it, or worse, spend it in the gap before it arms the call's deadline); one that
comes inside libextism before the call has started is forgotten there, so the cancel is
repeated until the thread is back. Cancel and free both run on the loop, so a late cancel
never reaches an instance that was freed or handed to the next call.

A thread that comes back after its caller was answered brings a failure nobody will be
told: ``on_late_failure`` hears it (the provider logs a refused HTTP request there, a
security incident whenever it happens).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from providers.wasm.runtime import CallFailed, Compiled, Instance
from providers.wasm.workers import Workers

__all__ = ["CallResult", "InstancePool", "LateFailure"]

#: A cancelled call is cancelled again after this, then twice as long each time up to the
#: maximum, until its thread is back (a module asleep in a host call may stay for long).
#: A call whose cancel came before libextism started it (libextism drops that one) runs
#: on until the next: the maximum bounds how long past its deadline it holds its slot and
#: a core. At 1 s a deadline-0 call on a loaded machine held a pool's one slot
#: past the 2 s the next call waited (tests/test_wasm_hostile_timing.py); a cancel every
#: 0.1 s for a module asleep in a host call costs nothing that counts.
_RECANCEL_SECONDS = 0.01
_RECANCEL_MAX_SECONDS = 0.1

#: A call whose thread spent a quarter of this on a core in this long after a cancel, and
#: is not back, is one libextism lost the cancel of (``Instance._enter``): said once, as
#: nothing here can stop it. A module asleep in a host call spends no CPU meanwhile; a
#: quarter leaves room for a core shared with the rest of a loaded machine.
LOST_CANCEL_SECONDS = 1.0

#: How long a close waits for its threads once it cancelled their calls: a cancel stops a
#: module at its next instruction within milliseconds; a thread still out after this is
#: in a host call, and is left to come back on its own.
CLOSE_WAIT_SECONDS = 0.5

log = logging.getLogger("dispatcher.providers.wasm")


@dataclass(frozen=True, slots=True)
class CallResult:
    """How a call ended: its output, or the failure and whether we cancelled it."""

    output: bytes | None = None
    failure: CallFailed | None = None
    #: ``busy``: every slot stayed taken until the deadline; the call never started.
    #: ``closed``: the pool closed (its plugin was detached) before the call started.
    cancelled_by: Literal["deadline", "cpu", "busy", "closed", None] = None


class LateFailure(Protocol):
    """Told how a call of ``function`` failed, once its thread is back after its caller
    was answered (its deadline, its cpu_s)."""

    def __call__(self, function: str, failure: CallFailed) -> None: ...


class _Lane:
    """One call at a time: a compiled module of its own and, when pooled, its instance.

    libextism's cancel stops every running instance made from the same compiled module
    (they share one wasmtime engine and its epoch), so each concurrent call needs its own;
    after the first, compiling one is a lookup in libextism's module cache (~20 ms).
    """

    __slots__ = ("compiled", "instance")

    def __init__(self, compiled: Compiled) -> None:
        self.compiled = compiled
        self.instance: Instance | None = None


class InstancePool:
    def __init__(
        self,
        name: str,
        compile_lane: Callable[[], Compiled],
        config: dict[str, str],
        *,
        size: int,
        reuse: bool,
        on_late_failure: LateFailure | None = None,
    ) -> None:
        self.name = name
        self._on_late_failure = on_late_failure
        self._compile_lane = compile_lane
        self._config = config
        self._size = size
        self._reuse = reuse
        self._idle: list[_Lane] = []
        self._lanes: list[_Lane] = []
        self._running: set[Instance] = set()
        self._slots = asyncio.Semaphore(size)
        self._workers = Workers(size, f"wasm-{name}")
        self._closed = False

    async def warm(self) -> Instance:
        """The first lane and an instance, made now (the attach check of exports). An
        attach that gives up meanwhile (``start_timeout_ms``, a cancel) leaves the lane to
        be freed once it is made: the start code runs on, and no cancel reaches it."""
        setup = self._workers.run(self._prepare, None)
        try:
            lane, made = await asyncio.shield(setup)
        except BaseException:
            setup.add_done_callback(self._take_back)
            raise
        self._idle.append(lane)
        if isinstance(made, CallFailed):
            raise made
        return made

    def _new_lane(self) -> _Lane:
        lane = _Lane(self._compile_lane())
        self._lanes.append(lane)
        return lane

    def _prepare(self, lane: _Lane | None) -> tuple[_Lane, Instance | CallFailed]:
        """A lane and the instance a call runs on; the failure to make one (a module whose
        start traps) as a value, so the lane is not lost with it."""
        if lane is None:
            lane = self._new_lane()
        try:
            if lane.instance is None or not self._reuse:
                if lane.instance is not None:
                    lane.instance.close()
                    lane.instance = None
                lane.instance = lane.compiled.instantiate(self._config)
        except CallFailed as failure:
            return lane, failure
        return lane, lane.instance

    def _prepared(self, setup: asyncio.Future[tuple[_Lane, Instance | CallFailed]]) -> None:
        """A call gave up while its lane was made: the lane goes back once it is (or is
        freed, the pool closed meanwhile), and so does the call's slot."""
        self._take_back(setup)
        self._slots.release()

    def _take_back(self, setup: asyncio.Future[tuple[_Lane, Instance | CallFailed]]) -> None:
        if not setup.cancelled() and setup.exception() is None:
            lane, made = setup.result()
            if self._closed:
                _free(lane)
            else:
                if isinstance(made, Instance) and not self._reuse:
                    made.close()
                    lane.instance = None
                self._idle.append(lane)

    async def call(
        self, function: str, payload: bytes, *, remaining: float, cpu_s: float | None
    ) -> CallResult:
        """Run ``function`` within ``remaining`` seconds, and at most ``cpu_s`` of them."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + remaining
        try:
            # A slot can stay taken for as long as a module sleeps in a host call: waiting
            # for one is bounded by this call's deadline, not by the other call's.
            async with asyncio.timeout_at(ends):
                await self._slots.acquire()
        except TimeoutError:
            return CallResult(failure=CallFailed("cancelled", "timeout"), cancelled_by="busy")
        if self._closed:
            # Its threads have ended: a job given them now would wait for ever. The slot
            # goes to the next call waiting, which ends here too.
            self._slots.release()
            return _CLOSED
        lane = self._idle.pop() if self._idle else None
        if lane is not None and lane.instance is not None and self._reuse:
            instance = lane.instance
        else:
            # Compiling a lane and starting an instance run the module's own start code,
            # which no cancel reaches: the caller waits for them until its deadline only.
            setup = self._workers.run(self._prepare, lane)
            try:
                made_in_time, _ = await asyncio.wait({setup}, timeout=max(ends - loop.time(), 0.0))
            except BaseException:
                setup.add_done_callback(self._prepared)
                raise
            if not made_in_time:
                setup.add_done_callback(self._prepared)
                return CallResult(
                    failure=CallFailed("cancelled", "timeout"), cancelled_by="deadline"
                )
            try:
                lane, made = setup.result()
            except CallFailed as compile_failure:  # compiling the new lane failed
                self._slots.release()
                return CallResult(failure=compile_failure)
            except BaseException:
                self._slots.release()
                raise
            if self._closed:  # while its lane was made: the close freed what it could not
                _free(lane)  # know was in use: the call must not run on it
                self._slots.release()
                return _CLOSED
            if isinstance(made, CallFailed):
                self._idle.append(lane)
                self._slots.release()
                return CallResult(failure=made)
            instance = made
        self._running.add(instance)
        remaining = max(ends - loop.time(), 0.0)
        cpu_capped = cpu_s is not None and cpu_s < remaining
        seconds = cpu_s if cpu_s is not None and cpu_capped else remaining
        cancelled: list[Literal["deadline", "cpu"]] = []
        timer: list[asyncio.TimerHandle] = []

        def cancel(again_after: float = _RECANCEL_SECONDS) -> None:
            if not cancelled:
                cancelled.append("cpu" if cpu_capped else "deadline")
                self._watch_for_a_lost_cancel(function, instance, future)
            instance.cancel()
            # libextism drops a cancel that comes before it has started the call (the
            # thread may be inside it, the call not begun): again, until ``_settle``.
            timer[0] = loop.call_later(
                again_after, cancel, min(again_after * 2, _RECANCEL_MAX_SECONDS)
            )

        timer.append(loop.call_later(seconds, cancel))
        # The module's HTTP requests end when the call does (providers.wasm.http_host).
        future = self._workers.run(_run, instance, function, payload, time.monotonic() + seconds)
        future.add_done_callback(lambda _: self._settle(lane, instance, timer, keep=not cancelled))
        done, _ = await asyncio.wait({future}, timeout=seconds + 0.05)
        if not done:
            # Blocked in a host call past its end: answer the caller now; the slot and the
            # instance are settled when the thread comes back, and how it failed is told
            # then to whoever listens.
            if not cancelled:
                timer[0].cancel()
                cancel()
            future.add_done_callback(functools.partial(self._failed_late, function))
            return CallResult(failure=CallFailed("cancelled", "timeout"), cancelled_by=cancelled[0])
        output, failure = future.result()
        if failure is not None and failure.kind == "cancelled" and not cancelled:
            # An HTTP request of the module reached the call's end just before the timer:
            # the same end, told the same way.
            cancelled.append("cpu" if cpu_capped else "deadline")
        return CallResult(output, failure, cancelled[0] if cancelled else None)

    def _watch_for_a_lost_cancel(
        self,
        function: str,
        instance: Instance,
        future: asyncio.Future[Any],
        spent_at_cancel: float | None = None,
    ) -> None:
        spent = instance.cpu_seconds()
        # Back, or never begun: nothing to stop. Closed: the close says what it left running,
        # and no timer of the pool outlives it.
        if future.done() or spent is None or self._closed:
            return
        if spent_at_cancel is not None and spent - spent_at_cancel >= LOST_CANCEL_SECONDS / 4:
            log.error(
                "wasm plugin %s: a call of %s runs on, on a core, %g s after it was"
                " cancelled: libextism lost the cancel (one that came as the call began)."
                " Its slot and a core stay taken until the module returns, which a loop"
                " never does: restart the process to end it",
                self.name,
                function,
                LOST_CANCEL_SECONDS,
            )
            return
        asyncio.get_running_loop().call_later(
            LOST_CANCEL_SECONDS,
            self._watch_for_a_lost_cancel,
            function,
            instance,
            future,
            spent,
        )

    def _failed_late(
        self, function: str, future: asyncio.Future[tuple[bytes | None, CallFailed | None]]
    ) -> None:
        if self._on_late_failure is None or future.cancelled() or future.exception():
            return
        _, failure = future.result()
        if failure is not None:
            self._on_late_failure(function, failure)

    def _settle(
        self, lane: _Lane, instance: Instance, timer: list[asyncio.TimerHandle], *, keep: bool
    ) -> None:
        timer[0].cancel()
        self._running.discard(instance)
        if self._closed:  # its thread came back after the close: the lane goes now
            _free(lane)
        elif instance.cancel_sent:
            # libextism's timer bumps the epoch of the lane's engine when it gets to the
            # cancel, which may be after the call returned: an instance made from this
            # module meanwhile failed its next call's set-up ("unable to clear error
            # message"). The next call gets a lane of its own (a lookup in the compile
            # cache, ~20 ms, on its worker thread); cancels are the rare path.
            self._lanes.remove(lane)
            _free(lane)
        else:
            if not (keep and self._reuse and instance.healthy):
                instance.close()
                lane.instance = None
            self._idle.append(lane)
        self._slots.release()

    async def aclose(self) -> None:
        """Stop running calls and wait for their threads (``CLOSE_WAIT_SECONDS`` at most),
        then free every instance and module no thread is still in."""
        self._closed = True
        self._slots.release()  # wakes the calls waiting for a slot, one by one: they end
        for instance in list(self._running):
            instance.cancel()
        stuck = await self._workers.close(CLOSE_WAIT_SECONDS)
        for _ in range(100):  # the threads are done; their outcomes settle on the loop
            if stuck or not self._running:
                break
            await asyncio.sleep(0.001)
        # With a thread still out, only idle lanes are surely unused: the others are freed
        # as their threads come back (``_settle``, ``_prepared``).
        lanes = self._idle if stuck else self._lanes
        self._lanes, self._idle = [], []
        for lane in lanes:
            _free(lane)
        if stuck:
            log.warning(
                "wasm plugin %s: %d thread(s) still busy %g s after the close (in a host"
                " call, or in start code no cancel reaches); what each runs on is freed"
                " when it returns",
                self.name,
                len(stuck),
                CLOSE_WAIT_SECONDS,
            )

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        mode = "pooled" if self._reuse else "fresh"
        return (
            f"<InstancePool {self.name} {mode} size={self._size} lanes={len(self._lanes)} "
            f"running={len(self._running)} idle={len(self._idle)}>"
        )


_CLOSED = CallResult(failure=CallFailed("cancelled", "closed"), cancelled_by="closed")


def _free(lane: _Lane) -> None:
    """Free a lane's instance and module (each at most once: freeing is idempotent)."""
    if lane.instance is not None:
        lane.instance.close()
        lane.instance = None
    lane.compiled.close()


def _run(
    instance: Instance, function: str, payload: bytes, ends: float
) -> tuple[bytes | None, CallFailed | None]:
    try:
        return instance.call(function, payload, ends=ends), None
    except CallFailed as failure:
        # A trap leaves the instance unusable, and so does a failed HTTP request (the
        # module was stopped wherever it was).
        instance.healthy = failure.kind == "plugin"
        return None, failure
