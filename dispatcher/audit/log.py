"""``AuditLog``: append sealed records (``chain``) to a file or stdout, in order.

**How records reach the file, and why.** A record is written as JSON on the event loop,
where the call ended (its params may change once the caller has its answer), and goes
through a queue to one writer thread: the chain's order is the order calls end. The
thread seals what has queued up after the file's last line and writes it in one
``write``. The thread is chosen not for the write's cost (~1.6 µs per record into the
page cache, measured on this project's 2-core machine, 2026-12) but for when the sink is
slow: a pipe to a log shipper that stops reading, or a full or slow disk, would stall the
loop — every call of the dispatcher — on a blocking ``write``; with the thread only the
log lags (``stats()["queued"]``). Under load one ``write`` carries many records.

**Several processes, one file.** A record's ``prev`` is the hash of the line before it
in the file, so each append reads, seals and writes under an exclusive ``flock`` on the
file (``_lock`` says what that lock does not cover): a gateway, a ``dispatcher call``
from an operator's shell and a second replica on the same host can all append to one
log, and it stays one chain. The writer re-reads the file's last line only when the
file's size is not what its own last append left (another process wrote since): alone
on its log it pays three system calls per batch (lock, ``fstat``, unlock), ~1 µs, and
per record nothing more than before. Sealing happens under the lock, so a record's
``prev`` is the line it really follows. ``head`` and ``records`` are what this process
has written: with several writers the file's head is whoever wrote last.

**When the sink stops taking records** (a log shipper that stops reading the pipe, a disk
that hangs or is full), the queue would grow by a record per call for as long as it
lasts, and every record would still be held when memory ran out. So the queue is bounded:
with ``max_backlog`` records queued, the log is *behind*, and the dispatcher refuses new
calls (``Overloaded``, retryable) rather than run calls it cannot record. A refused call
has no record of its own: the log counts them, and the first record written once it is no
longer behind is a sealed ``kind: "audit_backlog"`` record saying how many calls were
refused and since when, so the gap is in the chain, not missing from it.

**A file that refuses an append** (disk full, an I/O error) or whose end is not a sealed
record (a writer that died mid-``write``, a hand edit) is not appended to: what a failed
``write`` wrote of its batch is cut off again (under the lock), the batch waits, and the
thread tries again every ``_RETRY_SECONDS``, so records queue up and calls are refused
once ``max_backlog`` wait, as for a hung disk, and none is lost to a transient error.
Moving the damaged file aside fixes the second case while the dispatcher runs: at its next
attempt the writer opens a new log at the path. On stdout or a pipe, which cannot take
back half a batch, a failed ``write`` drops its batch; its reader sees the gap as a break.

``aclose`` flushes: it waits for the thread to write everything queued, for
``CLOSE_TIMEOUT_SECONDS`` at most (a sink that takes nothing must not hang shutdown; what
it did not take is reported as lost, and the writer thread, blocked in a write, ends when
that write does without writing the rest). A record is written only when its call has ended;
what is queued when the process is killed is lost (``kill -9`` loses at most what the
thread had not written yet; a crash mid-``write`` leaves an incomplete last line, which
``verify`` reports and ``open`` refuses to append to, so a damaged log is looked at
before it grows).

Nothing here knows what a call is: the dispatcher builds the record (``dispatcher._guard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import queue
import stat
import sys
import threading
import time
from typing import IO, Any

import orjson

from dispatcher.audit._lock import holders, lock, unlock
from dispatcher.audit.chain import (
    GENESIS,
    MAX_LINE_BYTES,
    line_hash,
    line_problem,
    seal_batch,
)

__all__ = [
    "CLOSE_TIMEOUT_SECONDS",
    "DEFAULT_MAX_BACKLOG",
    "OPEN_LOCK_SECONDS",
    "AuditLog",
    "AuditLogError",
    "timestamp",
]

log = logging.getLogger("dispatcher.audit")

#: How long the writer lets records gather before one write: bounds how far the file lags.
_GATHER_SECONDS = 0.005
#: How far back the writer looks for the last line at first; records are far shorter.
_TAIL_FIRST_BYTES = 8192
#: How far back it looks at most: a longer last line is not one of ours.
_TAIL_BYTES = MAX_LINE_BYTES
#: How long the writer waits before trying a refused append again.
_RETRY_SECONDS = 1.0
#: Records queued at most before calls are refused (``audit.max_backlog``): ~50 MB.
DEFAULT_MAX_BACKLOG = 100_000
#: How long ``aclose`` waits for the sink to take what is queued.
CLOSE_TIMEOUT_SECONDS = 10.0
#: How long ``open`` waits for another process's append to end (it takes microseconds;
#: a writer holding the lock this long is stuck on its disk).
OPEN_LOCK_SECONDS = 5.0


class AuditLogError(Exception):
    """The audit log cannot be opened or continued."""


class AuditLog:
    """One audit log: ``open``, ``write`` a record per call, ``aclose``."""

    def __init__(self, path: str | None, *, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        """``path``: a file to append to, or None for stdout; ``max_backlog``: records
        queued for it at most before the log is behind."""
        self.path = path
        self.max_backlog = max_backlog
        #: The SHA-256 of the last line this log wrote (of the file's last line, once
        #: opened): what ``verify --head`` checks, if no other process wrote after it.
        self.head = GENESIS
        #: Records written this run.
        self.records = 0
        #: Appends that failed (each attempt counts).
        self.write_errors = 0
        #: Calls refused while the log was behind: all of them, and those the next
        #: ``audit_backlog`` record will count (since ``_unrecorded_since``).
        self.refused = 0
        self._unrecorded = 0
        self._unrecorded_since = ""
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._sink: _FileSink | _StreamSink | None = None
        #: Set when ``aclose`` gave up on the sink: the writer stops at its next batch.
        self._abandoned = False
        #: Records of the batch the writer is trying again to append (a refused write).
        self._retrying = 0

    def open(self) -> None:
        """Open the sink and start the writer thread; a file's chain continues from its
        last line (its ``hash`` checked for that line only: ``verify`` does the rest).
        ``AuditLogError`` if that line is cut short or not sealed, or another process has
        held the file's lock for ``OPEN_LOCK_SECONDS``."""
        if self._thread is not None:
            raise AuditLogError("the audit log is already open")
        if self.path is None:
            sink: _FileSink | _StreamSink = _StreamSink(sys.stdout.buffer, owned=False)
        elif _is_fifo(self.path):
            sink = _StreamSink(_open_fifo(self.path), owned=True)
        else:
            sink = _FileSink.open(self.path)
        self._sink = sink
        self.head = sink.head
        self._thread = threading.Thread(target=self._write_queued, name="audit-log", daemon=True)
        self._thread.start()

    def behind(self) -> bool:
        """Whether ``max_backlog`` records wait for the sink: then calls are refused."""
        return self._queue.qsize() >= self.max_backlog

    def count_refused(self) -> None:
        """A call was refused because the log is behind: it gets no record of its own,
        and the next ``audit_backlog`` record counts it."""
        if not self._unrecorded:
            self._unrecorded_since = timestamp()
            log.error(
                "audit log %s: %d records wait for the sink; refusing calls until it takes them",
                self.name,
                self._queue.qsize(),
            )
        self._unrecorded += 1
        self.refused += 1

    def write(self, record: dict[str, Any]) -> None:
        """Queue ``record`` for the log, after every record written before (call from one
        thread: the event loop's). ``TypeError`` if it is not JSON."""
        if self._unrecorded and not self.behind():
            self._queue_unrecorded()
        self._queue.put(orjson.dumps(record))

    def _queue_unrecorded(self) -> None:
        """The record of the calls refused while the log was behind."""
        refused, self._unrecorded = self._unrecorded, 0
        log.warning("audit log %s: caught up; %d calls were refused meanwhile", self.name, refused)
        record = {
            "time": timestamp(),
            "kind": "audit_backlog",
            "refused": refused,
            "since": self._unrecorded_since,
            "max_backlog": self.max_backlog,
        }
        self._queue.put(orjson.dumps(record))

    async def aclose(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Write everything queued (``timeout`` seconds at most), stop the thread, close
        the file."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._unrecorded:
            self._queue_unrecorded()
        self._queue.put(None)
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():  # the sink took nothing for that long
            # The thread is blocked in a write (or waits to try one again): it ends when
            # that write does, dropping what is still queued and closing the file.
            self._abandoned = True
            log.error(
                "audit log %s: the sink took nothing for %g s; about %d records were not"
                " written (head of what was written: %s)",
                self.name,
                timeout,
                self._queue.qsize() + self._retrying,
                self.head,
            )
            self._sink = None
            return
        if self._sink is not None:
            self._sink.close()
        self._sink = None
        log.info(
            "audit log %s closed: %d records this run, head %s", self.name, self.records, self.head
        )

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.name,
            "records": self.records,
            "head": self.head,
            "queued": self._queue.qsize(),
            "max_backlog": self.max_backlog,
            "refused": self.refused,
            "write_errors": self.write_errors,
        }

    @property
    def name(self) -> str:
        return self.path if self.path is not None else "<stdout>"

    def _write_queued(self) -> None:
        sink = self._sink
        assert sink is not None
        while True:
            items = [self._queue.get()]
            if items[0] is not None:
                # Let records gather: waking this thread for every record costs the loop
                # a GIL hand-off each time (measured: ~6 µs per call, against ~1 µs).
                time.sleep(_GATHER_SECONDS)
            while True:  # everything queued meanwhile: one write for all of it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = items[-1] is None
            bodies = [item for item in items if item is not None]
            if bodies:
                self._append(sink, bodies)
            if self._abandoned:  # by ``aclose``: nobody else will close the sink
                sink.close()
                return
            if done:
                return

    def _append(self, sink: _FileSink | _StreamSink, bodies: list[bytes]) -> None:
        """Write ``bodies``; a file that refuses is tried again until it takes them (or
        ``aclose`` gives up on it)."""
        failures = 0
        while True:
            try:
                self.head = sink.append(bodies)
            except (OSError, ValueError, AuditLogError) as error:
                self.write_errors += 1
                failures += 1
                if isinstance(sink, _StreamSink):
                    self.head = sink.head  # the batch is lost: its reader sees a break
                    log.error("audit log %s: writing failed: %s", self.name, error)
                    return
                if failures == 1:
                    self._retrying = len(bodies)
                    log.error(
                        "audit log %s: cannot append (%s); its records wait, and calls are"
                        " refused once %d do; trying again every %g s",
                        self.name,
                        _reason(error),
                        self.max_backlog,
                        _RETRY_SECONDS,
                    )
                if self._abandoned:
                    return
                time.sleep(_RETRY_SECONDS)
                if self._abandoned:
                    return
                with contextlib.suppress(AuditLogError):
                    if sink.follow_path():
                        log.warning(
                            "audit log %s: the file there was moved aside or replaced;"
                            " appending to the one now at that path",
                            self.name,
                        )
                continue
            self.records += len(bodies)
            self._retrying = 0
            if failures:
                log.warning(
                    "audit log %s: appending again, after %d failed attempts", self.name, failures
                )
            return

    def __repr__(self) -> str:
        return f"<AuditLog {self.name} records={self.records} queued={self._queue.qsize()}>"


class _FileSink:
    """A regular file: every append is sealed after the file's last line, under its lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.descriptor = _open_file(path)
        #: The file's size after this process last read or wrote it; -1: not read yet.
        self.size = -1
        self.head = GENESIS

    @classmethod
    def open(cls, path: str) -> _FileSink:
        """The file at ``path``, its last line checked (under the lock: another writer's
        batch half written is not mistaken for a line cut short)."""
        sink = cls(path)
        try:
            try:
                locked = lock(sink.descriptor, wait=OPEN_LOCK_SECONDS)
            except OSError as error:  # ENOLCK: NFS without a lock manager
                raise AuditLogError(
                    f"cannot lock the audit log {path}: {error.strerror}; keep audit logs"
                    " on a local disk"
                ) from None
            if not locked:
                pids = holders(sink.descriptor)
                holder = f"process {', '.join(map(str, pids))}" if pids else "another process"
                raise AuditLogError(
                    f"the audit log {path} has been locked by {holder} for over"
                    f" {OPEN_LOCK_SECONDS:g} s: a dispatcher appending to it is stuck"
                    " (a hung disk?); only one process appends at a time"
                )
            try:
                sink._catch_up()
            finally:
                unlock(sink.descriptor)
        except BaseException:
            os.close(sink.descriptor)
            raise
        return sink

    def append(self, bodies: list[bytes]) -> str:
        """Seal ``bodies`` after the file's last line and write them; the new head."""
        descriptor = self.descriptor
        lock(descriptor)
        try:
            self._catch_up()
            data, head = seal_batch(bodies, self.head)
            try:
                _write_all(descriptor, data)
            except OSError:
                # Nothing of the batch stays: no line cut short, and the next attempt
                # seals it again after the same last line.
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, self.size)
                raise
            self.size += len(data)
            self.head = head
            return head
        finally:
            unlock(descriptor)

    def _catch_up(self) -> None:
        """Continue from the file's real last line: read it again when the file is not
        the size this process left it (another process appended, or it was truncated)."""
        size = os.fstat(self.descriptor).st_size
        if size != self.size:
            self.head = _last_line_hash(self.descriptor, size, self.path)
            self.size = size

    def follow_path(self) -> bool:
        """Append to the file now at the path if it is not the one open (the damaged log
        was moved aside): True if so."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        except OSError:
            return False
        if current is not None and os.path.samestat(current, os.fstat(self.descriptor)):
            return False
        descriptor = _open_file(self.path)
        os.close(self.descriptor)
        self.descriptor, self.size = descriptor, -1
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.descriptor)


class _StreamSink:
    """stdout or a named pipe: nothing to read back or lock, its chain starts at
    ``GENESIS`` (its reader keeps the log)."""

    def __init__(self, file: IO[bytes], *, owned: bool) -> None:
        self.file = file
        self.owned = owned
        self.head = GENESIS

    def append(self, bodies: list[bytes]) -> str:
        # The head moves whether or not the write succeeds: a lost batch shows as a break.
        data, self.head = seal_batch(bodies, self.head)
        self.file.write(data)
        self.file.flush()
        return self.head

    def close(self) -> None:
        if self.owned:
            with contextlib.suppress(OSError, ValueError):
                self.file.close()


def _open_file(path: str) -> int:
    # Read and write: the writer reads the last line through the descriptor it appends
    # to, so both are the same file however the path changes.
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as error:
        raise AuditLogError(f"cannot open the audit log {path}: {error.strerror}") from None


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _open_fifo(path: str) -> IO[bytes]:
    """A named pipe a log shipper reads, opened for writing without waiting for it.

    A pipe has no last line to continue from: its chain starts at ``GENESIS``, as on
    stdout (the reader keeps the log). Reading its tail, as for a file, waited for a
    writer that would never come, and a plain open for writing waits for a reader: either
    hung ``start``. Opened non-blocking, it fails at once when nobody reads it; then it
    blocks again, so a reader that stops only holds up the writer thread."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        reason = "no process reads it" if error.errno == errno.ENXIO else error.strerror
        raise AuditLogError(f"cannot open the audit log {path} (a named pipe): {reason}") from None
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "wb")


def timestamp() -> str:
    """Now, as every record's ``time`` is written (UTC, microseconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _last_line_hash(descriptor: int, size: int, path: str) -> str:
    """The ``prev`` of the next record of the log open as ``descriptor``, ``size`` bytes
    long: GENESIS for an empty one. Reads the last few KB, more only for a longer line."""
    if size == 0:
        return GENESIS
    want = _TAIL_FIRST_BYTES
    while True:
        start = max(0, size - want)
        try:
            tail = os.pread(descriptor, size - start, start)
        except OSError as error:
            raise AuditLogError(f"cannot read the audit log {path}: {error.strerror}") from None
        if not tail.endswith(b"\n"):
            raise AuditLogError(
                f"the audit log {path} ends with an incomplete line; run 'dispatcher audit"
                f" verify {path}' and move it aside before the dispatcher appends to it"
            )
        if start == 0 or b"\n" in tail[:-1] or want >= _TAIL_BYTES:
            break
        want = _TAIL_BYTES
    last = tail[:-1].rpartition(b"\n")[2]
    problem = line_problem(last)  # the line on its own: sealed and well formed?
    if problem is not None:
        raise AuditLogError(
            f"the last line of the audit log {path} is not a sealed record ({problem});"
            " verify it and move it aside before the dispatcher appends to it"
        )
    return line_hash(last)
