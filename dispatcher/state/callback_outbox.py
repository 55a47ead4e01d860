"""Where the callbacks of ended jobs wait for delivery (``CallbackOutbox``), durable and
at least once; the job stores record a pending one with the job's end (``job_store``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["CALLBACK_STATES", "CallbackOutbox", "PendingCallback"]


#: Where a job's callback stands (the record's ``callback`` field): waiting to be delivered
#: (or tried again), delivered (a 2xx), or given up (dead-lettered: the retry budget spent,
#: or an answer that will not change).
CALLBACK_STATES = ("pending", "delivered", "failed")


@dataclass(frozen=True, slots=True)
class PendingCallback:
    """A callback a worker claimed: the job's record as it is now, which attempt this is
    (from 1), and the claim's ``token``: only its holder may settle it."""

    job_id: str
    token: str
    attempt: int
    record: dict[str, str]


class CallbackOutbox(ABC):
    """Callbacks of ended jobs, waiting for delivery (durable, at least once).

    A job's terminal write records its pending callback in the same atomic step (the job
    store's ``finish``, or the job view's ``end``, given ``callback: pending`` among the
    fields), so a worker that dies after it loses nothing. Any replica's worker ``claim``s
    due ones for ``lease`` seconds (a claimer that dies lets them fall due again after it),
    makes one delivery attempt, then settles the claim: ``delivered``, ``retry`` after a
    delay, or ``give_up`` (dead-lettered: the record says ``callback: failed`` and why).
    A settle by a claim that has since lapsed and been taken by another is ignored. Every
    method raises ``StateUnavailable`` when the store cannot answer.
    """

    @abstractmethod
    async def claim(self, count: int, lease: float) -> list[PendingCallback]:
        """Up to ``count`` callbacks now due, each counted one more attempt."""

    @abstractmethod
    async def delivered(self, callback: PendingCallback) -> bool: ...

    @abstractmethod
    async def retry(self, callback: PendingCallback, delay: float, reason: str) -> bool: ...

    @abstractmethod
    async def give_up(self, callback: PendingCallback, reason: str) -> bool: ...
