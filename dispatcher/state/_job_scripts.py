"""The Lua scripts of the Redis job store (``redis_jobs``) and of the Redis job view of
jobs queued on SQS (``redis_job_records``): each step of a job is one atomic script.

A due time (a retry's, a delayed job's promotion) reads Redis's clock (``TIME``), so every
replica agrees on it. The keys the scripts take are those ``redis_jobs``'s docstring lists.
"""

from __future__ import annotations

__all__ = [
    "BEGIN",
    "ENSURE_GROUP",
    "FINISH",
    "KEEP",
    "LIST",
    "OWNED_RECORD",
    "PROMOTE",
    "PURGE_SOME",
    "RECORD_BEGIN",
    "REDRIVE",
    "REQUEUE",
    "RETRY",
    "SUBMIT",
]

# A job's record for its owner only: the caller field (absent: submitted anonymously,
# ARGV[1] '0') is compared here, so another caller's record never leaves Redis; ARGV[1]
# '2': anyone's. A key of another type is no dispatcher's record: its type is answered
# (a corrupt entry, as a listing's row says), never its value. Its WRONGTYPE was told as
# the store failing, retryable, for a key that reads the same each time.
OWNED_RECORD = """
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
ENSURE_GROUP = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
return 1
"""

# The record, its stream entry and its place among the recent jobs (trimmed), at once.
SUBMIT = """
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
LIST = """
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


# A terminal record is returned as it is (the worker only acks: a redelivery after a
# redrive race); otherwise one more attempt is counted before the job runs. An attempts
# field that is not an integer (a record not written by us) is left for the worker to
# dead-letter: HINCRBY would fail the script, and every redelivery after it, for ever. So
# would a key of another type than a hash (WRONGTYPE): no dispatcher writes one, so it is
# deleted unread and the worker dead-letters the job as one without a record.
BEGIN = """
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
FINISH = """
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
RETRY = """
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
KEEP = """
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

PROMOTE = """
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
REDRIVE = (
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
# fill; left missing, the worker makes it whole from the message (RECORD_BEGIN).
REQUEUE = (
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
PURGE_SOME = """
local dropped = 0
for i, id in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('DEL', KEYS[i + 1])
    dropped = dropped + 1
  end
end
return dropped
"""


# A terminal record is returned as it is; one gone (expired, a Redis that restarted empty)
# is made again from what the message carried (ARGV[2..]); then one more attempt is counted
# (not on an attempts field that is no integer: the worker dead-letters that, as BEGIN).
# A key of another type than a hash is no dispatcher's: deleted unread, made again.
RECORD_BEGIN = """
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
