"""How many lines a second of a plugin's output the dispatcher reads as lines and logs.

A plugin that writes in a loop (a log call on a hot path, ``yes >&2``) had the dispatcher
read, decode, keep and log every line of it on the event loop: with one such plugin the
loop answered 270 ms late at the median (0.9 s at worst) and a call to any other plugin
took as long. Lines over the target's ``max_log_lines_per_second`` (a token bucket of that
rate, bursts of one second of it) are neither logged nor kept for ``dispatcher logs``:
``skim`` counts them in blocks of 64 KiB (a ``bytes.count`` each, not a line each) and
pauses after each, the writer waiting on its pipe meanwhile (at most ~6 MB a second of a
flood is read, and at most 100 of its lines logged). How many lines went is said in one
line at most once a second, and at the launch's end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["DEFAULT_MAX_LOG_LINES_PER_SECOND", "OutputRate"]

#: A subprocess target's ``max_log_lines_per_second`` unless it sets one.
DEFAULT_MAX_LOG_LINES_PER_SECOND = 1000

#: What ``skim`` reads at a time: the size of a pipe's buffer, as asyncio reads it.
SKIM_BYTES = 64 * 1024

#: The pause after each block ``skim`` counts: at most ~6 MB a second of a flood is read
#: (and thrown away) while it lasts, and a line of it logged after each pause.
_FLOOD_PAUSE_SECONDS = 0.01

#: The least time between two lines that say how many lines went unlogged.
_SAY_EVERY_SECONDS = 1.0


class OutputRate:
    """The lines a second one launch's output may have logged, shared by its stdout and
    stderr; what goes over it, counted (``dropped``) and said in ``log``."""

    __slots__ = (
        "_at",
        "_clock",
        "_describe",
        "_log",
        "_rate",
        "_said_at",
        "_since",
        "_tokens",
        "_unsaid",
        "_will_say",
        "dropped",
    )

    def __init__(
        self,
        rate: float,
        describe: str,
        log: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._tokens = rate
        self._clock = clock
        self._at = self._said_at = self._since = clock()
        self._describe = describe
        self._log = log
        self._unsaid = 0
        #: The timer that says what went unlogged, while some did.
        self._will_say: asyncio.TimerHandle | None = None
        #: Lines not logged, since the launch.
        self.dropped = 0

    def take(self) -> bool:
        """Whether one more line may be logged now (it is counted if so)."""
        if self._until_a_line() > 0:
            return False
        self._tokens -= 1
        return True

    async def skim(self, stream: asyncio.StreamReader) -> None:
        """The line just read did not fit: count what ``stream`` brings, in blocks, until
        a line fits again (or the stream is quiet that long, or ends), then drop the rest
        of the line the last block cut."""
        if self._unsaid == 0:
            self._since = self._clock()
        dropped = 1
        last = b"\n"
        while (wait := self._until_a_line()) > 0:
            try:
                async with asyncio.timeout(wait):
                    block = await stream.read(SKIM_BYTES)
            except TimeoutError:
                break
            if not block:
                break
            dropped += block.count(b"\n")
            last = block
            # Its writer waits on the pipe meanwhile, as on a slow terminal, rather than
            # have the host's CPU read all it throws away (160 MB a second of `yes`).
            await asyncio.sleep(_FLOOD_PAUSE_SECONDS)
        if not last.endswith(b"\n"):
            await _rest_of_line(stream)
            dropped += 1
        self._unsaid += dropped
        self.dropped += dropped
        if self._will_say is None:
            due = self._said_at + _SAY_EVERY_SECONDS - self._clock()
            self._will_say = asyncio.get_running_loop().call_later(max(due, 0.0), self.say)

    def say(self) -> None:
        """Say now how many lines went unlogged since it was last said, if any (the
        launch's end does, and a timer a second at most after they went)."""
        if self._will_say is not None:
            self._will_say.cancel()
            self._will_say = None
        if self._unsaid:
            self._say()

    def _until_a_line(self) -> float:
        """Seconds until one more line fits: 0 when one does."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def _say(self) -> None:
        now = self._clock()
        self._log.warning(
            "%s: %d lines of its output in %.1f s not logged, over its"
            " max_log_lines_per_second (%g)",
            self._describe,
            self._unsaid,
            now - self._since,
            self._rate,
        )
        self._unsaid = 0
        self._said_at = now

    def __repr__(self) -> str:
        return f"<OutputRate {self._rate:g}/s dropped={self.dropped}>"


async def _rest_of_line(stream: asyncio.StreamReader) -> None:
    """Read ``stream`` to the end of the line it is in (or its end), in bounded pieces."""
    while True:
        try:
            await stream.readuntil(b"\n")
            return
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError as overrun:
            await stream.readexactly(overrun.consumed)
