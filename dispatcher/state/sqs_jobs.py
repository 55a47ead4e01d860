"""Durable async jobs on Amazon SQS: the ``JobStore`` of ``jobs: {backend: sqs}``.

The queue carries the whole job: one message per job, its body the job's submitted record
as ASCII JSON (SQS refuses some Unicode code points; escaped, every one is safe), so a
worker needs nothing but the queue to run it. What SQS does, and what is ours:

* **delivery**: ReceiveMessage, long polling ``receive_wait_seconds``; the message stays
  invisible for the jobs' ``visibility_timeout_ms`` while it runs. A worker killed
  mid-job never deletes it: it becomes visible again and another worker takes it.
* **attempts**: counted by the job view when there is one, as on Redis (one more before each
  run, so a job that kills its worker each time is dead-lettered too; a receive whose start
  could not be recorded ran nothing and does not count). Without a view, SQS's
  ``ApproximateReceiveCount``, which also counts such receives.
* **retries**: ChangeMessageVisibility by the backoff (capped at SQS's 12 hours): the same
  message comes back when it is due, counted once more.
* **dead letters**: sent by the worker to the configured dead-letter queue, then deleted,
  not left to a redrive policy. A redrive policy moves a message on its Nth receive, before
  any worker sees it: the job's last error and its ``dead`` state would never be written,
  and a malformed message would wait out N visibility timeouts first. (A redrive policy
  with ``maxReceiveCount`` above ``max_attempts`` is a fine backstop; it never fires first.)
* **the job view** (``d.job``, ``d.result``, ``dispatcher jobs``): SQS cannot be read by
  job id, so the records live on the ``state:`` Redis when the manifest names one (the same
  keys as Redis jobs, ``RedisJobRecords``). Without it, jobs still run and dead-letter, but
  ``job``/``result``/``recent`` raise ``JobsUnavailable`` saying so, rather than answer
  "not found" for a job that exists; ``dead`` then reads the dead-letter queue itself.

**Callbacks** are durable with a job view (recorded by its ``end``, in the same MULTI as
the job's terminal state, before the message is deleted: ``redis_callbacks.RedisCallbacks``);
without one there is no store to keep a pending callback in, so the worker that ended the
job sends it once, best effort, in its own process.

A job runs at least once per attempt it is owed: a worker that dies after the call and
before the delete leaves the message to run again. With a job view, a message whose job
already ended is only deleted; an idempotency key (on a shared ``state:`` Redis) keeps a
keyed job from running twice even without one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dispatcher.config import JobsConfig, SqsJobsConfig
from dispatcher.state._job_summaries import ErrorBudget, summary
from dispatcher.state.base import StateBackend
from dispatcher.state.errors import JobsUnavailable, JobTooLarge, StateUnavailable
from dispatcher.state.idempotency_store import IdempotencyStore
from dispatcher.state.job_store import TERMINAL_STATES, Delivery, JobRecords, JobStore
from dispatcher.state.shared_store import SharedStore
from dispatcher.state.sqs_queue import RECEIVE_MAX, Message, SqsQueue

__all__ = ["SqsJobs", "SqsJobsState"]

log = logging.getLogger("dispatcher.jobs")

#: Fields a dead-lettered message gains; a redrive takes them off again.
_DEAD_FIELDS = ("state", "error", "finished_at", "attempts", "started_at", "dead_reason")
#: What a message must carry to be a job.
_REQUIRED = ("id", "plugin", "version", "method", "params")
#: How long a scan of the dead-letter queue hides what it read (put back when it ends).
_SCAN_VISIBILITY = 30
#: Receives a redrive or purge makes of the dead-letter queue at most (10 messages each).
_SCAN_ROUNDS = 1_000


#: What a scan of the dead-letter queue does with one message: (its queue's URL, the
#: message, the job it carries or None) → True when it dealt with it.
DeadHandler = Callable[[str, Message, dict[str, str] | None], Awaitable[bool]]


@dataclass(slots=True)
class _Held:
    """A received message a worker has not deleted or rescheduled yet."""

    receipt: str
    body: str
    record: dict[str, str] | None
    taken_at: float
    ended: bool = False  # its job had ended already: a redelivery whose delete was lost


def encode_body(record: dict[str, str]) -> str:
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def decode_body(body: str) -> dict[str, str] | None:
    """The job a message carries, or ``None`` when it is not one of ours."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict) or not all(
        isinstance(value, str) for value in document.values()
    ):
        return None
    job_id = document.get("id", "")
    if not (0 < len(job_id) <= 64 and job_id.isprintable()):
        return None
    if any(field not in document for field in _REQUIRED):
        return None
    return document


class SqsJobs(JobStore):
    def __init__(
        self,
        config: JobsConfig,
        records: JobRecords | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.sqs is not None
        self.sqs: SqsJobsConfig = config.sqs
        self.queue = SqsQueue(config.sqs)
        self.records = records
        # Callbacks are durable where the job view is: recorded by its ``end``, which runs
        # before the message is deleted (a worker dying between them loses nothing).
        self.callbacks = records.callbacks if records is not None else None
        self._clock = clock
        self.visibility = max(1, int(config.visibility_timeout_ms / 1000 + 0.999))
        self._url = config.sqs.queue_url
        self._dead_url = config.sqs.dead_letter_queue_url
        self._held: dict[str, _Held] = {}
        self.sent = 0
        self.dead_lettered = 0

    async def start(self) -> None:
        await self.queue.open()

    async def open(self) -> None:
        await self.queue.open()

    async def aclose(self) -> None:
        await self.queue.aclose()

    # -- the queues ----------------------------------------------------------------------

    async def _urls(self) -> tuple[str, str]:
        if self._url is None:
            assert self.sqs.queue_name is not None
            self._url = await self.queue.url_of(self.sqs.queue_name)
        if self._dead_url is None:
            assert self.sqs.dead_letter_queue_name is not None
            self._dead_url = await self.queue.url_of(self.sqs.dead_letter_queue_name)
        return self._url, self._dead_url

    def _view(self, what: str) -> JobRecords:
        if self.records is None:
            raise JobsUnavailable(
                f"{what} needs a job view: SQS cannot be read by job id, so job records live "
                "on the state store; set 'state: {backend: redis, url: …}' in the manifest"
            )
        return self.records

    # -- submit --------------------------------------------------------------------------

    async def submit(self, job_id: str, record: dict[str, str]) -> None:
        body = encode_body(record)
        size = len(body)  # ASCII: characters are bytes
        if size > self.sqs.max_message_bytes:
            raise JobTooLarge(
                f"job of {record.get('plugin')}.{record.get('method')} is {size} bytes as an "
                f"SQS message, over the {self.sqs.max_message_bytes}-byte limit: pass a "
                "reference (an object-store key) instead of the data",
                details={"size": size, "limit": self.sqs.max_message_bytes},
            )
        url, _ = await self._urls()
        if self.records is not None:
            await self.records.put(job_id, record)  # first: job() answers once submit returns
        try:
            await self.queue.send(url, body, group=job_id, dedup=job_id)
        except StateUnavailable:
            if self.records is not None:
                try:
                    await self.records.drop(job_id)
                except StateUnavailable:
                    log.warning("job %s was not queued; its record stays 'queued'", job_id)
            raise
        self.sent += 1

    # -- workers -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        await self._urls()

    async def take(
        self, consumer: str, count: int, block: float, min_idle: float
    ) -> list[Delivery]:
        # block and min_idle are SQS's: receive_wait_seconds, the visibility timeout.
        url, _ = await self._urls()
        self._forget_stale()
        messages = await self.queue.receive(
            url, count, self.sqs.receive_wait_seconds, self.visibility
        )
        return [self._delivery(message) for message in messages]

    def _delivery(self, message: Message) -> Delivery:
        record = decode_body(message.body)
        self._held[message.message_id] = _Held(message.receipt, message.body, record, self._clock())
        if record is None:
            return Delivery(message.message_id, None, message.body[:500])
        return Delivery(message.message_id, record["id"], "", record, message.receives)

    def _forget_stale(self) -> None:
        # A worker that lost a message to a failure never finishes it: its receipt is
        # useless once the message is visible again.
        horizon = self._clock() - 2 * self.visibility
        for message_id in [k for k, held in self._held.items() if held.taken_at < horizon]:
            del self._held[message_id]

    async def begin(self, delivery: Delivery) -> dict[str, str] | None:
        carried = delivery.carried
        if carried is None or delivery.job_id is None:
            return None
        if self.records is None:  # SQS's count is the only one there is
            return {**carried, "state": "running", "attempts": str(max(1, delivery.receives))}
        # The view counts: a receive whose begin failed (the view's Redis down) ran nothing
        # and must not bring the job closer to its dead letter, as SQS's count would.
        record = {**carried, **await self.records.begin(delivery.job_id, carried)}
        held = self._held.get(delivery.entry_id)
        if held is not None and record.get("state") in TERMINAL_STATES:
            held.ended = True  # finish only deletes: no second dead letter, no new record
        return record

    async def finish(self, entry_id: str, job_id: str, fields: dict[str, str], ttl: float) -> None:
        held = self._held.get(entry_id)
        if held is None:
            log.warning("job message %s: no receipt left to delete it with", entry_id)
            return
        url, dead_url = await self._urls()
        if not held.ended:
            if fields.get("state") == "dead":
                await self._dead_letter(dead_url, entry_id, held, fields)
            if self.records is not None and held.record is not None:
                await self.records.end(job_id, fields, ttl)
        await self.queue.delete(url, held.receipt)
        self._held.pop(entry_id, None)

    async def _dead_letter(
        self, dead_url: str, message_id: str, held: _Held, fields: dict[str, str]
    ) -> None:
        # A message that is not ours is kept as it came, for whoever sent it to look at.
        body = held.body if held.record is None else encode_body({**held.record, **fields})
        group = "malformed" if held.record is None else held.record["id"]
        # Deduplicated by the message it was: the same message dead-lettered twice (its
        # delete lost) is one dead letter on a FIFO queue.
        await self.queue.send(dead_url, body, group=group, dedup=f"{message_id}.dead")
        self.dead_lettered += 1

    async def keep(self, consumer: str, entry_ids: Sequence[str]) -> int:
        # The messages this worker still holds stay invisible another visibility timeout
        # (ChangeMessageVisibility), and their receipts are not forgotten as stale.
        held = [(entry, self._held[entry]) for entry in entry_ids if entry in self._held]
        if not held:
            return 0
        url, _ = await self._urls()
        now = self._clock()
        await asyncio.gather(*(self.queue.hide(url, h.receipt, self.visibility) for _, h in held))
        for _, each in held:
            each.taken_at = now
        return len(held)

    async def retry_later(
        self, entry_id: str, job_id: str, fields: dict[str, str], delay: float
    ) -> None:
        held = self._held.get(entry_id)
        if held is None:
            return
        url, _ = await self._urls()
        if self.records is not None:
            await self.records.note(job_id, fields)
        await self.queue.hide(url, held.receipt, delay)
        self._held.pop(entry_id, None)

    # -- the job view --------------------------------------------------------------------

    async def record(self, job_id: str) -> dict[str, str] | None:
        return await self._view(f"job {job_id!r:.80}'s status").record(job_id)

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        view = self._view(f"job {job_id!r:.80}'s status")
        return await view.owned_record(job_id, caller)

    async def kept(self, job_id: str) -> bool:
        # Without a job view no record is kept to be gone: the id is all there is of a
        # job, and reading it says why not (JobsUnavailable).
        return True if self.records is None else await self.records.kept(job_id)

    async def recent(self, limit: int) -> list[dict[str, str]]:
        return await self._view("listing jobs").recent(limit)

    async def dead(self, limit: int) -> list[dict[str, str]]:
        if self.records is not None:
            return await self.records.dead(limit)
        return await self._peek_dead(limit)

    async def changed(self, key: str, timeout: float) -> None:
        if self.records is not None:
            await self.records.changed(key, timeout)
        else:
            await asyncio.sleep(timeout)

    # -- the dead-letter queue -----------------------------------------------------------

    async def _scan_dead(self, handle: DeadHandler) -> int:
        """Read the dead-letter queue once through. ``handle`` deals with each message at
        once (while its receipt is fresh) and says so, or leaves it (False): those are put
        back when the scan ends. How many were dealt with."""
        _, dead_url = await self._urls()
        seen: set[str] = set()
        put_back: list[str] = []
        handled = 0
        try:
            for _ in range(_SCAN_ROUNDS):
                batch = await self.queue.receive(dead_url, RECEIVE_MAX, 0, _SCAN_VISIBILITY)
                fresh = [m for m in batch if m.message_id not in seen]
                if not fresh:
                    break
                for message in fresh:
                    seen.add(message.message_id)
                    if await handle(dead_url, message, decode_body(message.body)):
                        handled += 1
                    else:
                        put_back.append(message.receipt)
        finally:
            for receipt in put_back:
                try:
                    await self.queue.hide(dead_url, receipt, 0)
                except StateUnavailable:
                    break  # visible again after _SCAN_VISIBILITY anyway
        return handled

    async def _peek_dead(self, limit: int) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []
        budget = ErrorBudget()

        async def note(_: str, message: Message, record: dict[str, str] | None) -> bool:
            if len(found) < limit:
                raw = {"id": f"message-{message.message_id}", "raw": message.body[:500]}
                row = summary(record["id"], record, budget) if record else None
                found.append(row or {**raw, "state": "dead"})
            return False

        await self._scan_dead(note)
        return found

    async def redrive(self, job_id: str) -> bool:
        url, _ = await self._urls()
        redriven = False

        async def send_back(dead_url: str, message: Message, record: dict[str, str] | None) -> bool:
            nonlocal redriven
            if redriven or record is None or record["id"] != job_id:
                return False
            again = {k: v for k, v in record.items() if k not in _DEAD_FIELDS}
            again.update(state="queued", attempts="0")
            if "error" in record:  # as the job view's requeue: see _job_scripts._QUEUE_AGAIN
                again["previous_error"] = record["error"]
            if self.records is not None:
                await self.records.requeue(job_id)
            # A new message: SQS counts its receives from one again, so attempts restart.
            await self.queue.send(
                url, encode_body(again), group=job_id, dedup=f"{message.message_id}.redrive"
            )
            await self.queue.delete(dead_url, message.receipt)
            redriven = True
            return True

        await self._scan_dead(send_back)
        return redriven

    async def purge(self, job_ids: Sequence[str] | None = None) -> int:
        wanted = None if job_ids is None else set(job_ids)

        async def drop(dead_url: str, message: Message, record: dict[str, str] | None) -> bool:
            if wanted is not None and (record is None or record.get("id") not in wanted):
                return False  # another job's (or unreadable): put back when the scan ends
            await self.queue.delete(dead_url, message.receipt)
            return True

        dropped = await self._scan_dead(drop)
        if self.records is not None:
            await self.records.purge_dead(job_ids)
        return dropped

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "sqs",
            "sent": self.sent,
            "dead_lettered": self.dead_lettered,
            "held": len(self._held),
            "requests": self.queue.requests,
            "failures": self.queue.failures,
        }

    def __repr__(self) -> str:
        return f"<SqsJobs {self.queue.where} held={len(self._held)} sent={self.sent}>"


class SqsJobsState(StateBackend):
    """A state backend whose async jobs queue on SQS: everything else (limits, breakers,
    caches, idempotency, the job view) is the wrapped backend's."""

    def __init__(self, inner: StateBackend, jobs: SqsJobs) -> None:
        self.inner = inner
        self._jobs = jobs
        self.shared = inner.shared
        self.fail_open = inner.fail_open

    @property
    def idempotency(self) -> IdempotencyStore:
        return self.inner.idempotency

    @property
    def local_idempotency(self) -> IdempotencyStore:
        return self.inner.local_idempotency

    @property
    def store(self) -> SharedStore | None:
        return self.inner.store

    @property
    def jobs(self) -> SqsJobs:
        return self._jobs

    @property
    def job_records(self) -> JobRecords | None:
        return self.inner.job_records

    def fell_back(self, what: str, error: StateUnavailable) -> None:
        self.inner.fell_back(what, error)

    async def start(self) -> None:
        await self.inner.start()
        try:
            await self._jobs.start()
        except BaseException:
            await self.inner.aclose()
            raise

    async def aclose(self) -> None:
        try:
            await self._jobs.aclose()
        finally:
            await self.inner.aclose()

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "jobs": self._jobs.stats()}

    def __repr__(self) -> str:
        return f"<SqsJobsState {self._jobs!r} over {self.inner!r}>"
