"""Durable async jobs: the job store (``JobStore``: a queue and a record per job), the
job view of a queue that keeps no records (``JobRecords``), and what both hand out. The
stores: ``redis_jobs``, ``redis_job_records``, ``sqs_jobs``; the workers that use them,
``dispatcher._jobs``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.state.callback_outbox import CallbackOutbox
from linchkit_plugin.errors import ProviderError

__all__ = [
    "JOB_STATES",
    "TERMINAL_STATES",
    "Delivery",
    "JobRecords",
    "JobStore",
    "unreadable_record",
]


#: A job's states; the last three are terminal.
JOB_STATES = ("queued", "running", "retrying", "succeeded", "failed", "dead")
TERMINAL_STATES = frozenset(("succeeded", "failed", "dead"))


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to a worker: the job it names, or ``None`` when the entry
    is malformed (``raw`` says what it held). A queue whose message carries the whole job
    (SQS) hands it over in ``carried``, with how often the queue delivered it in
    ``receives``; a stream entry names the job only (its record is in the store)."""

    entry_id: str
    job_id: str | None
    raw: str = ""
    carried: dict[str, str] | None = None
    receives: int = 0


class JobStore(ABC):
    """Durable jobs: a stream of job ids read by a consumer group, one record per job.

    An entry stays pending on the worker that took it until the job's terminal state (or
    its next attempt's schedule) is stored, in the same atomic step as its ack; a worker
    that dies leaves it pending, and ``take`` hands it to another after ``min_idle``.
    Every method raises ``StateUnavailable`` when the store cannot answer in time.
    """

    #: Where jobs' callbacks wait for delivery, recorded with their end; None: the store
    #: keeps none (callbacks are then sent once, best effort, by the worker that ended it).
    callbacks: CallbackOutbox | None = None

    async def open(self) -> None:  # noqa: B027 - a hook most stores need not fill
        """Open what a short command (``dispatcher jobs``, ``dlq``) needs to use the store
        without starting its backend (no listener, no workers): a queue's client. A
        started backend has opened it already."""

    @abstractmethod
    async def submit(self, job_id: str, record: dict[str, str]) -> None:
        """Store the job's record and append its entry, atomically."""

    @abstractmethod
    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (every worker may call it)."""

    @abstractmethod
    async def take(
        self, consumer: str, count: int, block: float, min_idle: float
    ) -> list[Delivery]:
        """Up to ``count`` entries for ``consumer``: first those left pending longer than
        ``min_idle`` seconds by a worker that stopped, then new ones (waiting ``block`` s)."""

    @abstractmethod
    async def begin(self, delivery: Delivery) -> dict[str, str] | None:
        """Count one more attempt of ``delivery.job_id`` and mark the job running; its
        record (attempts included), or ``None`` when there is none."""

    @abstractmethod
    async def finish(self, entry_id: str, job_id: str, fields: dict[str, str], ttl: float) -> None:
        """Store the terminal ``fields`` (``state`` among them), keep the record ``ttl``
        seconds (a dead one until purged), ack the entry, wake ``result`` waiters."""

    @abstractmethod
    async def retry_later(
        self, entry_id: str, job_id: str, fields: dict[str, str], delay: float
    ) -> None:
        """Store ``fields``, schedule the next attempt in ``delay`` s, ack the entry."""

    async def keep(self, consumer: str, entry_ids: Sequence[str]) -> int:
        """A live worker's heartbeat: ``consumer`` still works on these entries, so none
        of them counts as left by a stopped worker (``take``'s ``min_idle`` starts again).
        An entry already acked, or taken over by another consumer, is left as it is. The
        number of entries kept. By default nothing: a queue whose hold needs no renewal."""
        return 0

    @abstractmethod
    async def record(self, job_id: str) -> dict[str, str] | None:
        """The record of ``job_id``; None when there is none. A key no dispatcher wrote in
        its place (another type than a record) raises ``unreadable_record``'s error."""

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        """The record of ``job_id`` if ``caller`` submitted it (None: anonymously); None
        when there is none or another caller's. A store that can read the owner alone
        first overrides this, so another caller's record is never fetched whole. A key no
        dispatcher wrote raises as for ``record``, whoever asks: it is nobody's job, and
        its value is not read."""
        return _if_owned(await self.record(job_id), caller)

    async def kept(self, job_id: str) -> bool:
        """Whether the store still holds anything under ``job_id``'s record (whatever it
        holds: a key no dispatcher wrote is there too). A store that can tell without
        reading the record overrides this: a record may hold megabytes of result."""
        try:
            return await self.record(job_id) is not None
        except ProviderError:  # unreadable_record's: something is there
            return True

    @abstractmethod
    async def recent(self, limit: int) -> list[dict[str, str]]:
        """The latest submitted jobs still kept, newest first, as listing rows: what a
        list shows of each record, each value bounded, never the whole record
        (``_job_summaries``)."""

    @abstractmethod
    async def dead(self, limit: int) -> list[dict[str, str]]:
        """Dead-lettered jobs, newest first, as listing rows (``recent``)."""

    @abstractmethod
    async def redrive(self, job_id: str) -> bool:
        """Put a dead-lettered job back on the stream with its attempts reset, its error
        kept as ``previous_error`` (its ``error`` is only ever an attempt's since) and no
        ``finished_at``; False when it is not dead-lettered (or cannot run again: a
        malformed entry)."""

    @abstractmethod
    async def purge(self, job_ids: Sequence[str] | None = None) -> int:
        """Drop the dead-lettered jobs ``job_ids`` (every one when None); how many were
        dead-lettered and are gone. An id that is not dead-lettered is left alone."""

    @abstractmethod
    async def changed(self, key: str, timeout: float) -> None:
        """Return when job ``key`` may have ended, or after ``timeout`` seconds."""


class JobRecords(ABC):
    """The job view of a queue that cannot be read by job id (SQS): one record per job,
    the indexes ``dispatcher jobs`` and ``dlq list`` read, and the notification
    ``result`` waits on. Every method raises ``StateUnavailable`` when it cannot answer."""

    #: As ``JobStore.callbacks``: ``end`` records a pending callback in the same step.
    callbacks: CallbackOutbox | None = None

    @abstractmethod
    async def put(self, job_id: str, record: dict[str, str]) -> None:
        """Keep a submitted job's record (state ``queued``) and list it as recent."""

    @abstractmethod
    async def drop(self, job_id: str) -> None:
        """Forget a job whose message never reached the queue."""

    @abstractmethod
    async def begin(self, job_id: str, carried: dict[str, str]) -> dict[str, str]:
        """Count one more attempt, mark it running and return the record; a terminal record
        is returned untouched (a redelivered message whose delete was lost). A record gone
        (expired, a Redis that restarted empty) is made again from ``carried``."""

    @abstractmethod
    async def note(self, job_id: str, fields: dict[str, str]) -> None:
        """Store ``fields`` of a job that goes on (its next attempt scheduled)."""

    @abstractmethod
    async def end(self, job_id: str, fields: dict[str, str], ttl: float) -> None:
        """Store the terminal ``fields``; keep the record ``ttl`` seconds, or until purged
        when dead-lettered (listed as dead); wake ``result`` waiters."""

    @abstractmethod
    async def requeue(self, job_id: str) -> None:
        """A redriven job: queued again, attempts reset, no longer listed as dead; its
        error kept as ``previous_error``, as ``JobStore.redrive``."""

    @abstractmethod
    async def record(self, job_id: str) -> dict[str, str] | None: ...

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        """As ``JobStore.owned_record``."""
        return _if_owned(await self.record(job_id), caller)

    async def kept(self, job_id: str) -> bool:
        """As ``JobStore.kept``."""
        try:
            return await self.record(job_id) is not None
        except ProviderError:
            return True

    @abstractmethod
    async def recent(self, limit: int) -> list[dict[str, str]]:
        """Listing rows, as ``JobStore.recent``."""

    @abstractmethod
    async def dead(self, limit: int) -> list[dict[str, str]]:
        """Listing rows, as ``JobStore.dead``."""

    @abstractmethod
    async def purge_dead(self, job_ids: Sequence[str] | None = None) -> int:
        """Forget the records of the dead-lettered jobs ``job_ids`` (every one when None);
        how many."""

    @abstractmethod
    async def changed(self, key: str, timeout: float) -> None: ...


def unreadable_record(job_id: str, kind: str) -> ProviderError:
    """A job's key holding what no dispatcher writes (a ``kind`` other than a record): a
    corrupt entry, as the listing shows it (``record_type``) and the worker dead-letters
    it. Final: reading it again reads the same, so it is not ``StateUnavailable``, which
    told callers to retry a store that answered."""
    return ProviderError(
        f"job {job_id}: the state store holds a {kind} where its record belongs, not one a"
        " dispatcher wrote; it stays so until the key is deleted or the job purged",
        details={"stage": "jobs", "record_type": kind},
    )


def _if_owned(record: dict[str, str] | None, caller: str | None) -> dict[str, str] | None:
    """``record`` if ``caller`` submitted it: its ``caller`` field, absent for a job
    submitted anonymously, compared before anything else of it is looked at."""
    if record is None or record.get("caller") != caller:
        return None
    return record
