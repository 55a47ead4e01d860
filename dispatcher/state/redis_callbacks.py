"""The outbox of job callbacks on Redis: which ended jobs still owe their caller a POST.

A job's callback is recorded by the same atomic step that stores its end (its record's
``callback: pending``, and its id in the callbacks set, due at once: ``redis_jobs``), so a
worker killed before it delivered loses nothing. Any replica's callback runner
(``dispatcher._job_callbacks``) claims due ones here: a claim is a lease (due again after
it, for whoever claims next) and counts ``callback_attempts`` on the record; the runner
settles each delivered, due again later, or failed — only while its claim still holds, so
a runner whose lease ran out cannot overwrite the one that took over.

The record keeps ``callback``, ``callback_id`` (the delivery id the receiver deduplicates
on), ``callback_attempts`` and ``callback_error``; a record expired before its callback
was delivered ends the callback (nothing is left to send). Used by the Redis job store
and by the Redis job view of jobs queued on SQS alike.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.state._redis_replies import now_ms, reply_fields, reply_text
from dispatcher.state.callback_outbox import CallbackOutbox, PendingCallback

__all__ = ["RedisCallbacks"]

#: Runs one Redis operation under the store's bounds (``RedisJobs.op``): what it is, for
#: the error a caller sees, and the operation.
Operation = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]

# Due callbacks, each leased to this claim (due again after the lease), its attempt counted.
# One whose record is gone or no longer pending is dropped, and so is one whose key holds
# another type than a hash (no dispatcher's record: its WRONGTYPE failed every claim, so no
# callback of any job was delivered while it was due). KEYS[1] the callbacks set; ARGV
# count, lease_ms, record key prefix, token. Returns {id, attempt, record...} each.
_CALLBACK_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for _, id in ipairs(due) do
  local key = ARGV[3] .. id
  if redis.call('TYPE', key)['ok'] ~= 'hash' or redis.call('HGET', key, 'callback') ~= 'pending' then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    local attempt = redis.call('HINCRBY', key, 'callback_attempts', 1)
    redis.call('HSET', key, 'callback_claim', ARGV[4])
    table.insert(claimed, {id, attempt, redis.call('HGETALL', key)})
  end
end
return claimed
"""

# Settle a claim, if it is still this claim's. KEYS[1] the callbacks set, KEYS[2] the
# record; ARGV id, token, outcome (delivered|retry|failed), delay_ms, reason, when (ms).
# A failed one is dead-lettered on its record (``callback: failed``), which lives as long
# as the job's (a dead job's until purged): no index of its own to outgrow it.
_CALLBACK_SETTLE = """
if redis.call('HGET', KEYS[2], 'callback_claim') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], 'callback_claim')
if ARGV[3] == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('HSET', KEYS[2], 'callback_error', ARGV[5])
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] == 'delivered' then
  redis.call('HSET', KEYS[2], 'callback', 'delivered', 'callback_delivered_at', ARGV[6])
else
  redis.call('HSET', KEYS[2], 'callback', 'failed', 'callback_error', ARGV[5],
    'callback_failed_at', ARGV[6])
end
return 1
"""


class RedisCallbacks(CallbackOutbox):
    """The callbacks of jobs kept on Redis (``RedisJobs``, or SQS jobs' Redis job view)."""

    def __init__(self, client: Any, run: Operation, callback_set: str, record_prefix: str) -> None:
        self._run = run
        self._set = callback_set
        self._record_prefix = record_prefix  # + job id: the key of the job's record
        self._claim = client.register_script(_CALLBACK_CLAIM)
        self._settle = client.register_script(_CALLBACK_SETTLE)

    async def claim(self, count: int, lease: float) -> list[PendingCallback]:
        token = os.urandom(8).hex()
        args = (count, max(1, int(lease * 1000)), self._record_prefix, token)
        answer = await self._run(
            "due job callbacks", lambda: self._claim(keys=(self._set,), args=args)
        )
        return [
            PendingCallback(reply_text(job_id), token, int(attempt), reply_fields(record))
            for job_id, attempt, record in answer or ()
        ]

    async def _settled(
        self, callback: PendingCallback, outcome: str, delay: float = 0.0, reason: str = ""
    ) -> bool:
        keys = (self._set, self._record_prefix + callback.job_id)
        args = (
            callback.job_id,
            callback.token,
            outcome,
            max(0, int(delay * 1000)),
            reason[:500],
            now_ms(),
        )
        answer = await self._run(
            "a job callback's outcome", lambda: self._settle(keys=keys, args=args)
        )
        return bool(answer)

    async def delivered(self, callback: PendingCallback) -> bool:
        return await self._settled(callback, "delivered")

    async def retry(self, callback: PendingCallback, delay: float, reason: str) -> bool:
        return await self._settled(callback, "retry", delay, reason)

    async def give_up(self, callback: PendingCallback, reason: str) -> bool:
        return await self._settled(callback, "failed", reason=reason)

    def __repr__(self) -> str:
        return f"<RedisCallbacks {self._set}>"
