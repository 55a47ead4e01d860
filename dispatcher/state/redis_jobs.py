"""Durable async jobs on Redis Streams: the ``JobStore`` of the Redis backend.

Keys (under the backend's ``key_prefix``)::

    {prefix}:jobs            stream of entries ``{job: <id>}``, consumer group "workers"
    {prefix}:job:<id>        hash: the job's record (what to call, state, attempts, outcome)
    {prefix}:jobs:delayed    sorted set: jobs waiting for their next attempt (due time, ms)
    {prefix}:jobs:dead       sorted set: dead-lettered jobs (when, ms)
    {prefix}:jobs:recent     sorted set: submitted jobs (when, ms), trimmed to ``recent``
    {prefix}:jobs:callbacks  sorted set: ended jobs whose callback waits (due time, ms)

An entry is acked, and deleted, in the same atomic step that stores the job's terminal
state or schedules its next attempt: a worker killed at any point leaves the entry pending,
and another worker claims it (XAUTOCLAIM) once it has been idle for the visibility timeout.
A live worker renews its hold while its jobs run (``keep``: XCLAIM to itself, JUSTID), so
a job that runs longer than the visibility timeout is not taken by another worker too.
So a job runs at least once per attempt it is owed; its idempotency key, if it has one,
keeps a re-delivered job from running again once an earlier run's outcome is recorded.

A job's callback is recorded by the same step that stores its end (``callback: pending``
among the fields adds it to the callbacks set, due at once), so a worker killed before it
delivered loses nothing: ``RedisCallbacks`` hands it to any replica's worker (a claim is a
lease, the record counts ``callback_attempts``), which settles it delivered, due again
later, or failed (``redis_callbacks``).

``RedisJobRecords`` (``redis_job_records``) is the same records and indexes without the
stream: the job view of jobs queued on SQS (``sqs_jobs``) when the manifest also names a
``state:`` Redis. Each step is one Lua script (``_job_scripts``).

Runs every operation through the backend's bounded ``run`` (its timeout, its skip after
a failure, its translation of redis-py errors into ``StateUnavailable``); it imports no
redis-py itself (``redis_connection`` is the only module that does).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from dispatcher.state._job_scripts import (
    BEGIN,
    ENSURE_GROUP,
    FINISH,
    KEEP,
    LIST,
    OWNED_RECORD,
    PROMOTE,
    PURGE_SOME,
    REDRIVE,
    RETRY,
    SUBMIT,
)
from dispatcher.state._job_summaries import (
    ERRORS,
    LISTED,
    MAX_ERROR_BYTES,
    MAX_FIELD_BYTES,
    MAX_TYPE_CHARS,
    MAX_TYPED_ERROR_BYTES,
    SIZED,
    ErrorBudget,
)
from dispatcher.state._redis_replies import now_ms, reply_fields, reply_text
from dispatcher.state.callback_outbox import CallbackOutbox
from dispatcher.state.job_store import Delivery, JobStore, unreadable_record
from dispatcher.state.redis_callbacks import RedisCallbacks
from dispatcher.state.redis_connection import LateRead, Run

__all__ = ["LateRead", "RedisJobs"]

T = TypeVar("T")


GROUP = "workers"

#: How late Redis ends a blocking read: it looks for expired ones on its timer, ``hz``
#: times a second (10 by default), so ``BLOCK 100`` answers after 100-200 ms (201 ms
#: median measured). A worker's read blocks for at most half of what is left of the
#: operation's bound after that, so an idle queue answers in time (50 ms with the 200 ms
#: default bound: one read every 50-150 ms per worker while there is nothing to do).
REDIS_TIMER_SECONDS = 0.1

#: Job ids a listing reads per round trip (each one bounded operation).
LIST_PAGE = 500


class RedisJobs(JobStore):
    def __init__(
        self,
        client: Any,
        run: Run,
        prefix: str,
        channel: str,
        op_timeout: float,
        clock: Callable[[], float],
        changed: Callable[[str, float], Awaitable[None]],
        recent: int = 100_000,
    ) -> None:
        self._client = client
        self._run = run
        self._prefix = prefix
        self._channel = channel
        self._op_timeout = op_timeout
        self._clock = clock
        self._changed = changed
        self.recent_kept = recent
        self.stream = f"{prefix}:jobs"
        self.delayed = f"{prefix}:jobs:delayed"
        self.dead_set = f"{prefix}:jobs:dead"
        self.recent_set = f"{prefix}:jobs:recent"
        self.callback_set = f"{prefix}:jobs:callbacks"
        self._submit = client.register_script(SUBMIT)
        self._ensure = client.register_script(ENSURE_GROUP)
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)
        self._retry = client.register_script(RETRY)
        self._promote = client.register_script(PROMOTE)
        self._keep = client.register_script(KEEP)
        self._redrive = client.register_script(REDRIVE)
        self._purge = client.register_script(PURGE_SOME)
        self._owned = client.register_script(OWNED_RECORD)
        self._list = client.register_script(LIST)
        self.callbacks: CallbackOutbox | None = RedisCallbacks(
            client, self.op, self.callback_set, self.record_key("")
        )

    def record_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def _deadline(self, extra: float = 0.0) -> float:
        # Twice the bound: the operation gets the backend's whole op_timeout (a shorter
        # budget would be taken for the caller's deadline, not for Redis being slow).
        return self._clock() + 2 * self._op_timeout + extra

    async def op(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation under the backend's bounds; ``what`` names it in the
        error a caller sees. The job view (``redis_job_records``) and the callbacks
        outbox run theirs through it too."""
        result: T = await self._run(what, self._deadline(), operation)
        return result

    async def submit(self, job_id: str, record: dict[str, str]) -> None:
        args: list[str | int] = [job_id, int(record["submitted_at"]), self.recent_kept]
        for name, value in record.items():
            args += [name, value]
        keys = (self.record_key(job_id), self.stream, self.recent_set)
        # One script, not a MULTI of four commands: a third of the client's CPU per job.
        await self.op("a job submission", lambda: self._submit(keys=keys, args=args))

    async def ensure_group(self) -> None:
        await self.op(
            "the job stream's group", lambda: self._ensure(keys=(self.stream,), args=(GROUP,))
        )

    async def take(
        self, consumer: str, count: int, block: float, min_idle: float
    ) -> list[Delivery]:
        await self.op(
            "due job retries",
            lambda: self._promote(keys=(self.delayed, self.stream), args=(count * 4,)),
        )
        claimed = await self.op(
            "jobs of a stopped worker",
            lambda: self._client.xautoclaim(
                self.stream, GROUP, consumer, int(min_idle * 1000), "0-0", count=count
            ),
        )
        entries = list(claimed[1]) if claimed and len(claimed) > 1 else []
        if not entries:
            block_ms = max(1, int(min(block, (self._op_timeout - REDIS_TIMER_SECONDS) / 2) * 1000))
            try:
                answer = await self._run(
                    "new jobs",
                    self._deadline(),
                    lambda: self._client.xreadgroup(
                        GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms
                    ),
                    blocking=True,
                )
            except LateRead:
                # Nothing read this time. Entries Redis handed over as the read gave up
                # are this consumer's pending ones: taken back after ``min_idle``, not lost.
                return []
            for _stream, stream_entries in answer or ():
                entries.extend(stream_entries)
        return [self._delivery(entry) for entry in entries]

    @staticmethod
    def _delivery(entry: Any) -> Delivery:
        entry_id, fields = reply_text(entry[0]), entry[1]
        decoded = reply_fields(fields) if fields else {}
        job_id = decoded.get("job")
        if job_id and len(decoded) == 1 and len(job_id) <= 64 and job_id.isprintable():
            return Delivery(entry_id, job_id)
        return Delivery(entry_id, None, repr(decoded)[:500])

    async def begin(self, delivery: Delivery) -> dict[str, str] | None:
        job_id = delivery.job_id or ""
        answer = await self.op(
            "a job's start",
            lambda: self._begin(keys=(self.record_key(job_id),), args=(now_ms(),)),
        )
        return reply_fields(answer) if answer else None

    async def finish(self, entry_id: str, job_id: str, fields: dict[str, str], ttl: float) -> None:
        dead = fields.get("state") == "dead"
        fields = {"id": job_id, **fields}  # a malformed entry's record has nothing else
        args: list[str | int] = [
            GROUP,
            entry_id,
            job_id,
            1 if dead else 0,  # a dead one is kept until redriven or purged
            max(1, int(ttl * 1000)),
            int(now_ms()),
            self._channel,
            1 if fields.get("callback") == "pending" else 0,
        ]
        for name, value in fields.items():
            args += [name, value]
        keys = (self.record_key(job_id), self.dead_set, self.stream, self.callback_set)
        await self.op("a job's outcome", lambda: self._finish(keys=keys, args=args))

    async def retry_later(
        self, entry_id: str, job_id: str, fields: dict[str, str], delay: float
    ) -> None:
        args: list[str] = [GROUP, entry_id, str(max(0, int(delay * 1000))), job_id]
        for name, value in fields.items():
            args += [name, value]
        keys = (self.record_key(job_id), self.delayed, self.stream)
        await self.op("a job's next attempt", lambda: self._retry(keys=keys, args=args))

    async def keep(self, consumer: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        args = [GROUP, consumer, *entry_ids]
        kept = await self.op(
            "a worker's hold on its jobs",
            lambda: self._keep(keys=(self.stream,), args=args),
        )
        return int(kept)

    async def record(self, job_id: str) -> dict[str, str] | None:
        return await self._record(job_id, ("2", ""))

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        return await self._record(job_id, ("0", "") if caller is None else ("1", caller))

    async def kept(self, job_id: str) -> bool:
        key = self.record_key(job_id)
        found = await self.op("a job record", lambda: self._client.exists(key))
        return bool(found)

    async def _record(self, job_id: str, args: tuple[str, str]) -> dict[str, str] | None:
        keys = (self.record_key(job_id),)
        answer = await self.op("a job record", lambda: self._owned(keys=keys, args=args))
        if isinstance(answer, (bytes, str)):
            raise unreadable_record(job_id, reply_text(answer))
        return reply_fields(answer) if answer else None

    async def _records(self, index: str, limit: int) -> list[dict[str, str]]:
        """The rows of the ``limit`` newest jobs of ``index`` (``_job_summaries``), a page
        per round trip."""
        budget = ErrorBudget()
        rows: dict[str, dict[str, str]] = {}
        for start in range(0, limit, LIST_PAGE):
            stop = min(limit, start + LIST_PAGE) - 1
            args = [
                self.record_key(""),
                start,
                stop,
                MAX_FIELD_BYTES,
                MAX_ERROR_BYTES,
                budget.left,
                MAX_TYPED_ERROR_BYTES,
                MAX_TYPE_CHARS,
                *LISTED,
                "",
                *ERRORS,
                "",
                *SIZED,
            ]
            reply = await self.op(
                "job records", functools.partial(self._list, keys=(index,), args=args)
            )
            budget.left = int(reply[0])
            for row in reply[1:]:
                if row:  # a job submitted meanwhile moves the ranks on: listed once
                    fields = reply_fields(row[1:])
                    rows.setdefault(reply_text(row[0]), fields)
            if len(reply) - 1 < stop - start + 1:
                break
        return [{"id": job_id, **fields} for job_id, fields in rows.items()]

    async def recent(self, limit: int) -> list[dict[str, str]]:
        return await self._records(self.recent_set, limit)

    async def dead(self, limit: int) -> list[dict[str, str]]:
        return await self._records(self.dead_set, limit)

    async def redrive(self, job_id: str) -> bool:
        keys = (self.record_key(job_id), self.dead_set, self.stream)
        answer = await self.op(
            "a redrive", lambda: self._redrive(keys=keys, args=(job_id, now_ms()))
        )
        return bool(answer)

    async def purge(self, job_ids: Sequence[str] | None = None) -> int:
        if job_ids is not None:
            return await self._purge_some(list(dict.fromkeys(job_ids)))

        async def drop() -> int:
            ids = await self._client.zrange(self.dead_set, 0, -1)
            dropped = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                async with self._client.pipeline(transaction=True) as pipe:
                    # ZREM of what was read, not DEL: a job dead-lettered meanwhile stays.
                    pipe.zrem(self.dead_set, *chunk)
                    pipe.delete(*(self.record_key(reply_text(job_id)) for job_id in chunk))
                    removed, _ = await pipe.execute()
                dropped += int(removed)
            return dropped

        dropped: int = await self._run("a dead-letter purge", self._deadline(5.0), drop)
        return dropped

    async def _purge_some(self, job_ids: list[str]) -> int:
        dropped = 0
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            keys = [self.dead_set, *(self.record_key(job_id) for job_id in chunk)]
            answer = await self.op(
                "a dead-letter purge", functools.partial(self._purge, keys=keys, args=chunk)
            )
            dropped += int(answer)
        return dropped

    async def changed(self, key: str, timeout: float) -> None:
        await self._changed(f"job:{key}", timeout)

    def __repr__(self) -> str:
        return f"<RedisJobs {self.stream}>"
