"""The Lua scripts of the Redis backend: each shared operation is one atomic script.

Every script reads the clock with ``TIME`` on the server, so replicas whose own clocks
differ still agree (Redis 7 replicates a script's effects, not the script, which makes
``TIME`` allowed). Times are integer microseconds: 1.7e15 fits a Lua double exactly.

A stored number is read only as the scripts write it, decimal digits (``_COUNT``): Lua's
``tonumber`` also takes ``inf``, ``nan`` and ``1e300``, which kept a limit refusing with
a negative wait and a breaker from ever opening, and a value it takes for no number at
all ends a reply's array early (a Lua nil ends it). A key holding anything else (another
writer's, or corrupted) fails the script with an error that says ``UNREADABLE``: the
backend's ``StateUnavailable`` (refused, not Redis down), a fallback with ``fail_open``,
until the key is deleted or expires.
"""

from __future__ import annotations

__all__ = ["BREAKER", "CACHE_GET", "CACHE_SET", "IDEMPOTENCY_CLAIM", "IDEMPOTENCY_END", "LIMIT"]

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
"""

#: ``count(text)``: a stored count or time as the scripts write it (absent: 0), else nil.
#: At most 17 digits: every one the scripts write, and exact in a Lua double.
_COUNT = """
local function count(text)
  if not text then return 0 end
  if #text > 17 or not string.match(text, '^%d+$') then return nil end
  return tonumber(text)
end
"""

#: GCRA (the generic cell rate algorithm): one key holding the theoretical arrival time
#: (TAT). ``interval`` = 1/rate, ``tolerance`` = burst * interval, so over T seconds at
#: most burst + rate·T calls pass — the bound of the in-process leaky bucket. A call that
#: may wait reserves its slot (the TAT moves on) and is told how long to sleep.
#:
#: A TAT is read as at most what a dispatcher could have written: ``tolerance`` ahead of
#: now (the burst window; a TAT further ahead refuses every call), plus the longest wait
#: the limit grants a call (``longest_wait_us``: 0 in reject mode, the longest deadline in
#: wait mode, whose callers reserve slots ahead), and never past the key's own expiry,
#: which every write sets just beyond the TAT it writes (a key without one is not ours:
#: the burst window alone). A further one (forged, corrupt, or a failover to a server
#: whose clock is behind) refused calls until its key expired, never if it had no expiry:
#: it is read as that bound and written back, so it costs at most one window (wait mode:
#: at most its expiry, and the longest deadline).
#: KEYS[1] the limit; ARGV interval_us, burst, max_wait_us, longest_wait_us.
#: Returns {admitted, wait_us}.
LIMIT = (
    _NOW
    + _COUNT
    + """
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local stored = count(redis.call('GET', KEYS[1]))
if not stored then
  return redis.error_reply('UNREADABLE rate limit: the key holds no time a dispatcher writes')
end
local ceiling = now + tolerance + tonumber(ARGV[4])
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then
  ceiling = now + tolerance
elseif ttl >= 0 then
  ceiling = math.min(ceiling, now + ttl * 1000)
end
local tat = math.max(math.min(stored, ceiling), now)
local new_tat = tat + interval
local wait = new_tat - tolerance - now
if wait > tonumber(ARGV[3]) then
  if stored > ceiling then
    redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  return {0, wait}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
if wait < 0 then
  wait = 0
end
return {1, wait}
"""
)

#: The breaker's transitions (dispatcher/fleet/breaker.py, the same table) on a hash.
#: KEYS[1] the breaker; ARGV op (admit|success|failure|nothing), fail_max, reset_us,
#: half_open_max, success_threshold, probe (0|1), channel, name, ttl_ms.
#: Returns {state, failures, admitted, probe, wait_us, generation}. A transition is
#: published on the channel so every replica drops its cached view at once. A probe slot
#: taken by a replica that died frees itself after reset_timeout (``probe_until``).
#: ``generation`` orders what replicas learn of the state (an answer or a read that
#: arrives after a newer one is stale): it grows with every transition, and when the hash
#: is made (a hash stored without one counts as 0). It grows to at least the server's
#: clock, so a hash that expired, or a Redis that restarted empty, does not start again
#: below a generation replicas already hold; a missing hash is written by the first
#: operation, even a closed admit, for the same reason.
BREAKER = (
    _NOW
    + _COUNT
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'successes', 'opened_at', 'probes',
  'probe_until', 'generation')
local state = h[1] or 'closed'
local failures = count(h[2])
local successes = count(h[3])
local opened_at = count(h[4])
local probes = count(h[5])
local probe_until = count(h[6])
local generation = count(h[7])
if (state ~= 'closed' and state ~= 'open' and state ~= 'half-open') or not failures
    or not successes or not opened_at or not probes or not probe_until or not generation then
  return redis.error_reply('UNREADABLE circuit breaker: its hash holds a state or a count a'
    .. ' dispatcher does not write')
end
local op = ARGV[1]
local fail_max = tonumber(ARGV[2])
local reset = tonumber(ARGV[3])
-- Times ahead of this server's clock (a failover to a server whose clock is behind, or a
-- lying writer) would keep the circuit open, or its probe slots taken, until they came.
opened_at = math.min(opened_at, now)
probe_until = math.min(probe_until, now + reset)
local half_open_max = tonumber(ARGV[4])
local threshold = tonumber(ARGV[5])
local probe = ARGV[6] == '1'
local old = state
local function move(new)
  if new == 'open' then opened_at = now end
  if new == 'closed' then failures = 0 end
  successes = 0
  probes = 0
  state = new
end
local admitted, is_probe, wait = 1, 0, 0
if op == 'admit' then
  if state == 'open' then
    wait = opened_at + reset - now
    if wait > 0 then
      admitted = 0
    else
      wait = 0
      move('half-open')
    end
  end
  if admitted == 1 and state == 'half-open' then
    if probes >= half_open_max and now < probe_until then
      admitted = 0
      wait = math.min(reset, 1000000)
    else
      if now >= probe_until then probes = 0 end
      probes = probes + 1
      probe_until = now + reset
      is_probe = 1
    end
  end
  if state == 'closed' and h[1] then
    return {state, failures, 1, 0, 0, generation}
  end
elseif op == 'success' then
  failures = 0
  if probe then
    probes = math.max(probes - 1, 0)
    if state == 'half-open' then
      successes = successes + 1
      if successes >= threshold then move('closed') end
    end
  end
elseif op == 'failure' then
  failures = failures + 1
  if probe then probes = math.max(probes - 1, 0) end
  if (state == 'half-open' and probe) or (state == 'closed' and failures >= fail_max) then
    move('open')
  end
elseif probe then
  probes = math.max(probes - 1, 0)
end
if state ~= old or not h[1] then
  generation = math.max(generation + 1, now)
end
redis.call('HSET', KEYS[1], 'state', state, 'failures', failures, 'successes', successes,
  'opened_at', string.format('%d', opened_at), 'probes', probes,
  'probe_until', string.format('%d', probe_until), 'generation', string.format('%d', generation))
redis.call('PEXPIRE', KEYS[1], ARGV[9])
if state ~= old then
  redis.call('PUBLISH', ARGV[7], 'breaker ' .. ARGV[8])
end
return {state, failures, admitted, is_probe, wait, generation}
"""
)

#: KEYS[1] the cache's generation counter; ARGV entry prefix, entry digest, max bytes.
#: Returns {generation, value or false}, or {generation, its size} for an entry over max
#: bytes, which no dispatcher writes: it is deleted unread (sent whole, it would cost
#: every read its transfer, and one outlasting the operation timeout made the store look
#: down). So is an entry of another type than a string (a hash…: {generation, false, its
#: type}), which failed every read of it with WRONGTYPE, as Redis being unavailable does,
#: for as long as it lived: no fresh result replaced it. Invalidating bumps the
#: generation, so every replica's next read misses at once; old entries end with their TTL.
CACHE_GET = """
local generation = redis.call('GET', KEYS[1]) or '0'
local entry = ARGV[1] .. generation .. ':' .. ARGV[2]
local kind = redis.call('TYPE', entry)['ok']
if kind ~= 'string' and kind ~= 'none' then
  redis.call('DEL', entry)
  return {generation, false, kind}
end
local size = redis.call('STRLEN', entry)
if size > tonumber(ARGV[3]) then
  redis.call('DEL', entry)
  return {generation, size}
end
return {generation, redis.call('GET', entry)}
"""

#: KEYS[1] the generation counter; ARGV prefix, digest, value, ttl_ms, generation read.
#: A fill that began before an invalidation does not store its (stale) result after it.
CACHE_SET = """
local generation = redis.call('GET', KEYS[1]) or '0'
if generation == ARGV[5] then
  redis.call('SET', ARGV[1] .. generation .. ':' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"""

#: KEYS[1] the record; ARGV fingerprint, token, lease_ms, max bytes, version, then the
#: other versions whose record answers the claim too (a rollout's other side; ``*``: any
#: version, for a call that named none). Returns
#: {'run'}, {'done', outcome}, {'busy'} or {'mismatch'} ({'mismatch', version} when only the
#: version differs: the record's, for a call naming a range); {'done', its size} for an outcome
#: over max bytes, which no dispatcher records (read whole, it would cost every duplicate
#: its transfer, and one outlasting the operation timeout made the store look down). A key
#: of another type than a hash is a record no dispatcher wrote: {'done', ''}, an outcome
#: that is none of ours (the call it stands for may have run: it is not run again). Before,
#: its WRONGTYPE was Redis unavailable: fail_open ran the call again on this replica's
#: records. So is a hash without ``fp``, which every claim writes: it was taken for no
#: record, and the claim wrote its fields into another writer's hash, set it to expire and
#: ran the call (2026-12-05). So is a claim without an outcome that never expires: every
#: claim is written with its lease's expiry, and one kept for ever answered {'busy'} for
#: ever (a keyed call waited out its deadline, a submission its 5 s, each told to come
#: again; 2026-12-05).
#:
#: The version is a field of its own beside ``fp`` (the params' fingerprint), not part of
#: it, so records stay readable both ways during a rolling deploy: a dispatcher from before
#: 2026-12-05 compares ``fp`` alone and replays a record this one wrote (as it replayed
#: any, whatever the version), and a record it wrote, which has no ``version``, is replayed
#: here for the same params instead of refused. That second rule is for records of those
#: older dispatchers only; it can go once none runs and a retention window
#: (``state.idempotency_retention_ms``, 24 h by default) has passed since the last stopped.
IDEMPOTENCY_CLAIM = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {'done', ''} end
local record = redis.call('HMGET', KEYS[1], 'fp', 'version')
local fp = record[1]
if not fp then
  if kind == 'hash' then return {'done', ''} end
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'token', ARGV[2], 'version', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'run'}
end
if fp ~= ARGV[1] then return {'mismatch'} end
local version = record[2]
if version then
  local known = false
  for i = 5, #ARGV do
    if ARGV[i] == version or ARGV[i] == '*' then
      known = true
      break
    end
  end
  if not known then return {'mismatch', version} end
end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 0 then
  if redis.call('PTTL', KEYS[1]) == -1 then return {'done', ''} end
  return {'busy'}
end
local size = redis.call('HSTRLEN', KEYS[1], 'outcome')
if size > tonumber(ARGV[4]) then return {'done', size} end
return {'done', redis.call('HGET', KEYS[1], 'outcome')}
"""

#: KEYS[1] the record; ARGV token, outcome ('' to release), retention_ms, channel, name.
#: Only the owner of the claim ends it; the waiters are told on the channel.
IDEMPOTENCY_END = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'outcome', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
redis.call('PUBLISH', ARGV[4], 'idem ' .. ARGV[5])
return 1
"""
