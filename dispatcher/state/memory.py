"""The default backend: state in this process only.

Limits, breakers and caches keep their in-process objects (``dispatcher.policies``), so a
manifest without ``state`` runs exactly as fast as before. Idempotency records live in a
dict here: a key runs at most once within this process during its retention window.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispatcher.state.base import Claim, Claimed, IdempotencyStore, StateBackend

__all__ = ["MemoryIdempotency", "MemoryState"]

#: Records kept at most; past it the oldest finished ones go first (a bound on memory
#: that callers choosing keys cannot push past).
MAX_RECORDS = 100_000


@dataclass(slots=True)
class _Record:
    fingerprint: str
    token: str
    expires: float
    outcome: bytes | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryIdempotency(IdempotencyStore):
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires <= now:
            del self._records[key]
            record.changed.set()
            return None
        return record

    async def claim(self, key: str, fingerprint: str, lease: float, deadline: float) -> Claimed:
        now = self._clock()
        record = self._live(key, now)
        if record is None:
            if len(self._records) >= MAX_RECORDS:
                self._evict(now)
            token = os.urandom(8).hex()
            self._records[key] = _Record(fingerprint, token, now + lease)
            return Claimed(Claim.RUN, token)
        if record.fingerprint != fingerprint:
            return Claimed(Claim.MISMATCH)
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
        record.changed.set()

    async def release(self, key: str, token: str, deadline: float) -> None:
        record = self._records.get(key)
        if record is not None and record.token == token:
            del self._records[key]
            record.changed.set()

    async def changed(self, key: str, timeout: float) -> None:
        record = self._records.get(key)
        if record is None or timeout <= 0:
            return
        try:
            async with asyncio.timeout(timeout):
                await record.changed.wait()
        except TimeoutError:
            pass

    def _evict(self, now: float) -> None:
        for key in [key for key, record in self._records.items() if record.expires <= now]:
            self._records.pop(key).changed.set()
        # Oldest first (dicts keep insertion order); records still running stay.
        finished = [key for key, record in self._records.items() if record.outcome is not None]
        for key in finished[: max(0, len(self._records) - MAX_RECORDS + 1)]:
            self._records.pop(key).changed.set()

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
