"""The load ``dispatcher bench`` puts on one method, and what it measured.

Closed loop by default: ``concurrency`` callers, each making its next call as soon as its
last one ended; a call's latency runs from its start to its end. With a ``rate`` the load
is open: call *i* is due at ``start + i / rate`` whatever happened to the calls before it,
and its latency runs from when it was due (the callers, still at most ``concurrency`` in
flight, fall behind when the method cannot keep up, and that wait is counted); calls
still not started when the duration ends are not made, and counted as ``not_started``. Measuring
from the actual start instead would hide exactly the queueing a slow method causes
(coordinated omission, as wrk2 names it).

Every call goes through ``Dispatcher.call`` with the manifest's policies, as the host's do.
A call's outcome is counted by its error ``type`` (``DispatchError.type``); the load goes
on after a failure, so a run shows the mix a method answers with under that load.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from linchkit_plugin.errors import DispatchError

__all__ = ["Latencies", "Load", "LoadReport", "Tally", "run_load"]

#: Longest error message kept per error type (a plugin's message may be any size).
MESSAGE_MAX_CHARS = 200

#: ``call(params)``: one call of the method under load.
CallOnce = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Load:
    """What to send: how many callers, until when, and at what pace."""

    concurrency: int
    #: Stop starting calls after this many (None: no such bound).
    calls: int | None
    #: Stop starting calls after this many seconds (None: no such bound).
    duration: float | None
    #: Calls per second, open loop; None: closed loop (each caller at once again).
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.calls is None and self.duration is None:
            raise ValueError("a load needs calls, a duration or both")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of calls per second")


@dataclass(slots=True)
class Tally:
    """The calls that ended with one error type: how many, and the first one's message."""

    count: int
    message: str
    retryable: bool


class Latencies:
    """Call latencies in a log-linear histogram: a run of any length in the same few KB.

    Below 128 ns each nanosecond is a bucket of its own; above, each power of two is cut
    in 64, so a percentile read off a bucket is within 1/64 (1.6 %) of the latencies in it,
    finer than one run differs from the next. The largest is kept exactly. (A list of
    every latency took 8 bytes a call: 1.2 GB for an hour at 40,000 calls a second.)
    """

    __slots__ = ("_buckets", "count", "largest")

    def __init__(self) -> None:
        self.count = 0
        self.largest = 0
        self._buckets: dict[int, int] = {}

    def add(self, nanoseconds: int) -> None:
        nanoseconds = max(nanoseconds, 0)
        self.count += 1
        if nanoseconds > self.largest:
            self.largest = nanoseconds
        bucket = _bucket_of(nanoseconds)
        self._buckets[bucket] = self._buckets.get(bucket, 0) + 1

    def percentile(self, percent: float) -> int:
        """The latency ``percent`` % of calls stayed within (nearest rank), in ns: the
        middle of its bucket, never more than the largest."""
        if not self.count:
            return 0
        rank = max(math.ceil(percent / 100 * self.count), 1)
        seen = 0
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                return min(_middle_of(bucket), self.largest)
        return self.largest


def _bucket_of(nanoseconds: int) -> int:
    if nanoseconds < 128:
        return nanoseconds
    shift = nanoseconds.bit_length() - 7  # keep 7 significant bits: 64..127 after the shift
    return 128 + (shift - 1) * 64 + (nanoseconds >> shift) - 64


def _middle_of(bucket: int) -> int:
    if bucket < 128:
        return bucket
    shift, mantissa = divmod(bucket - 128, 64)
    shift += 1
    low = (mantissa + 64) << shift
    return low + (1 << shift) // 2


@dataclass(slots=True)
class LoadReport:
    """What a load measured: outcomes, latencies, wall and CPU time."""

    succeeded: int = 0
    errors: dict[str, Tally] = field(default_factory=dict)
    latencies: Latencies = field(default_factory=Latencies)
    elapsed: float = 0.0
    #: CPU time of this process over the run, every thread (providers' own included).
    cpu_seconds: float = 0.0
    #: True when the run was stopped before its calls or duration were done.
    interrupted: bool = False
    #: Open loop: calls that fell due within the duration but had not started when it
    #: ended (every caller still busy): the rate asked for was more than the method took.
    not_started: int = 0

    @property
    def calls(self) -> int:
        return self.succeeded + self.failed

    @property
    def failed(self) -> int:
        return sum(tally.count for tally in self.errors.values())

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_seconds / self.calls * 1e6 if self.calls else 0.0

    def percentile_ms(self, percent: float) -> float:
        """The latency ``percent`` % of calls stayed within (nearest rank), in ms."""
        return self.latencies.percentile(percent) / 1e6

    def count_error(self, error: BaseException) -> None:
        # The type a caller sees on the wire: a plugin's own error by its own name.
        kind = error.to_wire()["type"] if isinstance(error, DispatchError) else type(error).__name__
        tally = self.errors.get(kind)
        if tally is None:
            retryable = isinstance(error, DispatchError) and error.retryable
            message = str(error)[:MESSAGE_MAX_CHARS]
            self.errors[kind] = Tally(1, message, retryable)
        else:
            tally.count += 1


#: How many calls (of all callers) go by between two turns a caller gives the event loop.
YIELD_EVERY = 64


async def run_load(
    call: CallOnce, params: Sequence[Any], load: Load, stop: asyncio.Event
) -> LoadReport:
    """Put ``load`` on ``call``, cycling through ``params``, until it is done or ``stop``
    is set; calls already started then end (each within its own deadline) before this
    returns."""
    if not params:
        raise ValueError("params: at least one value to send")
    report = LoadReport()
    clock = time.perf_counter  # not loop.time(): uvloop's reads in whole milliseconds
    started = clock()
    ends_at = math.inf if load.duration is None else started + load.duration
    sequence = itertools.count()
    cycle = itertools.cycle(params)
    limit = math.inf if load.calls is None else load.calls
    interval = None if load.rate is None else 1 / load.rate

    async def caller() -> None:
        while not stop.is_set():
            index = next(sequence)
            if index >= limit:
                return
            due = clock() if interval is None else started + index * interval
            if due >= ends_at or clock() >= ends_at:
                return
            early = due - clock()
            if early > 0 and await _stopped_before(stop, early):
                return
            await _one_call(call, next(cycle), due, clock, report)
            if index % YIELD_EVERY == 0:
                # A method that answers at once (an in-process plugin) never suspends its
                # caller: without a turn of the loop now and then, Ctrl-C's handler and
                # every other task waited until the whole run was over.
                await asyncio.sleep(0)

    cpu_started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(load.concurrency)))
    report.elapsed = clock() - started
    report.cpu_seconds = time.process_time() - cpu_started
    report.interrupted = stop.is_set()
    if interval is not None and load.duration is not None and not report.interrupted:
        due_in_run = min(math.ceil(load.duration / interval), limit)
        report.not_started = max(int(due_in_run) - report.calls, 0)
    return report


async def _one_call(
    call: CallOnce,
    params: Any,
    due: float,
    clock: Callable[[], float],
    report: LoadReport,
) -> None:
    try:
        await call(params)
    except Exception as error:  # counted, and the load goes on: the mix is the finding
        report.count_error(error)
    else:
        report.succeeded += 1
    report.latencies.add(int((clock() - due) * 1e9))


async def _stopped_before(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` (an open loop's next call is not due yet); True if ``stop`` was
    set meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
