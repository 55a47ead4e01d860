"""Telling a plugin's author that a method answered long after its deadline.

A call's deadline ends an async method by a timer on the event loop; a method that blocks
the loop (``time.sleep``, a blocking client, a long computation in an ``async def``) keeps
that timer from running, and its answer comes whenever it is done. The caller stopped
waiting at the deadline (a remote host answered it ``deadline_exceeded``); every other call
of the process, and its health checks, waited too. Nothing else would say so: the host
sees timeouts, the plugin a call that succeeded. A method that catches the cancellation and
goes on is the same story told by the timer that did run.

The answer itself is left as it is (the host ignores a late one; an in-process host gets
its result), and the warning is said at most once a minute per method: a method that
always blocks must not fill the log.
"""

from __future__ import annotations

import logging
import time

__all__ = ["LATE_ANSWER_SECONDS", "LateAnswers"]

log = logging.getLogger("dispatcher.plugin")

#: How far past its deadline an answer must come to be told of. A timer on a loaded
#: machine runs some milliseconds late; half a second late, the loop was held.
LATE_ANSWER_SECONDS = 0.5
#: The least time between two warnings about one method.
_SAID_EVERY_SECONDS = 60.0


class LateAnswers:
    """When each method was last said to have answered late (a host holds one)."""

    __slots__ = ("_said",)

    def __init__(self) -> None:
        self._said: dict[str, float] = {}

    def tell(self, method: str, late: float, *, cancelled: bool) -> None:
        """``method`` answered ``late`` seconds after its deadline; ``cancelled``: the
        deadline's timer ran and cancelled it, and the method went on regardless."""
        now = time.monotonic()
        said = self._said.get(method)
        if said is not None and now - said < _SAID_EVERY_SECONDS:
            return
        self._said[method] = now
        if cancelled:
            log.warning(
                "method %r answered %.1f s after its deadline: it caught the cancellation"
                " the deadline sent (asyncio.CancelledError) and went on, and its caller had"
                " stopped waiting; let the cancellation end it (said at most once a minute)",
                method,
                late,
            )
            return
        log.warning(
            "method %r answered %.1f s after its deadline: the event loop was held that long,"
            " by this method or another running meanwhile, so the deadline could not end it"
            " and no other call ran; an async method must not block (run blocking work with"
            " `await asyncio.to_thread(...)`, or make the method a plain `def`, which runs in"
            " a worker thread) (said at most once a minute)",
            method,
            late,
        )
