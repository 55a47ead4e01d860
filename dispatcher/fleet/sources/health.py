"""A discovery source's reads, as ``/metrics`` and the log see them: a line when the source
starts failing, a line when it reads again, never a line per read.

A source that cannot read keeps its last list and tries again (DNS every
``min_refresh_ms``, growing to 30 s; etcd every ``retry_ms``, growing by half), so a line
per failed read would bury the host's log for as long as the outage lasts, and no line
at all (DNS, before) left a running gateway silent about it. ``ReadHealth`` keeps the
source's ``error``, ``reads`` and ``failed_reads`` (exported per fleet and source:
``dispatcher_fleet_source_up``, ``dispatcher_fleet_source_failed_reads_total``) and
writes, at WARNING both, so whoever sees the first sees the second::

    cannot read dns A echo.test:8080: echo.test: no answer from 127.0.0.1:15353 within 2000 ms
    reading dns A echo.test:8080 again after 12.3 s (7 failed reads); 2 instances

Rate-limited: an outage that begins less than ``quiet`` seconds after the last line is
not logged, nor is its end (a source that fails every other read writes one pair per
``quiet``); the next line says how many outages went unlogged. Free of I/O, with an
injectable clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["QUIET_SECONDS", "ReadHealth", "Reader"]

#: At most one outage's pair of lines per source this often.
QUIET_SECONDS = 30.0


class Reader(Protocol):
    """What ``ReadHealth`` keeps the counts of: a discovery source (``InstanceSource``),
    or the registry of plugin entries (``dispatcher._entries``)."""

    name: str
    error: str | None
    reads: int
    failed_reads: int


class ReadHealth:
    """The reads of one source: its ``error`` and counters, and their log lines."""

    __slots__ = (
        "_clock",
        "_failed_now",
        "_failing_since",
        "_last_line",
        "_logged",
        "_unlogged",
        "log",
        "plural",
        "quiet",
        "source",
    )

    def __init__(
        self,
        source: Reader,
        log: logging.Logger,
        *,
        quiet: float = QUIET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        plural: tuple[str, str] = ("instance", "instances"),
    ) -> None:
        self.source = source
        #: What a read lists, one and many, for the line saying reads work again.
        self.plural = plural
        self.log = log
        self.quiet = quiet
        self._clock = clock
        self._failing_since: float | None = None
        self._failed_now = 0  # failed reads of this outage
        self._last_line = -float("inf")
        self._logged = False  # this outage's first line was written: its end will be
        self._unlogged = 0  # outages not logged since the last line

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def failed(self, error: str) -> None:
        """A read failed; ``error`` (one line) is what ``dispatcher health`` shows."""
        source = self.source
        source.error = error
        source.failed_reads += 1
        self._failed_now += 1
        if self._failing_since is not None:
            return  # still the same outage: its line is written
        now = self._clock()
        self._failing_since = now
        self._failed_now = 1
        self._logged = now - self._last_line >= self.quiet
        if not self._logged:
            self._unlogged += 1
            return
        self._last_line = now
        self.log.warning("cannot read %s: %s%s", source.name, error, self._folded())

    def succeeded(self, instances: int) -> None:
        """A read succeeded; ``instances`` is how many it lists (the ones now reported)."""
        source = self.source
        source.reads += 1
        source.error = None
        began = self._failing_since
        if began is None:
            return
        self._failing_since = None
        if not self._logged:
            return
        now = self._clock()
        self._last_line = now
        self.log.warning(
            "reading %s again after %.1f s (%d failed %s); %d %s",
            source.name,
            now - began,
            self._failed_now,
            "read" if self._failed_now == 1 else "reads",
            instances,
            self.plural[0] if instances == 1 else self.plural[1],
        )

    def _folded(self) -> str:
        unlogged, self._unlogged = self._unlogged, 0
        if not unlogged:
            return ""
        outages = "outage" if unlogged == 1 else "outages"
        return f" ({unlogged} more {outages} since the last line, not logged)"

    def __repr__(self) -> str:
        state = "failing" if self.failing else "reading"
        return f"<ReadHealth {self.source.name} {state} failed_reads={self.source.failed_reads}>"
