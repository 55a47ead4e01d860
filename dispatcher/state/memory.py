"""The default backend: state in this process only.

Limits, breakers and caches keep their in-process objects (``dispatcher.policies``), so a
manifest without ``state`` runs exactly as fast as before. Idempotency records live in a
dict here: a key runs at most once within this process during its retention window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

from dispatcher.state.base import StateBackend
from dispatcher.state.idempotency_store import ANY_VERSION, Claim, Claimed, IdempotencyStore

__all__ = ["EVICTION_BATCH", "MAX_RECORDS", "MemoryIdempotency", "MemoryState"]

#: Records kept at most (a bound on memory that callers choosing keys cannot push past).
#: Past it, expired records go, then the oldest finished ones until ``EVICTION_BATCH``
#: records' room is free: one pass over the records per that many new keys. One pass per
#: new key, as before, made each call with a new key take 6.5 ms at 100,000 records
#: against 16 µs below the bound (``bench/bench_idempotency.py``).
MAX_RECORDS = 100_000
EVICTION_BATCH = MAX_RECORDS // 10


@dataclass(slots=True)
class _Record:
    fingerprint: str
    #: The version the call runs at (``IdempotencyStore.claim``): the route's own string,
    #: shared by its records.
    version: str
    token: str
    expires: float
    outcome: bytes | None = None
    #: Made when a duplicate first waits on this record. Most records are never waited on,
    #: and an ``asyncio.Event`` with its deque of waiters is ~0.9 KB of the ~1.1 KB a
    #: record took when every record had one.
    changed: asyncio.Event | None = None

    def tell(self) -> None:
        """Wake whoever waits on this record: it ended, was released, or expired."""
        if self.changed is not None:
            self.changed.set()


class MemoryIdempotency(IdempotencyStore):
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}
        #: How many records make the next claim evict.
        self._evict_at = MAX_RECORDS
        self._tokens = count(1)

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires <= now:
            del self._records[key]
            record.tell()
            return None
        return record

    async def claim(
        self,
        key: str,
        fingerprint: str,
        lease: float,
        deadline: float,
        *,
        version: str,
        other_versions: tuple[str, ...] = (),
    ) -> Claimed:
        now = self._clock()
        record = self._live(key, now)
        if record is None:
            if len(self._records) >= self._evict_at:
                self._evict(now)
            # A claim's token only tells this process's claims of one key apart: a count
            # does. os.urandom (a system call) took 0.6-0.8 µs of the 8.2-8.7 µs a key
            # added to a call (bench idempotency).
            token = str(next(self._tokens))
            self._records[key] = _Record(fingerprint, version, token, now + lease)
            return Claimed(Claim.RUN, token)
        if record.fingerprint != fingerprint:
            return Claimed(Claim.MISMATCH)
        if (
            record.version != version
            and record.version not in other_versions
            and ANY_VERSION not in other_versions
        ):
            return Claimed(Claim.MISMATCH, version=record.version)
        if record.outcome is not None:
            return Claimed(Claim.DONE, outcome=record.outcome)
        return Claimed(Claim.BUSY)

    async def complete(
        self, key: str, token: str, outcome: bytes, retention: float, deadline: float
    ) -> None:
        record = self._records.get(key)
        if record is None or record.token != token:
            return  # the lease ended and another call owns the key now
        # An outcome is ``encode_json``'s output, cut to its size (orjson's own comes in a
        # 4 KB buffer however short: 100,000 small results would hold 400 MB).
        record.outcome = outcome
        record.expires = self._clock() + retention
        record.tell()

    async def release(self, key: str, token: str, deadline: float) -> None:
        record = self._records.get(key)
        if record is not None and record.token == token:
            del self._records[key]
            record.tell()

    async def changed(self, key: str, timeout: float) -> None:
        record = self._records.get(key)
        if record is None or record.outcome is not None or timeout <= 0:
            return  # gone or finished already: the next claim sees it
        # Still running: whatever ends it from now on sets this event (no await between).
        if record.changed is None:
            record.changed = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await record.changed.wait()
        except TimeoutError:
            pass

    def _evict(self, now: float) -> None:
        """Expired records, then the oldest finished ones (dicts keep insertion order)
        until ``EVICTION_BATCH`` records' room is free; records still running stay."""
        records = self._records
        for key in [key for key, record in records.items() if record.expires <= now]:
            records.pop(key).tell()
        excess = len(records) - (MAX_RECORDS - EVICTION_BATCH)
        if excess > 0:
            finished = (key for key, record in records.items() if record.outcome is not None)
            for key in list(islice(finished, excess)):
                records.pop(key).tell()
        # Running records are not evicted: with that many, the next pass waits for a batch.
        self._evict_at = max(MAX_RECORDS, len(records) + EVICTION_BATCH)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"<MemoryIdempotency records={len(self._records)}>"


class MemoryState(StateBackend):
    shared = False

    def __init__(self, clock: Callable[[], float]) -> None:
        self._idempotency = MemoryIdempotency(clock)

    @property
    def idempotency(self) -> MemoryIdempotency:
        return self._idempotency

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory", "idempotency_records": len(self._idempotency)}

    def __repr__(self) -> str:
        return f"<MemoryState {self._idempotency!r}>"
