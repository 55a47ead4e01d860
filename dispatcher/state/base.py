"""The seam between the policies and where their state lives.

Two kinds of backend (``StateBackend``):

* ``memory`` (``dispatcher.state.memory``): this process only. The rate limits, breakers
  and caches keep using their in-process objects exactly as before (no step is added and
  none is slower); only idempotency records need a store of their own here.
* ``redis`` (``dispatcher.state.redis_store``): shared by every replica naming the same
  Redis and key prefix. It implements ``SharedStore``: what a shared limiter, breaker and
  cache need, each one atomic server-side operation.

Errors, as a tree::

    DispatchError (linchkit_plugin.errors)
    ├── TargetUnavailable (type "target_unavailable", retryable)
    │   └── StateUnavailable  the store (or the job queue) did not answer within its bound
    ├── InvalidParams
    │   └── JobTooLarge       a job that does not fit in one queue message (SQS)
    └── JobsUnavailable       no durable job store, or no job view, is configured

With ``on_unavailable: fail_open`` a step that gets ``StateUnavailable`` falls back to this
replica's own state instead; the backend counts and logs it (``stats()``).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Self

import orjson

from linchkit_plugin.errors import (
    DispatchError,
    InvalidParams,
    ProviderError,
    TargetUnavailable,
    error_from_wire,
)
from linchkit_plugin.wire import encode_json
from providers.base import ResultTooLarge

__all__ = [
    "ANY_VERSION",
    "CALLBACK_STATES",
    "JOB_STATES",
    "TERMINAL_STATES",
    "Admission",
    "BreakerPolicyArgs",
    "BreakerView",
    "CallbackOutbox",
    "Claim",
    "Claimed",
    "Delivery",
    "IdempotencyStore",
    "JobRecords",
    "JobStore",
    "JobTooLarge",
    "JobsUnavailable",
    "PendingCallback",
    "SharedStore",
    "StateBackend",
    "StateUnavailable",
    "decode_outcome",
    "digest",
    "encode_error",
    "encode_result",
    "encode_too_large",
    "unreadable_record",
]


class StateUnavailable(TargetUnavailable):
    """The shared state store did not answer within its bound, and the manifest says
    ``fail_closed``. Retryable: the store may be back in a moment."""


class JobsUnavailable(DispatchError):
    """No durable store for async jobs (the memory backend), or no job view (SQS without
    a ``state:`` Redis keeps no records to read)."""

    type = "jobs_unavailable"


class JobTooLarge(InvalidParams):
    """A job's message is larger than its queue takes (SQS: 256 KiB unless the queue says
    more); refused at submit, never sent."""


def digest(*parts: bytes | str) -> str:
    """A short, stable, printable digest: keys never carry a caller's raw text or a URL."""
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return hasher.hexdigest()


# -- rate limits ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """A shared limit's answer: admitted (after sleeping ``wait`` seconds, a slot reserved
    for this call) or refused (room again in ``wait`` seconds)."""

    admitted: bool
    wait: float


# -- breakers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerPolicyArgs:
    """A breaker's settings as the store needs them."""

    fail_max: int
    reset_timeout: float
    half_open_max_calls: int
    success_threshold: int


@dataclass(frozen=True, slots=True)
class BreakerView:
    """A shared breaker as one operation left it. ``generation`` grows with every
    transition of the shared state: of two views, the one with the lower generation is
    older, whichever arrived last (0: a breaker stored without one, or never stored)."""

    state: str  # "closed", "open", "half-open" (BreakerState's values)
    failures: int
    admitted: bool = True
    probe: bool = False
    retry_after: float = 0.0
    generation: int = 0


# -- idempotency ------------------------------------------------------------------------


class Claim(Enum):
    RUN = "run"  # this call owns the key: run it, then complete or release
    DONE = "done"  # an earlier call finished: its outcome is in ``Claimed.outcome``
    BUSY = "busy"  # another call owns the key and runs now: wait, then claim again
    MISMATCH = "mismatch"  # the key was used with other params, or at another version


@dataclass(frozen=True, slots=True)
class Claimed:
    claim: Claim
    token: str = ""
    outcome: bytes | None = None
    #: ``MISMATCH`` for the version alone (the params' fingerprint is the same): the version
    #: the record is at, for a call that named a range to tell whether the range takes it.
    version: str | None = None


def encode_result(result: Any) -> bytes:
    return encode_json({"ok": True, "result": result})


def encode_error(error: DispatchError) -> bytes:
    return encode_json({"ok": False, "error": error.to_wire()})


def encode_too_large(size: int, limit: int) -> bytes:
    """What a store records of an outcome of ``size`` bytes, over the ``limit`` it keeps:
    that the call ran, and its size. Neither a result nor an error a plugin could give."""
    return encode_json({"ok": False, "too_large": size, "limit": limit})


def decode_outcome(outcome: bytes, what: str = "a stored outcome") -> Any:
    """The stored result, or raise the stored error (a fresh exception per caller).

    An outcome recorded by its size only (``encode_too_large``) raises ``ResultTooLarge``.
    One no dispatcher wrote (not a JSON object: another writer's, or corrupted) raises
    ``ProviderError``. Both name ``what``: the call the record stands for may have run,
    and what it returned is not there, so it is not run again under the same record."""
    try:
        document = orjson.loads(outcome)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise ProviderError(
            f"{what} in the state store is not one a dispatcher wrote (not a JSON object);"
            " the call it records may have run, so it does not run again: a new request"
            " needs a new key",
            details={"stage": "state"},
        )
    if "too_large" in document:
        size, limit = document.get("too_large"), document.get("limit")
        raise ResultTooLarge(
            f"{what}: the call ran, and its result, {size} bytes, is over the {limit} bytes a"
            " shared record keeps; it does not run again: a new request needs a new key",
            details={"stage": "state", "bytes": size, "limit": limit},
        )
    if document.get("ok"):
        return document.get("result")
    raise error_from_wire(document.get("error"))


#: In ``other_versions`` of a claim: a record at any version answers it (the call named
#: none). Never a version: a manifest's versions are semantic versions.
ANY_VERSION = "*"


class IdempotencyStore(ABC):
    """Records of calls made with an idempotency key: who runs it, and what it returned."""

    @abstractmethod
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
        """Own ``key`` for ``lease`` seconds (a crashed owner's claim ends then), or say
        why not. ``fingerprint`` stands for the request's params and ``version`` for the
        version it runs at, kept beside it in the record: a record with another
        fingerprint, or at another version than ``version`` and ``other_versions``, is
        ``MISMATCH`` (``ANY_VERSION`` among them: at any version, only the fingerprint
        counts), the record's version in ``Claimed.version`` when the fingerprint is the
        same. ``deadline`` (the loop's clock) bounds the operation."""

    @abstractmethod
    async def complete(
        self, key: str, token: str, outcome: bytes, retention: float, deadline: float
    ) -> None:
        """Keep ``outcome`` for ``retention`` seconds and wake the calls waiting for it.
        ``deadline`` may be ``math.inf``: the backend's own operation timeout bounds it."""

    @abstractmethod
    async def release(self, key: str, token: str, deadline: float) -> None:
        """Give the key up without an outcome (the call never ran, or may run again);
        ``deadline`` as for ``complete``."""

    @abstractmethod
    async def changed(self, key: str, timeout: float) -> None:
        """Return when ``key`` may have changed, or after ``timeout`` seconds."""


# -- async jobs --------------------------------------------------------------------------

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


# -- the backends -----------------------------------------------------------------------


class SharedStore(ABC):
    """What shared limits, breakers and caches need; every method one atomic operation,
    bounded by ``deadline`` (the loop's clock) and the backend's own operation timeout,
    raising ``StateUnavailable`` when it cannot answer in time."""

    @abstractmethod
    async def acquire(
        self,
        key: str,
        rate: float,
        burst: int,
        max_wait: float,
        deadline: float,
        *,
        longest_wait: float,
    ) -> Admission:
        """One call against the limit ``key``: ``rate``/s, ``burst`` at once. With
        ``max_wait`` > 0 a call may reserve a slot up to that far ahead. ``longest_wait``:
        the longest any call of this limit may be granted (0 when none waits), so how far
        ahead its state may legitimately be; anything further is read as that far."""

    @abstractmethod
    async def breaker_admit(
        self, key: str, policy: BreakerPolicyArgs, deadline: float
    ) -> BreakerView: ...

    @abstractmethod
    async def breaker_record(
        self, key: str, policy: BreakerPolicyArgs, outcome: str, probe: bool, deadline: float
    ) -> BreakerView:
        """``outcome``: ``success``, ``failure`` or ``nothing`` (only frees a probe slot)."""

    @abstractmethod
    def breaker_view(self, key: str) -> tuple[BreakerView, float] | None:
        """The last view of ``key`` this replica saw and when (the loop's clock), unless a
        transition pushed by another replica made it stale."""

    @abstractmethod
    def breaker_watch(self, key: str, seen: Callable[[str, int, int], None]) -> None:
        """Call ``seen(state, failures, generation)`` whenever this replica learns where
        the breaker ``key`` stands: from the answer of one of its operations, and from a
        read of it made when another replica's transition is pushed, when notifications
        (re)connect (what was pushed meanwhile is lost) and when the watch begins. These
        answers may be told in another order than the store gave them (several are in
        flight at once): ``generation`` (``BreakerView``'s) says which is newer. For what
        this replica shows of the breaker (metrics, logs), never for admitting calls."""

    @abstractmethod
    async def cache_get(self, name: str, key: str, deadline: float) -> tuple[bytes | None, int]:
        """The cached value of ``key`` in the cache ``name`` and the cache's generation."""

    @abstractmethod
    async def cache_set(
        self, name: str, key: str, value: bytes, ttl: float, generation: int, deadline: float
    ) -> None:
        """Store unless the cache was invalidated since ``generation`` was read."""

    @abstractmethod
    async def cache_invalidate(self, names: list[str], deadline: float) -> None:
        """Drop every entry of the caches ``names``, for every replica at once."""

    @abstractmethod
    def spawn(self, work: Awaitable[Any], what: str) -> None:
        """Run ``work`` (one bounded operation) without a caller waiting for it; the
        backend owns the task and waits for it when it closes."""


class StateBackend(ABC):
    """Where one dispatcher's policies keep their state. Started and closed by the
    dispatcher (``start``/``aclose``, or ``async with``)."""

    #: True when the state is shared with other replicas (limits, breakers, caches).
    shared: bool = False
    #: What a step does when the store cannot answer: fall back to local state (True)
    #: or raise ``StateUnavailable``.
    fail_open: bool = True

    @property
    @abstractmethod
    def idempotency(self) -> IdempotencyStore: ...

    @property
    def local_idempotency(self) -> IdempotencyStore:
        """Where idempotency records go while a shared store cannot answer (fail_open)."""
        return self.idempotency

    @property
    def store(self) -> SharedStore | None:
        """The shared operations, when ``shared``."""
        return None

    @property
    def jobs(self) -> JobStore | None:
        """Durable async jobs, on a backend that has them (Redis)."""
        return None

    @property
    def job_records(self) -> JobRecords | None:
        """Where a job queue that keeps no records (SQS) keeps its job view (Redis)."""
        return None

    def fell_back(self, what: str, error: StateUnavailable) -> None:
        """A step used local state because the store could not answer (fail_open).
        The memory backend never falls back: nothing to count."""
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory"}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
