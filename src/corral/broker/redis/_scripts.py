"""The Lua scripts behind the Redis backend: every multi-key step runs atomically in Redis.

Each script is a prelude (the prefix; the time and shared helpers where needed) plus a
body; clients register them once and call them by SHA (EVALSHA). ``KEYS[1]`` is the run's
prefix ``corral:{RUN}:`` (the hash tag keeps one run's keys in one cluster slot); every
other key is derived from it.

Key layout under the prefix (``sid`` = a client session, ``tid`` = a ticket / holding id)::

    sess  zset sid -> session deadline (ms)     sinfo hash sid -> {pid, host, worker, since}
    h:SID set  what the session owns: H<tid> holding, T<tid> ticket, L<worker> lease, O<key> once,
               Q<tid>:<queue> a pop in flight
    tk    hash tid -> waiting ticket {kind, name, sid, since, ttl}
    hd    hash tid -> holding {kind, name, item, sid, since, token, exp}; dl zset tid -> TTL
    w:TID list wake-up messages for one waiter (BLPOP'd by it)
    k:KEY string JSON value (PX ttl);  exp zset key -> deadline (tells expired from missing)
    lw / ln:KEY / lexp   leases: worker -> {key, n, sid}; n -> worker; worker -> deadline
    rf: rq: ri: rn: KIND:NAME   lock/pool: free item ids, FIFO ticket queue, items, fence
    o:KEY / oq:KEY       once: {state, sid, tid, since, msg, etype}; waiting tickets
    b:NAME / bq:NAME     barrier: {parties, count, gen, broken}; waiting tickets
    th:NAME              throttle: the last `rate` scheduled call times
    qu:NAME              push/pop work queue (JSON items)
    qi:TID               a pop's in-flight list: a '' sentinel, then the item taken but
                         not yet delivered (h:SID has Q<tid>:<queue> until it is)
    qz                   zset "SID Q<tid>:<queue>" -> when the reaper forgets an
                         interrupted pop's in-flight list

Time is Redis's ``TIME`` (one clock for every machine of the run). Scripts answer arrays
whose first element is a status; errors are ``{"err", CODE, DETAIL}`` with the wire codes
of :data:`corral.errors.ERROR_CODES`.
"""

from __future__ import annotations

import functools
import re
from typing import Final

#: Structural keys (queues, pools, counters, registries) expire a day after their last
#: write, so an abandoned run never leaves garbage behind for good.
RUN_TTL_MS: Final = 24 * 3600 * 1000
#: Keys that expired keep answering "expired" (not "not_found") for this long.
EXPIRED_MEMORY_MS: Final = 600_000
#: An interrupted pop's in-flight list waits this long for a BLMOVE sent before the
#: interruption but run by Redis after it (far more than such a command can lag).
LATE_POP_MS: Final = 10_000

# A script is _KEY, then _CLOCK unless it never needs the time, then _LOCALS and exactly
# the helper functions its body calls (directly or through other helpers): Lua defines
# every local function on every call, and all of them cost ~7 us per call inside Redis.
_KEY = """
local P = KEYS[1]
"""

_CLOCK = """
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LOCALS = """
local RUN_TTL = @RUN_TTL@
local enc, dec = cjson.encode, cjson.decode
""".replace("@RUN_TTL@", str(RUN_TTL_MS))

# Helper functions, in dependency order; each ends with "end" alone at column 0.
_HELPERS = """
local function touch(key)
  redis.call('PEXPIRE', key, RUN_TTL)
end

-- Claims are only taken for a live session: one reaped meanwhile would never free them.
local function lost(sid)
  if redis.call('ZSCORE', P .. 'sess', sid) then return nil end
  return {'err', 'session_lost', 'session ' .. sid .. ' expired (its claims were freed)'}
end

local function wake(tid, msg)
  local w = P .. 'w:' .. tid
  redis.call('RPUSH', w, msg)
  redis.call('PEXPIRE', w, 3600000)
end

local function add_ticket(tid, kind, name, sid, ttl, queue)
  redis.call('RPUSH', queue, tid)
  touch(queue)
  redis.call('HSET', P .. 'tk', tid,
    enc({kind = kind, name = name, sid = sid, since = NOW, ttl = ttl}))
  redis.call('SADD', P .. 'h:' .. sid, 'T' .. tid)
end

-- Pop the live tickets of a queue in FIFO order, forgetting them (waiters to wake).
local function take_ticket(tid)
  local raw = redis.call('HGET', P .. 'tk', tid)
  if not raw then return nil end
  local t = dec(raw)
  redis.call('HDEL', P .. 'tk', tid)
  redis.call('SREM', P .. 'h:' .. t.sid, 'T' .. tid)
  return t
end

local function take_all(queue)
  local tids = redis.call('LRANGE', queue, 0, -1)
  redis.call('DEL', queue)
  local live = {}
  for _, tid in ipairs(tids) do
    if take_ticket(tid) then live[#live + 1] = tid end
  end
  return live
end

-- ---------------------------------------------------------------- locks and pools

local function hold(kind, name, item, tid, sid, ttl)
  local token = redis.call('INCR', P .. 'rn:' .. kind .. ':' .. name)
  touch(P .. 'rn:' .. kind .. ':' .. name)
  local exp = 0
  if ttl > 0 then
    exp = NOW + ttl
    redis.call('ZADD', P .. 'dl', exp, tid)
  end
  redis.call('HSET', P .. 'hd', tid, enc({kind = kind, name = name, item = item, sid = sid,
    since = NOW, token = token, exp = exp}))
  redis.call('SADD', P .. 'h:' .. sid, 'H' .. tid)
  return token
end

local function item_value(kind, name, item)
  return redis.call('HGET', P .. 'ri:' .. kind .. ':' .. name, item) or 'null'
end

-- A freed item goes to the first waiter still waiting, else back to the free list.
local function hand_over(kind, name, item)
  local q = P .. 'rq:' .. kind .. ':' .. name
  while true do
    local tid = redis.call('LPOP', q)
    if not tid then break end
    local t = take_ticket(tid)
    if t then
      local token = hold(kind, name, item, tid, t.sid, t.ttl)
      wake(tid, enc({item = item, token = token, value = item_value(kind, name, item)}))
      return
    end
  end
  local free = P .. 'rf:' .. kind .. ':' .. name
  redis.call('RPUSH', free, item)
  touch(free)
end

local function unhold(hid)
  local raw = redis.call('HGET', P .. 'hd', hid)
  if not raw then return false end
  local h = dec(raw)
  redis.call('HDEL', P .. 'hd', hid)
  redis.call('ZREM', P .. 'dl', hid)
  redis.call('SREM', P .. 'h:' .. h.sid, 'H' .. hid)
  hand_over(h.kind, h.name, h.item)
  return true
end

-- ---------------------------------------------------------------- once

-- The computer left without a result: the first waiter still waiting computes instead.
local function once_elect(key)
  local o = P .. 'o:' .. key
  local q = P .. 'oq:' .. key
  while true do
    local tid = redis.call('LPOP', q)
    if not tid then break end
    local t = take_ticket(tid)
    if t then
      redis.call('HSET', o, 'state', 'computing', 'sid', t.sid, 'tid', tid, 'since', NOW)
      redis.call('SADD', P .. 'h:' .. t.sid, 'O' .. key)
      wake(tid, enc({elect = true}))
      return
    end
  end
  redis.call('DEL', o)
end

local function once_giveup(key, sid)
  local o = P .. 'o:' .. key
  local st = redis.call('HMGET', o, 'state', 'sid')
  redis.call('SREM', P .. 'h:' .. sid, 'O' .. key)
  if st[1] == 'computing' and st[2] == sid then once_elect(key) end
end

-- ---------------------------------------------------------------- barrier

local function break_barrier(name, reason)
  local b = P .. 'b:' .. name
  redis.call('HSET', b, 'broken', reason)
  touch(b)
  for _, tid in ipairs(take_all(P .. 'bq:' .. name)) do
    wake(tid, enc({broken = reason}))
  end
end

-- ---------------------------------------------------------------- leases

local function lease_drop(worker)
  local raw = redis.call('HGET', P .. 'lw', worker)
  if not raw then return false end
  local l = dec(raw)
  redis.call('HDEL', P .. 'lw', worker)
  redis.call('HDEL', P .. 'ln:' .. l.key, tostring(l.n))
  redis.call('ZREM', P .. 'lexp', worker)
  redis.call('SREM', P .. 'h:' .. l.sid, 'L' .. worker)
  return true
end

local function lease_expire()
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. 'lexp', '-inf', NOW, 'LIMIT', 0, 100)) do
    lease_drop(w)
  end
end

-- ---------------------------------------------------------------- queues

-- What a pop took but did not deliver goes back to the head of its queue, in order.
-- `keep` leaves the emptied in-flight list (its sentinel) and the session's record of
-- it for a while (the reaper forgets it after @LATE@ ms), so that an item a late BLMOVE
-- (sent before the pop was cancelled, run after) still moves in is requeued; without a
-- record (the pop script has not run) there is nothing to keep.
local function requeue(tid, queue, sid, keep)
  local f = P .. 'qi:' .. tid
  local q = P .. 'qu:' .. queue
  local member = 'Q' .. tid .. ':' .. queue
  if keep and redis.call('SISMEMBER', P .. 'h:' .. sid, member) == 0 then keep = false end
  local items = redis.call('LRANGE', f, 0, -1)
  local n = 0
  for i = #items, 1, -1 do
    if items[i] ~= '' then
      redis.call('LPUSH', q, items[i])
      n = n + 1
    end
  end
  if n > 0 then touch(q) end
  redis.call('DEL', f)
  if keep then
    redis.call('RPUSH', f, '')
    redis.call('PEXPIRE', f, RUN_TTL)
    redis.call('ZADD', P .. 'qz', NOW + @LATE@, sid .. ' ' .. member)
    touch(P .. 'qz')
  else
    redis.call('SREM', P .. 'h:' .. sid, member)
  end
  return n
end

-- ---------------------------------------------------------------- sessions

-- A waiter gave up (timeout, cancellation) or its session ended: it is never granted.
-- With `notify`, the waiter is told (a starved but living process re-queues, renewed).
local function drop_ticket(tid, reason, notify)
  local t = take_ticket(tid)
  if not t then return false end
  if t.kind == 'lock' or t.kind == 'pool' then
    redis.call('LREM', P .. 'rq:' .. t.kind .. ':' .. t.name, 1, tid)
  elseif t.kind == 'once' then
    redis.call('LREM', P .. 'oq:' .. t.name, 1, tid)
  elseif t.kind == 'barrier' then
    redis.call('LREM', P .. 'bq:' .. t.name, 1, tid)
    break_barrier(t.name, reason)
  end
  redis.call('DEL', P .. 'w:' .. tid)
  if notify then wake(tid, enc({lost = reason})) end
  return true
end

local function who(sid)
  local raw = redis.call('HGET', P .. 'sinfo', sid)
  if not raw then return 'session ' .. sid end
  local i = dec(raw)
  return 'pid ' .. tostring(i.pid) .. ' on ' .. tostring(i.host)
end

local function end_session(sid, reason)
  local hk = P .. 'h:' .. sid
  local members = redis.call('SMEMBERS', hk)
  -- Tickets first, so nothing this session frees is handed to its own waiters.
  for _, m in ipairs(members) do
    if string.sub(m, 1, 1) == 'T' then drop_ticket(string.sub(m, 2), reason, true) end
  end
  for _, m in ipairs(members) do
    local kind, rest = string.sub(m, 1, 1), string.sub(m, 2)
    if kind == 'H' then unhold(rest)
    elseif kind == 'L' then lease_drop(rest)
    elseif kind == 'O' then once_giveup(rest, sid)
    elseif kind == 'Q' then
      local at = string.find(rest, ':', 1, true)
      requeue(string.sub(rest, 1, at - 1), string.sub(rest, at + 1), sid, false)
    end
  end
  redis.call('DEL', hk)
  redis.call('ZREM', P .. 'sess', sid)
  redis.call('HDEL', P .. 'sinfo', sid)
end

-- Free what dead sessions held and what outlived its TTL. Run by every heartbeat.
local function reap()
  for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'sess', '-inf', NOW, 'LIMIT', 0, 50)) do
    end_session(sid, 'member ' .. who(sid) .. ' died (its session expired)')
  end
  for _, hid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'dl', '-inf', NOW, 'LIMIT', 0, 100)) do
    unhold(hid)
  end
  lease_expire()
  -- Interrupted pops kept for a late BLMOVE: long enough; requeue anything it moved.
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'qz', '-inf', NOW, 'LIMIT', 0, 100)) do
    local sp = string.find(m, ' ', 1, true)
    local sid, member = string.sub(m, 1, sp - 1), string.sub(m, sp + 1)
    if redis.call('SISMEMBER', P .. 'h:' .. sid, member) == 1 then
      local at = string.find(member, ':', 1, true)
      requeue(string.sub(member, 2, at - 1), string.sub(member, at + 1), sid, false)
    end
    redis.call('ZREM', P .. 'qz', m)
  end
  redis.call('ZREMRANGEBYSCORE', P .. 'exp', '-inf', NOW - @MEMORY@)
end
""".replace("@MEMORY@", str(EXPIRED_MEMORY_MS)).replace("@LATE@", str(LATE_POP_MS))

_BODIES: dict[str, str] = {
    # ARGV: sid, ttl_ms, mode (register|beat|end), info json
    "session": """
local sid, ttl, mode = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if mode == 'end' then
  end_session(sid, 'member ' .. who(sid) .. ' left (client closed)')
  return {'ok'}
end
if mode == 'beat' and not redis.call('ZSCORE', P .. 'sess', sid) then
  return {'lost'}
end
redis.call('ZADD', P .. 'sess', NOW + ttl, sid)
if mode == 'register' then redis.call('HSET', P .. 'sinfo', sid, ARGV[4]) end
for _, k in ipairs({'sess', 'sinfo', 'tk', 'hd', 'dl', 'exp', 'lw', 'lexp', 'qz'}) do
  touch(P .. k)
end
touch(P .. 'h:' .. sid)
reap()
return {'ok'}
""",
    # ARGV: key, json value, ttl_ms, nx (1: only if absent)
    "set": """
local k = P .. 'k:' .. ARGV[1]
local ttl = tonumber(ARGV[3])
if ARGV[4] == '1' then
  if not redis.call('SET', k, ARGV[2], 'PX', ttl, 'NX') then return 0 end
else
  redis.call('SET', k, ARGV[2], 'PX', ttl)
end
redis.call('ZADD', P .. 'exp', NOW + ttl, ARGV[1])
return 1
""",
    # ARGV: key
    "delete": """
redis.call('ZREM', P .. 'exp', ARGV[1])
return redis.call('DEL', P .. 'k:' .. ARGV[1])
""",
    "keys": """
redis.call('ZREMRANGEBYSCORE', P .. 'exp', '-inf', NOW - @MEMORY@)
return redis.call('ZRANGEBYSCORE', P .. 'exp', '(' .. NOW, '+inf')
""".replace("@MEMORY@", str(EXPIRED_MEMORY_MS)),
    # ARGV: key, amount, ttl_ms ('' keeps the key's TTL), default ttl_ms
    "incr": """
local k = P .. 'k:' .. ARGV[1]
local existed = redis.call('EXISTS', k) == 1
local v = redis.pcall('INCRBY', k, ARGV[2])
if type(v) == 'table' and v.err then
  return {'err', 'bad_request', 'the value of ' .. ARGV[1] .. ' is not an integer'}
end
local ttl = nil
if ARGV[3] ~= '' then ttl = tonumber(ARGV[3]) elseif not existed then ttl = tonumber(ARGV[4]) end
if ttl then
  redis.call('PEXPIRE', k, ttl)
  redis.call('ZADD', P .. 'exp', NOW + ttl, ARGV[1])
end
return {'ok', v}
""",
    # ARGV: sid, key, worker, ttl_ms
    "lease": """
lease_expire()
local sid, key, worker, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local gone = lost(sid)
if gone then return gone end
local raw = redis.call('HGET', P .. 'lw', worker)
if raw then
  local l = dec(raw)
  if l.key ~= key then
    return {'err', 'worker_already_has_lease',
      'worker ' .. worker .. ' already leases ' .. tostring(l.n) .. ' under ' .. l.key}
  end
  redis.call('ZADD', P .. 'lexp', NOW + ttl, worker)
  if l.sid ~= sid then
    redis.call('SREM', P .. 'h:' .. l.sid, 'L' .. worker)
    redis.call('SADD', P .. 'h:' .. sid, 'L' .. worker)
    l.sid = sid
    redis.call('HSET', P .. 'lw', worker, enc(l))
  end
  return {'ok', l.n}
end
local used = {}
for _, n in ipairs(redis.call('HKEYS', P .. 'ln:' .. key)) do used[tonumber(n)] = true end
local n = 0
while used[n] do n = n + 1 end
redis.call('HSET', P .. 'ln:' .. key, tostring(n), worker)
touch(P .. 'ln:' .. key)
redis.call('HSET', P .. 'lw', worker, enc({key = key, n = n, sid = sid, since = NOW}))
redis.call('ZADD', P .. 'lexp', NOW + ttl, worker)
redis.call('SADD', P .. 'h:' .. sid, 'L' .. worker)
return {'ok', n}
""",
    # ARGV: worker
    "release": """
if lease_drop(ARGV[1]) then return 1 end
return 0
""",
    # ARGV: name, canonical json, item json...
    "pool": """
local name = ARGV[1]
local items = P .. 'ri:pool:' .. name
local cur = redis.call('HGET', items, 'decl')
if cur then
  if cur == ARGV[2] then return {'ok', 0} end
  return {'err', 'pool_conflict', 'pool ' .. name .. ' was declared with other items: ' .. cur}
end
local free = P .. 'rf:pool:' .. name
for i = 3, #ARGV do
  redis.call('HSET', items, tostring(i - 3), ARGV[i])
  redis.call('RPUSH', free, tostring(i - 3))
end
redis.call('HSET', items, 'decl', ARGV[2])
touch(items)
touch(free)
return {'ok', 1}
""",
    # ARGV: sid, tid, kind, name, ttl_ms (0: none), wait (1/0)
    "acquire": """
local sid, tid, kind, name, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local gone = lost(sid)
if gone then return gone end
local items = P .. 'ri:' .. kind .. ':' .. name
local free = P .. 'rf:' .. kind .. ':' .. name
local q = P .. 'rq:' .. kind .. ':' .. name
if redis.call('EXISTS', items) == 0 then
  if kind ~= 'lock' then
    return {'err', 'not_found',
      'pool ' .. name .. ' was never declared: call pool(name, items) first'}
  end
  redis.call('HSET', items, 'decl', '"lock"', '0', 'null')
  touch(items)
  redis.call('RPUSH', free, '0')
end
touch(items)  -- in use: never let the declaration expire under a holder
touch(free)
-- FIFO: a newcomer never overtakes a queued waiter.
if redis.call('LLEN', q) == 0 then
  local item = redis.call('LPOP', free)
  if item then
    local token = hold(kind, name, item, tid, sid, ttl)
    return {'ok', item, token, item_value(kind, name, item)}
  end
end
if ARGV[6] ~= '1' then return {'busy'} end
add_ticket(tid, kind, name, sid, ttl, q)
return {'wait'}
""",
    # ARGV: sid, tid -> 1 when it was still held by sid and is now free
    "unhold": """
local raw = redis.call('HGET', P .. 'hd', ARGV[2])
if not raw or dec(raw).sid ~= ARGV[1] then return 0 end
unhold(ARGV[2])
return 1
""",
    # ARGV: sid, tid, kind, name: a wait ended without taking its grant (timeout, cancel).
    "cancel": """
local sid, tid, kind, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if drop_ticket(tid, 'a member timed out or was cancelled', false) then return 'cancelled' end
-- Decided meanwhile: undo whatever was granted, since nobody will take it.
redis.call('DEL', P .. 'w:' .. tid)
local raw = redis.call('HGET', P .. 'hd', tid)
if raw and dec(raw).sid == sid then unhold(tid) end
if kind == 'once' and redis.call('HGET', P .. 'o:' .. name, 'tid') == tid then
  once_giveup(name, sid)
end
return 'undone'
""",
    # ARGV: key, sid, tid
    "once_begin": """
local key, sid, tid = ARGV[1], ARGV[2], ARGV[3]
local gone = lost(sid)
if gone then return gone end
local v = redis.call('GET', P .. 'k:' .. key)
if v then return {'done', v} end
local o = P .. 'o:' .. key
local st = redis.call('HMGET', o, 'state', 'msg', 'etype')
if st[1] == 'failed' then return {'failed', st[2], st[3]} end
if st[1] == 'computing' then
  add_ticket(tid, 'once', key, sid, 0, P .. 'oq:' .. key)
  return {'wait'}
end
redis.call('HSET', o, 'state', 'computing', 'sid', sid, 'tid', tid, 'since', NOW)
touch(o)
redis.call('SADD', P .. 'h:' .. sid, 'O' .. key)
return {'compute'}
""",
    # ARGV: key, sid, json value, ttl_ms
    "once_done": """
local key, sid, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
local o = P .. 'o:' .. key
redis.call('SREM', P .. 'h:' .. sid, 'O' .. key)
local v = redis.call('GET', P .. 'k:' .. key)
if v then return {'done', v} end
local owner = redis.call('HGET', o, 'sid')
redis.call('SET', P .. 'k:' .. key, ARGV[3], 'PX', ttl)
redis.call('ZADD', P .. 'exp', NOW + ttl, key)
if owner then redis.call('SREM', P .. 'h:' .. owner, 'O' .. key) end
redis.call('DEL', o)
local msg = enc({done = true, value = ARGV[3]})
for _, tid in ipairs(take_all(P .. 'oq:' .. key)) do wake(tid, msg) end
return {'stored'}
""",
    # ARGV: key, sid, message, error type, ttl_ms
    "once_fail": """
local key, sid = ARGV[1], ARGV[2]
local o = P .. 'o:' .. key
redis.call('SREM', P .. 'h:' .. sid, 'O' .. key)
local v = redis.call('GET', P .. 'k:' .. key)
if v then return {'done', v} end
local owner = redis.call('HGET', o, 'sid')
if owner then redis.call('SREM', P .. 'h:' .. owner, 'O' .. key) end
redis.call('DEL', o)
redis.call('HSET', o, 'state', 'failed', 'msg', ARGV[3], 'etype', ARGV[4], 'since', NOW)
redis.call('PEXPIRE', o, tonumber(ARGV[5]))
local msg = enc({failed = true, msg = ARGV[3], etype = ARGV[4]})
for _, tid in ipairs(take_all(P .. 'oq:' .. key)) do wake(tid, msg) end
return {'failed'}
""",
    # ARGV: name, parties, sid, tid
    "barrier": """
local name, parties, sid, tid = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local gone = lost(sid)
if gone then return gone end
local b = P .. 'b:' .. name
local h = redis.call('HMGET', b, 'parties', 'count', 'broken')
if h[3] then return {'broken', h[3]} end
if h[1] and tonumber(h[1]) ~= parties then
  return {'err', 'bad_request',
    'barrier ' .. name .. ' has ' .. h[1] .. ' parties, not ' .. parties}
end
local count = tonumber(h[2] or '0')
if count + 1 >= parties then
  for _, t in ipairs(take_all(P .. 'bq:' .. name)) do wake(t, enc({passed = true})) end
  redis.call('HSET', b, 'parties', parties, 'count', 0)
  redis.call('HINCRBY', b, 'gen', 1)
  touch(b)
  return {'passed', count}
end
redis.call('HSET', b, 'parties', parties, 'count', count + 1)
touch(b)
add_ticket(tid, 'barrier', name, sid, 0, P .. 'bq:' .. name)
return {'wait', count}
""",
    # ARGV: name, calls per window, window_ms, timeout_ms (-1: none)
    # -> {'ok', wait_ms} with the call's slot reserved, or {'timeout', wait_ms}
    "throttle": """
local k = P .. 'th:' .. ARGV[1]
local n, window, timeout = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local at = NOW
if redis.call('LLEN', k) >= n then
  at = math.max(NOW, tonumber(redis.call('LINDEX', k, -n)) + window)
end
local last = tonumber(redis.call('LINDEX', k, -1) or '0')
at = math.max(at, last)
if timeout >= 0 and at - NOW > timeout then return {'timeout', tostring(at - NOW)} end
redis.call('RPUSH', k, string.format('%.3f', at))
redis.call('LTRIM', k, -n, -1)
redis.call('PEXPIRE', k, math.ceil(at - NOW + window) + 1000)
return {'ok', string.format('%.3f', at - NOW)}
""",
    # ARGV: name, json items...
    "push": """
local q = P .. 'qu:' .. ARGV[1]
local n = redis.call('RPUSH', q, unpack(ARGV, 2))
redis.call('PEXPIRE', q, @RUN_TTL@)
return n
""".replace("@RUN_TTL@", str(RUN_TTL_MS)),
    # ARGV: sid, tid, queue, wait (1/0). The first item moves into the pop's in-flight
    # list qi:TID, recorded under the session -> {'ok', item}; else {'wait'} with the
    # list ready for BLMOVE (and recorded), or {'empty'} with nothing written.
    "pop": """
local sid, tid, queue = ARGV[1], ARGV[2], ARGV[3]
local gone = lost(sid)
if gone then return gone end
local q = P .. 'qu:' .. queue
if ARGV[4] ~= '1' and redis.call('LLEN', q) == 0 then return {'empty'} end
local f = P .. 'qi:' .. tid
redis.call('RPUSH', f, '')
redis.call('PEXPIRE', f, RUN_TTL)
redis.call('SADD', P .. 'h:' .. sid, 'Q' .. tid .. ':' .. queue)
local item = redis.call('LMOVE', q, f, 'LEFT', 'RIGHT')
if item then return {'ok', item} end
return {'wait'}
""",
    # ARGV: sid, tid, queue -> 1: the item was still in flight and is now delivered;
    # 0: it is not there any more (the session was reaped and the item requeued).
    "ack": """
local f = P .. 'qi:' .. ARGV[2]
redis.call('LREM', f, 1, '')
redis.call('SREM', P .. 'h:' .. ARGV[1], 'Q' .. ARGV[2] .. ':' .. ARGV[3])
return redis.call('DEL', f)
""",
    # ARGV: sid, tid, queue, raw, done (1/0): a pop ended without delivering its item.
    # raw '': the reply never arrived: requeue what is in flight; done=1 when nothing
    # can arrive any more (BLMOVE timed out), else the record stays for a late move.
    # raw: the item arrived but was not delivered, and its ack may have run: put it back.
    "unpop": """
local sid, tid, queue, raw = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if raw == '' then return requeue(tid, queue, sid, ARGV[5] ~= '1') end
redis.call('DEL', P .. 'qi:' .. tid)
redis.call('SREM', P .. 'h:' .. sid, 'Q' .. tid .. ':' .. queue)
local q = P .. 'qu:' .. queue
redis.call('LPUSH', q, raw)
touch(q)
return 1
""",
    # ARGV: sid ('' when this client has none). Deletes every key of the run when no
    # other session is live (expired ones do not count) -> {'purged', n}; else ends
    # this client's session and answers {'live', other live sessions}.
    "purge_last": """
local sid = ARGV[1]
local live = redis.call('ZCOUNT', P .. 'sess', '(' .. NOW, '+inf')
local mine = redis.call('ZSCORE', P .. 'sess', sid)
if mine and tonumber(mine) > NOW then live = live - 1 end
if live > 0 then
  if sid ~= '' then end_session(sid, 'member ' .. who(sid) .. ' left (client closed)') end
  return {'live', live}
end
local n, cursor = 0, '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', P .. '*', 'COUNT', 1000)
  cursor = page[1]
  for _, k in ipairs(page[2]) do n = n + redis.call('UNLINK', k) end
until cursor == '0'
return {'purged', n}
""",
    "status": """
local function all(key) return redis.call('HGETALL', P .. key) end
local once = {}
for _, sid in ipairs(redis.call('ZRANGE', P .. 'sess', 0, -1)) do
  for _, m in ipairs(redis.call('SMEMBERS', P .. 'h:' .. sid)) do
    if string.sub(m, 1, 1) == 'O' then
      local key = string.sub(m, 2)
      once[#once + 1] = key
      once[#once + 1] = redis.call('HGET', P .. 'o:' .. key, 'since') or '0'
      once[#once + 1] = sid
    end
  end
end
return {NOW, redis.call('ZRANGE', P .. 'sess', 0, -1, 'WITHSCORES'), all('sinfo'), all('hd'),
  all('tk'), all('lw'), redis.call('ZRANGE', P .. 'lexp', 0, -1, 'WITHSCORES'), once}
""",
    "stats": """
local live = redis.call('ZCOUNT', P .. 'exp', '(' .. NOW, '+inf')
return {live, redis.call('HLEN', P .. 'lw'), redis.call('ZCARD', P .. 'sess'),
  redis.call('HLEN', P .. 'hd'), redis.call('HLEN', P .. 'tk'), NOW}
""",
}

_FUNCTION = r"^((?:--[^\n]*\n)*)local function (\w+)\(.*?^end\n"
_TIMELESS: Final = ("delete", "push", "pop", "ack")


@functools.cache
def helpers() -> dict[str, str]:
    """Helper name -> its Lua source (with the comment above it), in definition order."""
    return {m[2]: m[0] for m in re.finditer(_FUNCTION, _HELPERS, re.M | re.S)}


def _calls(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.:]){name}\(", text) is not None


def assemble(body: str, timeless: bool = False) -> str:
    """The complete source of a script: its preludes and the helpers it needs."""
    known = helpers()
    needed: set[str] = set()
    pending = [body]
    while pending:
        text = pending.pop()
        for name, source in known.items():
            if name not in needed and _calls(text, name):
                needed.add(name)
                pending.append(source)
    used = "".join(source for name, source in known.items() if name in needed)
    return _KEY + ("" if timeless else _CLOCK) + _LOCALS + used + body


@functools.cache
def scripts() -> dict[str, str]:
    """Name -> complete Lua source; built on first use (not at import), registered once
    per client."""
    return {name: assemble(body, name in _TIMELESS) for name, body in _BODIES.items()}
