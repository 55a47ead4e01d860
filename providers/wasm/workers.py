"""The threads a wasm plugin's calls run on: a pool's own, and never joined at exit.

Not a ``ThreadPoolExecutor``: the interpreter joins every executor's threads when it
exits, and a module asleep in a host call (a WASI sleep, for as long as the module asks)
cannot be stopped, so one such call held up the dispatcher's close and then its process's
exit for as long as the module chose. These are daemon threads: ``close`` asks them to end
and waits a bounded time; one still in a host call is left to return on its own (what it
ran on is freed then, by the pool, if the event loop still runs; at exit, with the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Workers"]

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Workers:
    """Up to ``size`` daemon threads, started as calls need them."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``function(*args)`` on a worker thread; its outcome as a future of this loop.
        Cancelling the future does not stop the thread (nothing can): its outcome is
        then dropped. After ``close``, ``RuntimeError``: no thread would ever run it."""
        if self._closed:
            raise RuntimeError(f"the threads of {self._name} have ended")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put((loop, future, function, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            try:
                outcome: tuple[bool, Any] = (True, function(*args))
            except BaseException as error:  # handed to the caller, as an executor would
                outcome = (False, error)
            # RuntimeError: the loop is closed, and nobody waits for this outcome any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, outcome)
            with self._lock:
                self._idle += 1

    async def close(self, timeout: float) -> list[str]:
        """Ask every thread to end once its call is done, and wait ``timeout`` seconds at
        most; the names of the threads still running then (each in a call that does not
        return: left to end on its own)."""
        self._closed = True
        threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        for thread in threads:
            await asyncio.to_thread(thread.join, max(ends - loop.time(), 0.0))
        return [thread.name for thread in threads if thread.is_alive()]


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.cancelled():
        return
    succeeded, value = outcome
    if succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)
