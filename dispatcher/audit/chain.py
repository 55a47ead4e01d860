"""The audit log's line format and its hash chain; ``verify`` checks a whole file.

Every record is one line of JSON, UTF-8, ending in ``\\n``:

    {"time":…,…,"prev":"<64 hex>","hash":"<64 hex>"}

* ``prev`` is the SHA-256 (hex) of the previous line's bytes, its ``\\n`` excluded; the
  first line of a log has ``prev`` = ``GENESIS`` (64 zeros). A record continues the chain
  from the file's last line when it is written, whichever process wrote that line
  (``log``: every writer appends under a lock).
* ``hash`` is the SHA-256 (hex) of the line's *body*: the same JSON object without the
  ``hash`` member, i.e. the line's bytes up to ``,"hash":`` followed by ``}``. It is always
  the last member, written exactly as above, so a verifier needs no JSON canonicalisation:
  it splits the line textually.

A changed byte breaks that line's ``hash`` (or, if the forger recomputed it, the next
line's ``prev``); a removed, inserted or reordered line breaks a ``prev``; a line cut
short breaks both or leaves the file without its final ``\\n``. What a chain alone cannot
show is lines removed from the *end* at a line boundary: compare the last ``hash`` with
one kept elsewhere: the log's *head*, the SHA-256 of its last line (what the next
record's ``prev`` will be). ``verify(…, head=…)`` and ``dispatcher audit verify --head``
check it; the dispatcher logs its head when it closes the log and reports it in
``stats()["audit"]["head"]``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from dispatcher.audit._lock import lock, unlock
from dispatcher.config.files import wait_for_writer

__all__ = [
    "GENESIS",
    "ChainReport",
    "check_chain",
    "line_hash",
    "line_problem",
    "seal",
    "seal_batch",
    "seal_body",
    "verify",
    "verify_lines",
]

GENESIS = "0" * 64
#: How long ``verify`` waits for a writer to finish its append before it reads anyway.
VERIFY_LOCK_SECONDS = 5.0
#: The longest line a log of ours holds: past it, a line is not a record.
MAX_LINE_BYTES = 1 << 20
_TOO_LONG = f"a line longer than {MAX_LINE_BYTES >> 20} MiB: not a record (is this an audit log?)"
#: How much of a log ``verify`` reads at a time.
VERIFY_BLOCK_BYTES = 1 << 20
#: How long ``verify`` waits for a pipe's writer to write (or end) before it gives up.
PIPE_WAIT_SECONDS = 10.0
_LINE = re.compile(rb'^(\{.*),"hash":"([0-9a-f]{64})"\}$', re.DOTALL)


def line_hash(line: bytes) -> str:
    """The ``prev`` of the line after ``line`` (``line`` without its ``\\n``)."""
    return hashlib.sha256(line).hexdigest()


def seal(record: dict[str, Any], prev: str) -> bytes:
    """``record`` as its line (without ``\\n``), chained after a line whose hash is ``prev``.

    ``record`` must not hold ``prev`` or ``hash``; it gets ``prev`` added (in place).
    """
    record["prev"] = prev
    body = orjson.dumps(record)
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


def seal_body(body: bytes, prev: str) -> bytes:
    """A record already written as JSON (``orjson.dumps``, without ``prev`` and ``hash``)
    as its line, chained after ``prev``: the same bytes as ``seal`` of that record.

    The writer serialises a record when its call ends (its params may change afterwards)
    and seals it only when it appends it, after the file's last line at that moment.
    """
    if body == b"{}":
        body = b'{"prev":"' + prev.encode() + b'"}'
    else:
        body = body[:-1] + b',"prev":"' + prev.encode() + b'"}'
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


def seal_batch(bodies: list[bytes], prev: str) -> tuple[bytes, str]:
    """``bodies`` sealed one after another from ``prev``, as the lines to write (each
    ending in ``\\n``), and the hash of the last: the head once they are written."""
    lines = []
    for body in bodies:
        line = seal_body(body, prev)
        prev = line_hash(line)
        lines.append(line)
    lines.append(b"")
    return b"\n".join(lines), prev


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What ``verify`` found: ``records`` read, the ``head`` (SHA-256 of the last line) and, if
    the chain is broken, the first bad line (1-based) and why."""

    records: int
    head: str | None
    bad_line: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.bad_line is None


def verify(path: str | Path, *, head: str | None = None) -> ChainReport:
    """Check the whole chain of the log at ``path``; with ``head``, also that it ends there.

    What dispatchers append while it reads is left out: it reads as much of the file as
    there was when it held the writers' lock (shared, for an instant), so a batch being
    written is not mistaken for a line cut short. A writer that holds the lock for longer
    than ``VERIFY_LOCK_SECONDS`` (blocked on a hung disk) is not waited for.

    The log is read a block at a time, so a log of any size is checked in the memory of
    one line. A pipe (``<(zcat audit.log.gz)``) is read to its end once its writer has
    written; a FIFO nobody writes to fails after ``PIPE_WAIT_SECONDS`` (``TimeoutError``).
    """
    # Not blocking: opening a FIFO would wait for a writer for ever.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(descriptor, "rb", buffering=0) as file:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):  # a pipe: all it brings, once its writer is there
            wait_for_writer(descriptor, PIPE_WAIT_SECONDS)
            os.set_blocking(descriptor, True)
            return check_chain(iter(partial(file.read, VERIFY_BLOCK_BYTES), b""), head=head)
        locked = lock(descriptor, shared=True, wait=VERIFY_LOCK_SECONDS)
        try:
            size = os.fstat(descriptor).st_size
        finally:
            if locked:
                unlock(descriptor)
        return check_chain(_blocks(file, size), head=head)


def _blocks(file: BinaryIO, size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``file``, a block at a time."""
    while size > 0:
        block = file.read(min(size, VERIFY_BLOCK_BYTES))
        if not block:
            return
        size -= len(block)
        yield block


def verify_lines(data: bytes, *, head: str | None = None) -> ChainReport:
    """``verify`` of a log's bytes already read."""
    return check_chain((data,), head=head)


def check_chain(blocks: Iterable[bytes], *, head: str | None = None) -> ChainReport:
    """The chain of the log whose bytes come in ``blocks``, split anywhere."""
    prev = GENESIS
    last_hash: str | None = None
    count = 0
    partial_line: list[bytes] = []  # the line the last block ended in, its pieces so far
    partial_size = 0
    for block in blocks:
        lines = block.split(b"\n")
        if partial_line:
            partial_line.append(lines[0])
            partial_size += len(lines[0])
            if partial_size > MAX_LINE_BYTES:  # /dev/zero: a line without end, held whole
                return ChainReport(count, last_hash, count + 1, _TOO_LONG)
            if len(lines) == 1:
                continue  # a line longer than a block: still no end
            lines[0] = b"".join(partial_line)
        partial_line = [lines.pop()]
        partial_size = len(partial_line[0])
        for line in lines:
            count += 1
            problem = line_problem(line, prev)
            if problem is not None:
                return ChainReport(count - 1, last_hash, count, problem)
            last_hash = prev = line_hash(line)
    if any(partial_line):
        return ChainReport(
            count, last_hash, count + 1, "incomplete last line (the file was cut short)"
        )
    if head is not None and last_hash != head:
        return ChainReport(
            count,
            last_hash,
            count,
            f"the log ends at hash {last_hash or 'none'}, not at the expected head {head}"
            " (records were removed from its end, or it is another log)",
        )
    return ChainReport(count, last_hash)


def line_problem(line: bytes, prev: str | None = None) -> str | None:
    """Why ``line`` is not a sealed record following ``prev`` (None: not checked), or None."""
    match = _LINE.match(line)
    if match is None:
        return "not a sealed record (no trailing hash member): changed, cut or forged"
    body = match.group(1) + b"}"
    if hashlib.sha256(body).hexdigest() != match.group(2).decode():
        return "its content does not match its hash: the record was changed"
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "not valid JSON"
    if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
        return "has no 'prev' member"
    if prev is not None and record["prev"] != prev:
        if record["prev"] == GENESIS:
            return "starts a new chain in the middle of the log: lines before it were replaced"
        return "does not follow the line before it: a line was removed, inserted or reordered"
    return None
