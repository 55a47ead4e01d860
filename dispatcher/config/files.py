"""Reading a file a user named without hanging on it.

A path on a command line or in a manifest can name something that is not a file: a FIFO,
whose plain ``open`` waits for a writer for ever (``mkfifo`` and nobody writing), a
terminal, a device. A manifest handed over through a pipe is legitimate, though:
``dispatcher validate <(envsubst < plugins.yaml)`` names ``/dev/fd/63``, a pipe whose
writer is already there. So a pipe or a device is opened without blocking and read as its
writer brings the bytes, for a bounded time; or, where only a file makes sense (a file
read again on every reload), refused.

Failures are ``OSError`` whose ``strerror`` says what is wrong, as the ones ``open`` and
``read`` raise: callers report all of them alike.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time

from linchkit_plugin._setting_files import file_kind

__all__ = ["read_capped", "wait_for_writer"]


def read_capped(path: str | os.PathLike[str], most: int, *, pipe_wait: float | None) -> bytes:
    """The bytes of ``path``, at most ``most + 1`` of them (so a caller can tell "too large").

    A regular file is read as usual. A pipe or a character device is read until its end of
    file for ``pipe_wait`` seconds at most (``TimeoutError`` after that: a FIFO nobody
    writes to, a writer that stalls); with ``pipe_wait`` None it is refused.
    """
    # Not blocking: a FIFO's open would wait for a writer. Reads of a regular file ignore it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISREG(mode):
            return _read_file(descriptor, most + 1)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if pipe_wait is None or not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(mode)})")
        return _read_pipe(descriptor, most + 1, pipe_wait)
    finally:
        os.close(descriptor)


def _read_file(descriptor: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(descriptor, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_pipe(descriptor: int, limit: int, wait: float) -> bytes:
    """Bytes as they come until end of file. Readiness first, always: a FIFO opened with no
    writer reads as an empty end of file at once, but is not ready until one has written
    or come and gone."""
    deadline = time.monotonic() + wait
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"a pipe or device that brought no end of file within {wait:g} s"
                " (a FIFO nobody writes to?)",
            )
        try:
            chunk = os.read(descriptor, min(left, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def wait_for_writer(descriptor: int, wait: float) -> None:
    """Until the pipe open (without blocking) on ``descriptor`` has something to read, or
    its end: ``TimeoutError`` after ``wait`` seconds (a FIFO nobody writes to)."""
    poller = select.poll()
    poller.register(descriptor, select.POLLIN)
    if not poller.poll(wait * 1000):
        raise TimeoutError(
            errno.ETIMEDOUT, f"a pipe nobody wrote to within {wait:g} s (a FIFO without a writer?)"
        )
