"""The job view on Redis of jobs queued elsewhere (SQS): ``RedisJobRecords``.

The same records and indexes as the Redis job store (``redis_jobs``), without its stream:
``d.job``, ``d.result`` and ``dispatcher jobs`` read jobs queued on SQS (``sqs_jobs``) the
same way when the manifest also names a ``state:`` Redis. A record gone when its job
starts (expired, a Redis restarted empty) is made again from what the message carried.
Every operation runs through the job store's bounded ``op``; no redis-py is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatcher.state._job_scripts import RECORD_BEGIN, REQUEUE
from dispatcher.state._redis_replies import now_ms, reply_fields
from dispatcher.state.job_store import JobRecords
from dispatcher.state.redis_jobs import RedisJobs

__all__ = ["RedisJobRecords"]


class RedisJobRecords(JobRecords):
    """The job view of a queue kept elsewhere (SQS), on the same keys as ``RedisJobs``:
    ``d.job``, ``d.result`` and ``dispatcher jobs`` read it the same way."""

    def __init__(self, jobs: RedisJobs, client: Any, channel: str) -> None:
        self._jobs = jobs
        self._client = client
        self._channel = channel
        self._begin = client.register_script(RECORD_BEGIN)
        self._requeue = client.register_script(REQUEUE)
        self.callbacks = jobs.callbacks

    async def put(self, job_id: str, record: dict[str, str]) -> None:
        jobs = self._jobs

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(jobs.record_key(job_id), mapping=record)
                pipe.zadd(jobs.recent_set, {job_id: int(record["submitted_at"])})
                pipe.zremrangebyrank(jobs.recent_set, 0, -(jobs.recent_kept + 1))
                await pipe.execute()

        await jobs.op("a job record", write)

    async def drop(self, job_id: str) -> None:
        jobs = self._jobs

        async def forget() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(jobs.record_key(job_id))
                pipe.zrem(jobs.recent_set, job_id)
                await pipe.execute()

        await jobs.op("a job record", forget)

    async def begin(self, job_id: str, carried: dict[str, str]) -> dict[str, str]:
        args: list[str] = [now_ms()]
        for name, value in carried.items():
            args += [name, value]
        key = self._jobs.record_key(job_id)
        answer = await self._jobs.op("a job's start", lambda: self._begin(keys=(key,), args=args))
        return reply_fields(answer)

    async def note(self, job_id: str, fields: dict[str, str]) -> None:
        key = self._jobs.record_key(job_id)
        await self._jobs.op("a job's next attempt", lambda: self._client.hset(key, mapping=fields))

    async def end(self, job_id: str, fields: dict[str, str], ttl: float) -> None:
        jobs, key = self._jobs, self._jobs.record_key(job_id)
        dead = fields.get("state") == "dead"

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                if dead:  # kept until redriven or purged
                    pipe.persist(key)
                    pipe.zadd(jobs.dead_set, {job_id: int(now_ms())})
                else:
                    pipe.pexpire(key, max(1, int(ttl * 1000)))
                if fields.get("callback") == "pending":  # due at once, with the end
                    pipe.zadd(jobs.callback_set, {job_id: 0})
                pipe.publish(self._channel, f"job {job_id}")
                await pipe.execute()

        await jobs.op("a job's outcome", write)

    async def requeue(self, job_id: str) -> None:
        jobs = self._jobs
        keys = (jobs.record_key(job_id), jobs.dead_set)
        await jobs.op("a redrive", lambda: self._requeue(keys=keys, args=(job_id, now_ms())))

    async def record(self, job_id: str) -> dict[str, str] | None:
        return await self._jobs.record(job_id)

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        return await self._jobs.owned_record(job_id, caller)

    async def kept(self, job_id: str) -> bool:
        return await self._jobs.kept(job_id)

    async def recent(self, limit: int) -> list[dict[str, str]]:
        return await self._jobs.recent(limit)

    async def dead(self, limit: int) -> list[dict[str, str]]:
        return await self._jobs.dead(limit)

    async def purge_dead(self, job_ids: Sequence[str] | None = None) -> int:
        return await self._jobs.purge(job_ids)

    async def changed(self, key: str, timeout: float) -> None:
        await self._jobs.changed(key, timeout)

    def __repr__(self) -> str:
        return f"<RedisJobRecords {self._jobs.stream}>"
