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

``RedisJobRecords`` is the same records and indexes without the stream: the job view of
jobs queued on SQS (``sqs_jobs``) when the manifest also names a ``state:`` Redis.

Runs every operation through the backend's bounded ``run`` (its timeout, its skip after
a failure, its translation of redis-py errors into ``StateUnavailable``); it imports no
redis-py itself (``redis_store`` is the only module that does).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

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
from dispatcher.state.base import (
    CallbackOutbox,
    Delivery,
    JobRecords,
    JobStore,
    StateUnavailable,
    unreadable_record,
)
from dispatcher.state.redis_callbacks import RedisCallbacks

__all__ = ["LateRead", "RedisJobRecords", "RedisJobs"]

T = TypeVar("T")


class LateRead(StateUnavailable):
    """A blocking read (a worker's wait for new jobs) that did not come back in time: most
    of its time is Redis waiting as asked, so it says nothing of Redis; nothing was read."""


class Run(Protocol):
    """The backend's bounded operation (``RedisState._run``)."""

    def __call__(
        self,
        what: str,
        deadline: float,
        operation: Callable[[], Awaitable[Any]],
        *,
        blocking: bool = False,
    ) -> Awaitable[Any]: ...


GROUP = "workers"

#: How late Redis ends a blocking read: it looks for expired ones on its timer, ``hz``
#: times a second (10 by default), so ``BLOCK 100`` answers after 100-200 ms (201 ms
#: median measured). A worker's read blocks for at most half of what is left of the
#: operation's bound after that, so an idle queue answers in time (50 ms with the 200 ms
#: default bound: one read every 50-150 ms per worker while there is nothing to do).
REDIS_TIMER_SECONDS = 0.1

# A job's record for its owner only: the caller field (absent: submitted anonymously,
# ARGV[1] '0') is compared here, so another caller's record never leaves Redis; ARGV[1]
# '2': anyone's. A key of another type is no dispatcher's record: its type is answered
# (a corrupt entry, as a listing's row says), never its value. Its WRONGTYPE was told as
# the store failing, retryable, for a key that reads the same each time.
_OWNED_RECORD = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' then
  if kind == 'none' then return false end
  return kind
end
local caller = redis.call('HGET', KEYS[1], 'caller')
if ARGV[1] == '1' then
  if caller ~= ARGV[2] then return false end
elseif ARGV[1] == '0' and caller ~= false then
  return false
end
return redis.call('HGETALL', KEYS[1])
"""

# Idempotent: a second worker's BUSYGROUP is not an error.
_ENSURE_GROUP = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"""

# The record, its stream entry and its place among the recent jobs (trimmed), at once.
_SUBMIT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
return 1
"""

# A page of a listing (``_job_summaries``, which says what a row holds and why): each job
# id of the index in ranks ARGV[2]..ARGV[3], newest first, as its row, made next to the
# record so only the row crosses the network; false for an id whose record is gone (or
# longer than any job id), the id and its ``record_type`` for a key that holds no hash.
# ARGV[1] the records' key prefix; ARGV[4..8] the bounds (field, error, error budget left,
# typed error, type characters); then the listed fields, '', the errors, '', the sized.
# Returns {error budget left, row or false, ...}, a row {id, name, value, name, value...}.
_LIST = """
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], ARGV[3])
local field_bound = tonumber(ARGV[4])
local error_bound = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local typed_bound = tonumber(ARGV[7])
local type_chars = tonumber(ARGV[8])
local groups, group = {{}, {}, {}}, 1
for i = 9, #ARGV do
  if ARGV[i] == '' then group = group + 1 else table.insert(groups[group], ARGV[i]) end
end
local reply = {0}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local kind = #id <= 64 and redis.call('TYPE', key)['ok'] or 'none'
  local row = false
  if kind == 'hash' then
    row = {id}
    local function size_of(field)
      local size = redis.call('HSTRLEN', key, field)
      if size == 0 and redis.call('HEXISTS', key, field) == 0 then return nil end
      return size
    end
    local function add(name, value)
      row[#row + 1] = name
      row[#row + 1] = value
    end
    for _, field in ipairs(groups[1]) do
      local size = size_of(field)
      if size and size <= field_bound then
        add(field, redis.call('HGET', key, field))
      elseif size then
        add(field .. '_bytes', tostring(size))
      end
    end
    for _, field in ipairs(groups[2]) do
      local size = size_of(field)
      if size then
        local value = false
        if size <= typed_bound then value = redis.call('HGET', key, field) end
        if size <= error_bound and size <= budget then
          budget = budget - size
          add(field, value)
        else
          add(field .. '_bytes', tostring(size))
        end
        if field == 'error' and value then
          local ok, decoded = pcall(cjson.decode, value)
          if ok and type(decoded) == 'table' and type(decoded['type']) == 'string'
              and #decoded['type'] <= type_chars then
            add('error_type', decoded['type'])
          end
        end
      end
    end
    for _, field in ipairs(groups[3]) do
      local size = size_of(field)
      if size then add(field .. '_bytes', tostring(size)) end
    end
  elseif kind ~= 'none' then
    row = {id, 'record_type', kind}
  end
  reply[#reply + 1] = row
end
reply[1] = budget
return reply
"""

#: Job ids a listing reads per round trip (each one bounded operation).
LIST_PAGE = 500

# A terminal record is returned as it is (the worker only acks: a redelivery after a
# redrive race); otherwise one more attempt is counted before the job runs. An attempts
# field that is not an integer (a record not written by us) is left for the worker to
# dead-letter: HINCRBY would fail the script, and every redelivery after it, for ever. So
# would a key of another type than a hash (WRONGTYPE): no dispatcher writes one, so it is
# deleted unread and the worker dead-letters the job as one without a record.
_BEGIN = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' then
  if kind ~= 'none' then redis.call('DEL', KEYS[1]) end
  return false
end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'succeeded' and state ~= 'failed' and state ~= 'dead' then
  local attempts = redis.call('HGET', KEYS[1], 'attempts')
  if attempts == false or (#attempts <= 18 and string.match(attempts, '^%-?%d+$')) then
    redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  end
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# The end, its pending callback, the ack and the wake-up of result waiters in one step (a
# script, not a MULTI: half the client's CPU per job). A callback is due at once (score 0).
_FINISH = """
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
if ARGV[8] == '1' then
  redis.call('ZADD', KEYS[4], 0, ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[3])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
redis.call('PUBLISH', ARGV[7], 'job ' .. ARGV[3])
return 1
"""

# Redis's clock for due times: every replica agrees on it.
_RETRY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
return 1
"""

# A live worker's heartbeat: each entry this consumer still holds has its idle time reset
# (XCLAIM to itself, JUSTID: no delivery counted). One another consumer took over, or
# one acked, is left alone: a heartbeat never takes an entry back.
_KEEP = """
local kept = 0
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if held[1] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""

_PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'job', id)
end
return #due
"""

# A dead-lettered job queued again (KEYS[1] its record, KEYS[2] the dead set; ARGV[1] its
# id, ARGV[2] now in ms), the same on every queue (``RedisJobs.redrive``, the SQS view's
# ``requeue``): what it was dead-lettered with becomes its ``previous_error`` (as a success
# after failed attempts shows its last failure), so while it is queued or runs again its
# ``error`` is only ever one of its new attempts'; it has not finished; and its next end
# brings a callback of its own (a new delivery id): the last one's is over.
_QUEUE_AGAIN = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PERSIST', KEYS[1])
local last = redis.call('HGET', KEYS[1], 'error')
if last then redis.call('HSET', KEYS[1], 'previous_error', last) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'redriven_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'error', 'finished_at', 'callback', 'callback_error',
  'callback_claim', 'callback_delivered_at', 'callback_failed_at')
"""

# Not a record a dispatcher wrote (no plugin; a key of another type, whose WRONGTYPE
# failed ``dlq redrive --all`` at it): nothing it could run.
_REDRIVE = (
    """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) == false then return 0 end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'plugin') == 0 then return 0 end
"""
    + _QUEUE_AGAIN
    + """
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return 1
"""
)

# The SQS view's: a record gone (expired, a Redis restarted empty) is not made again here
# with the few fields a redrive sets, which the worker would take for a record and never
# fill; left missing, the worker makes it whole from the message (_RECORD_BEGIN).
_REQUEUE = (
    """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' or redis.call('HEXISTS', KEYS[1], 'plugin') == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
"""
    + _QUEUE_AGAIN
    + "return 1\n"
)


# Only what is dead-lettered: a job that was redriven meanwhile keeps its record.
_PURGE_SOME = """
local dropped = 0
for i, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('DEL', KEYS[i + 1])
    dropped = dropped + 1
  end
end
return dropped
"""


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
        self._submit = client.register_script(_SUBMIT)
        self._ensure = client.register_script(_ENSURE_GROUP)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._retry = client.register_script(_RETRY)
        self._promote = client.register_script(_PROMOTE)
        self._keep = client.register_script(_KEEP)
        self._redrive = client.register_script(_REDRIVE)
        self._purge = client.register_script(_PURGE_SOME)
        self._owned = client.register_script(_OWNED_RECORD)
        self._list = client.register_script(_LIST)
        self.callbacks: CallbackOutbox | None = RedisCallbacks(
            client, self._op, self.callback_set, self.record_key("")
        )

    def record_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def _deadline(self, extra: float = 0.0) -> float:
        # Twice the bound: the operation gets the backend's whole op_timeout (a shorter
        # budget would be taken for the caller's deadline, not for Redis being slow).
        return self._clock() + 2 * self._op_timeout + extra

    async def _op(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        result: T = await self._run(what, self._deadline(), operation)
        return result

    async def submit(self, job_id: str, record: dict[str, str]) -> None:
        args: list[str | int] = [job_id, int(record["submitted_at"]), self.recent_kept]
        for name, value in record.items():
            args += [name, value]
        keys = (self.record_key(job_id), self.stream, self.recent_set)
        # One script, not a MULTI of four commands: a third of the client's CPU per job.
        await self._op("a job submission", lambda: self._submit(keys=keys, args=args))

    async def ensure_group(self) -> None:
        await self._op(
            "the job stream's group", lambda: self._ensure(keys=(self.stream,), args=(GROUP,))
        )

    async def take(
        self, consumer: str, count: int, block: float, min_idle: float
    ) -> list[Delivery]:
        await self._op(
            "due job retries",
            lambda: self._promote(keys=(self.delayed, self.stream), args=(count * 4,)),
        )
        claimed = await self._op(
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
        answer = await self._op(
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
        await self._op("a job's outcome", lambda: self._finish(keys=keys, args=args))

    async def retry_later(
        self, entry_id: str, job_id: str, fields: dict[str, str], delay: float
    ) -> None:
        args: list[str] = [GROUP, entry_id, str(max(0, int(delay * 1000))), job_id]
        for name, value in fields.items():
            args += [name, value]
        keys = (self.record_key(job_id), self.delayed, self.stream)
        await self._op("a job's next attempt", lambda: self._retry(keys=keys, args=args))

    async def keep(self, consumer: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        args = [GROUP, consumer, *entry_ids]
        kept = await self._op(
            "a worker's hold on its jobs",
            lambda: self._keep(keys=(self.stream,), args=args),
        )
        return int(kept)

    async def record(self, job_id: str) -> dict[str, str] | None:
        return await self._record(job_id, ("2", ""))

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        return await self._record(job_id, ("0", "") if caller is None else ("1", caller))

    async def _record(self, job_id: str, args: tuple[str, str]) -> dict[str, str] | None:
        keys = (self.record_key(job_id),)
        answer = await self._op("a job record", lambda: self._owned(keys=keys, args=args))
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
            reply = await self._op(
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
        answer = await self._op(
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
            answer = await self._op(
                "a dead-letter purge", functools.partial(self._purge, keys=keys, args=chunk)
            )
            dropped += int(answer)
        return dropped

    async def changed(self, key: str, timeout: float) -> None:
        await self._changed(f"job:{key}", timeout)

    def __repr__(self) -> str:
        return f"<RedisJobs {self.stream}>"


# A terminal record is returned as it is; one gone (expired, a Redis that restarted empty)
# is made again from what the message carried (ARGV[2..]); then one more attempt is counted
# (not on an attempts field that is no integer: the worker dead-letters that, as _BEGIN).
# A key of another type than a hash is no dispatcher's: deleted unread, made again.
_RECORD_BEGIN = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'succeeded' or state == 'failed' or state == 'dead' then
  return redis.call('HGETALL', KEYS[1])
end
if state == false then
  for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], 'attempts', 0)
elseif redis.call('HEXISTS', KEYS[1], 'plugin') == 0 then
  -- A partial record (a redrive's fields, written by a dispatcher before 2026-12-04):
  -- what the message carries fills what it lacks.
  for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if attempts == false or (#attempts <= 18 and string.match(attempts, '^%-?%d+$')) then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


class RedisJobRecords(JobRecords):
    """The job view of a queue kept elsewhere (SQS), on the same keys as ``RedisJobs``:
    ``d.job``, ``d.result`` and ``dispatcher jobs`` read it the same way."""

    def __init__(self, jobs: RedisJobs, client: Any, channel: str) -> None:
        self._jobs = jobs
        self._client = client
        self._channel = channel
        self._begin = client.register_script(_RECORD_BEGIN)
        self._requeue = client.register_script(_REQUEUE)
        self.callbacks = jobs.callbacks

    async def put(self, job_id: str, record: dict[str, str]) -> None:
        jobs = self._jobs

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(jobs.record_key(job_id), mapping=record)
                pipe.zadd(jobs.recent_set, {job_id: int(record["submitted_at"])})
                pipe.zremrangebyrank(jobs.recent_set, 0, -(jobs.recent_kept + 1))
                await pipe.execute()

        await jobs._op("a job record", write)

    async def drop(self, job_id: str) -> None:
        jobs = self._jobs

        async def forget() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(jobs.record_key(job_id))
                pipe.zrem(jobs.recent_set, job_id)
                await pipe.execute()

        await jobs._op("a job record", forget)

    async def begin(self, job_id: str, carried: dict[str, str]) -> dict[str, str]:
        args: list[str] = [now_ms()]
        for name, value in carried.items():
            args += [name, value]
        key = self._jobs.record_key(job_id)
        answer = await self._jobs._op("a job's start", lambda: self._begin(keys=(key,), args=args))
        return reply_fields(answer)

    async def note(self, job_id: str, fields: dict[str, str]) -> None:
        key = self._jobs.record_key(job_id)
        await self._jobs._op("a job's next attempt", lambda: self._client.hset(key, mapping=fields))

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

        await jobs._op("a job's outcome", write)

    async def requeue(self, job_id: str) -> None:
        jobs = self._jobs
        keys = (jobs.record_key(job_id), jobs.dead_set)
        await jobs._op("a redrive", lambda: self._requeue(keys=keys, args=(job_id, now_ms())))

    async def record(self, job_id: str) -> dict[str, str] | None:
        return await self._jobs.record(job_id)

    async def owned_record(self, job_id: str, caller: str | None) -> dict[str, str] | None:
        return await self._jobs.owned_record(job_id, caller)

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
