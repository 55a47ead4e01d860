"""A dependency's outage in the log: a line when it begins, a reminder now and then, a
line when it ends — not a line per failed poll.

Job workers and the callback runner poll the job store; while it is down every poll fails
(every ``retry_after_ms``: once a second by default, five times a second in the tests), and
a warning per failure would bury every other line of the host's log for as long as the
outage lasts. The count of failures not logged travels with each reminder, so nothing is
hidden, only folded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["REMIND_SECONDS", "OutageLog"]

#: While an outage lasts, one reminder this often.
REMIND_SECONDS = 60.0


class OutageLog:
    """The log lines of one poller's failures against one dependency."""

    __slots__ = ("_began", "_clock", "_folded", "_last_line", "_logger", "remind", "what")

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        remind: float = REMIND_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.what = what
        self.remind = remind
        self._clock = clock
        self._began: float | None = None
        self._last_line = 0.0
        self._folded = 0  # failures since the last line

    @property
    def failing(self) -> bool:
        return self._began is not None

    def failed(self, reason: str) -> None:
        now = self._clock()
        if self._began is None:
            self._began = self._last_line = now
            self._logger.warning("%s: %s", self.what, reason)
        elif now - self._last_line >= self.remind:
            self._logger.warning(
                "%s: still failing after %.0f s (%d more failures since the last line): %s",
                self.what,
                now - self._began,
                self._folded + 1,
                reason,
            )
            self._last_line = now
            self._folded = 0
        else:
            self._folded += 1

    def recovered(self) -> None:
        if self._began is None:
            return
        self._logger.warning(
            "%s: working again after %.1f s (%d failures not logged one by one)",
            self.what,
            self._clock() - self._began,
            self._folded,
        )
        self._began = None
        self._folded = 0
