"""The threads a plugin's plain (not ``async``) methods run on: daemon threads.

``asyncio.to_thread`` runs a function on the loop's default executor, whose threads the
interpreter joins at exit, and which ``asyncio.run`` waits for as it ends: a method stuck
for good (a socket that never answers, a lock never released) kept the plugin's process
alive after its stop for as long as it stayed stuck, past the drain's cap and the hooks'
(the gRPC and WebSocket servers never exited; a supervisor had to kill them). Here the
threads are daemon threads and ``shutdown`` never waits for one still running: the stop
goes as far as the drain's cap, and the process exits with the method unfinished, as it
does with a stop hook it gave up on.

A pool like the default executor's (at most ``min(32, cpus + 4)`` threads, one started
only when none is idle), so a method costs what it cost under ``to_thread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["method_threads"]

T = TypeVar("T")

_Work = tuple["concurrent.futures.Future[Any]", Callable[[], Any]]


class DaemonThreads(concurrent.futures.Executor):
    """At most ``max_workers`` daemon threads taking work from one queue."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._max = max_workers
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot run a plugin method after the plugin stopped")
            self._work.put((future, functools.partial(fn, *args, **kwargs)))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            future, call = work
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as error:  # handed to the awaiting task
                    future.set_exception(error)
                else:
                    future.set_result(result)
            del work, future, call  # nothing of a finished call kept while idle
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work and let the idle threads end; never wait for a method still
        running (the module docstring says why)."""
        with self._lock:
            self._shut = True
            for _ in self._threads:
                self._work.put(None)


_threads: DaemonThreads | None = None
_threads_lock = threading.Lock()


def _pool() -> DaemonThreads:
    global _threads
    with _threads_lock:
        if _threads is None:
            _threads = DaemonThreads(min(32, (os.cpu_count() or 1) + 4), "plugin-method")
        return _threads


async def method_threads(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread``, on daemon threads: ``function(*args, **kwargs)`` with the
    caller's context variables, awaited."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args, **kwargs)
    return await loop.run_in_executor(_pool(), call)
