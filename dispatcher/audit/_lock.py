"""The advisory lock every writer of an audit file holds while it appends.

A record's ``prev`` is the hash of the line before it *in the file*, so appending is a
read-modify-write: read the file's last line, seal after it, write. Two processes doing
that at once fork the chain. Every writer therefore holds an exclusive ``flock`` on the
file itself while it appends (``AuditLog``), and ``verify`` a shared one while it notes
how much of the file to read, so it never reads half a batch.

The lock is on the file (its inode), not on a sibling lock file: it guards exactly the
bytes whose chain it protects. A log renamed away (rotated) keeps its own lock and chain;
a process that opens the path afterwards writes, and locks, the new file.

What the lock does not cover:

* Writers that do not take it: a shell's ``>>``, an editor, ``logrotate``'s
  ``copytruncate`` (records written between its copy and its truncation are lost), a
  dispatcher of a version before this lock. The lock is advisory; the chain, not the
  lock, is what shows tampering.
* stdout and named pipes: there is no last line to read back, each process's chain starts
  at ``GENESIS``; give each writer its own pipe.
* NFS: Linux emulates ``flock`` there with a POSIX byte-range lock, which excludes other
  clients only with a working lock manager (NFSv4, or lockd for v3; not with
  ``local_lock=all``), and does not exclude two writers in one process (POSIX locks
  belong to the process). Keep audit logs on a local disk and ship them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

__all__ = ["holders", "lock", "unlock"]

#: How often a bounded wait for the lock tries again.
_POLL_SECONDS = 0.01


def lock(descriptor: int, *, shared: bool = False, wait: float | None = None) -> bool:
    """Take the lock on ``descriptor``'s file: blocking (``wait`` None), or trying for
    ``wait`` seconds at most; False if another process held it all that time."""
    operation = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if wait is None:
        fcntl.flock(descriptor, operation)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)


def unlock(descriptor: int) -> None:
    fcntl.flock(descriptor, fcntl.LOCK_UN)


def holders(descriptor: int) -> list[int]:
    """The ids of the processes holding a ``flock`` on ``descriptor``'s file, as far as
    ``/proc/locks`` tells (Linux; elsewhere, or unreadable: none)."""
    status = os.fstat(descriptor)
    device = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    found: list[int] = []
    with contextlib.suppress(OSError), open("/proc/locks", encoding="ascii") as table:
        for line in table:
            # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF" ("->" marks a waiter)
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                continue
            if fields[5] == device and fields[4].isdigit():
                found.append(int(fields[4]))
    return found
