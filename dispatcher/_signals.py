"""``Dispatcher.drain_on_signal``: on a signal, drain for a grace period, then close, once.

For hosts whose process a supervisor (Kubernetes, systemd) stops with a signal. The
handlers are loop signal handlers (Unix, main thread); ``forget`` removes them when the
dispatcher closes, so none outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["SignalDrain"]

log = logging.getLogger("dispatcher")


class SignalDrain:
    """Runs ``close(grace)`` on the first of the signals it was installed for."""

    def __init__(self, close: Callable[[float], Awaitable[None]]) -> None:
        self._close = close
        self._signals: list[int] = []
        #: The task closing the dispatcher after a signal, once one came.
        self.task: asyncio.Task[None] | None = None

    def install(self, grace: float, signals: Iterable[int]) -> None:
        loop = asyncio.get_running_loop()
        for number in signals:
            loop.add_signal_handler(number, self._on_signal, number, grace)
            self._signals.append(number)

    def forget(self) -> None:
        """Remove the handlers (the dispatcher is closing)."""
        if not self._signals:
            return
        loop = asyncio.get_running_loop()
        while self._signals:
            loop.remove_signal_handler(self._signals.pop())

    def _on_signal(self, number: int, grace: float) -> None:
        if self.task is not None:
            return  # already draining for an earlier signal
        log.warning("%s: draining for %g s, then closing", signal.Signals(number).name, grace)
        self.task = asyncio.get_running_loop().create_task(self._close_after_signal(grace))

    async def _close_after_signal(self, grace: float) -> None:
        try:
            await self._close(grace)
        except Exception:
            log.exception("closing the dispatcher after a signal failed")
