"""Lua scripts that make each job transition atomic and one round trip.

Why Lua: a submit must check the backlog and the idempotency key, write the record and append the
stream entry as one step; a final state must be written at most once (first writer wins) even when
a reclaimed batch runs a job twice.
"""

from __future__ import annotations

# KEYS: 3 streams of the model (high, normal, low), idempotency key or "", the caller's owner
# queue or "" (no per-key limit), the 3 due sets of the model (same order), then one job key per
# job.
# ARGV: max_queue, result_ttl_ms, idem_ttl_ms, body_hash, model, created_ms, n, per-key limit,
#       job key prefix, prune minimum, then per job 12 values: id, stream index (1..3),
#       expires_ms, rows, priority, input, owner, webhook, due_ms, deadline_ms or '',
#       webhook events ("final", "running,final", ...), the most rows that may be queued ahead
#       of it ('' for no limit: a job without a deadline); then the due sets' expiry slack
#       (ms); last, the submit's W3C traceparent ('' when not traced), copied into each stream
#       entry as field `tp` (see shared.tracing).
# A job's position is what is queued ahead of it in the batcher's order: every job of a higher
# priority and those of its own due no later. A job whose position is past its limit (it cannot
# make its deadline) fails the whole submit: {'unmeetable', index, position}.
# Returns {'ok', ids, positions} (both comma-joined).
# The owner queue counts the caller's queued jobs: members past their queue deadline go first;
# when the count says the limit is reached, the oldest members (at least the prune minimum) are
# checked against their records and those no longer queued dropped, so the count is exact
# where it matters and the work bounded.
SUBMIT = """
local max_queue = tonumber(ARGV[1])
local n = tonumber(ARGV[7])
if KEYS[4] ~= '' then
  local prior = redis.call('HMGET', KEYS[4], 'ids', 'hash')
  if prior[1] then return {'idem', prior[1], prior[2]} end
end
local depth = redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2]) + redis.call('XLEN', KEYS[3])
if depth + n > max_queue then return {'full', tostring(depth), 'model'} end
local okey = KEYS[5]
if okey ~= '' then
  local limit = tonumber(ARGV[8])
  redis.call('ZREMRANGEBYSCORE', okey, '-inf', ARGV[6])
  local count = redis.call('ZCARD', okey)
  if count + n > limit then
    for _, id in ipairs(redis.call('ZRANGE', okey, 0, math.max(tonumber(ARGV[10]), n) - 1)) do
      if redis.call('HGET', ARGV[9] .. id, 'status') ~= 'queued' then
        redis.call('ZREM', okey, id)
        count = count - 1
      end
    end
    if count + n > limit then return {'full', tostring(count), 'api_key'} end
  end
end
local function ahead(sidx, due)
  local count = redis.call('ZCOUNT', KEYS[5 + sidx], '-inf', due)
  for h = 1, sidx - 1 do count = count + redis.call('ZCARD', KEYS[5 + h]) end
  return count
end
for i = 0, n - 1 do
  local base = 11 + i * 12
  if ARGV[base + 11] ~= '' then
    local pos = ahead(tonumber(ARGV[base + 1]), ARGV[base + 8])
    if pos > tonumber(ARGV[base + 11]) then return {'unmeetable', i, pos} end
  end
end
local ids = {}
local positions = {}
local last = 0
local tp = ARGV[#ARGV]
local touched = {}
for i = 0, n - 1 do
  local base = 11 + i * 12
  local id, sidx, expires, rows = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  local skey = KEYS[sidx]
  local deadline = ARGV[base + 9]
  local f = {'job', id, 'rows', rows, 'exp', expires}
  if tp ~= '' then f[#f + 1] = 'tp'; f[#f + 1] = tp end
  if deadline ~= '' then f[#f + 1] = 'dl'; f[#f + 1] = deadline end
  local entry = redis.call('XADD', skey, '*', unpack(f))
  local jkey = KEYS[9 + i]
  redis.call('HSET', jkey, 'id', id, 'model', ARGV[5], 'status', 'queued', 'created_ms', ARGV[6],
    'expires_ms', expires, 'rows', rows, 'priority', ARGV[base + 4], 'input', ARGV[base + 5],
    'owner', ARGV[base + 6], 'webhook', ARGV[base + 7], 'stream', skey, 'entry', entry,
    'attempts', 0, 'due_ms', ARGV[base + 8], 'dueq', KEYS[5 + sidx], 'hooks', ARGV[base + 10])
  if deadline ~= '' then redis.call('HSET', jkey, 'deadline_ms', deadline) end
  redis.call('ZADD', KEYS[5 + sidx], tonumber(ARGV[base + 8]), id)
  touched[sidx] = true
  positions[#positions + 1] = ahead(sidx, ARGV[base + 8]) - 1
  redis.call('PEXPIREAT', jkey, tonumber(expires) + tonumber(ARGV[2]))
  -- i/1000 ms keeps a batch's jobs in submit order among equal deadlines (the prune's order)
  if okey ~= '' then redis.call('ZADD', okey, tonumber(expires) + i / 1000, id) end
  last = math.max(last, tonumber(expires))
  ids[#ids + 1] = id
end
-- A due set lives as long as its longest-lived queued job, plus a slack, so that the next
-- submits find its expiry far enough out and leave it alone.
for sidx in pairs(touched) do
  if redis.call('PTTL', KEYS[5 + sidx]) < last - tonumber(ARGV[6]) then
    redis.call('PEXPIREAT', KEYS[5 + sidx], last + tonumber(ARGV[#ARGV - 1]))
  end
end
if okey ~= '' then redis.call('PEXPIREAT', okey, last) end
local joined = table.concat(ids, ',')
if KEYS[4] ~= '' then
  redis.call('HSET', KEYS[4], 'ids', joined, 'hash', ARGV[4])
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[3]))
end
return {'ok', joined, table.concat(positions, ',')}
"""

# One call per batch. KEYS: the batch's job keys. ARGV: now_ms, worker, device, group, consumer
# (the worker's own), solo ("1" when the batch is one suspect job run alone), max solo deaths,
# attempt cap, running channel, webhook stream, webhook stream cap, batch id ('' for none).
# A call repeated for the same batch by the same consumer (its reply was lost to a connection
# that broke after Redis ran it) answers 'run' again and changes nothing: a Redis outage is not
# an attempt.
# A job whose deadline passed before it starts is not run ({'skip', 'deadline'}). A started job
# leaves its due set; if it is watched (an SSE client) its id is published on the running
# channel, and a webhook that asked for "running" gets an entry.
# A job runs only if its stream entry is still pending on this worker's consumer: a batch whose
# entries were taken back (its worker was declared dead, or a newer dispatch moved them) is never
# started by a late worker. A job run alone that took its worker down `max solo deaths` times
# is poison; runs inside a group never count towards that, so batch mates are not charged.
# Returns, per job: {'run', attempts, input, created_ms} | {'poison', attempts} | {'skip', status}
# | {'moved'} | {'missing'}.
START = """
local out = {}
local solo = ARGV[6] == '1'
for i, key in ipairs(KEYS) do
  local st = redis.call('HMGET', key, 'status', 'expires_ms', 'stream', 'entry', 'attempts',
    'solo', 'deadline_ms', 'batch')
  if not st[1] then
    out[i] = {'missing'}
  elseif st[1] ~= 'queued' and st[1] ~= 'running' then
    out[i] = {'skip', st[1]}
  elseif st[1] == 'queued' and tonumber(st[2]) <= tonumber(ARGV[1]) then
    out[i] = {'skip', 'expired'}
  elseif st[1] == 'queued' and st[7] and tonumber(st[7]) <= tonumber(ARGV[1]) then
    out[i] = {'skip', 'deadline'}
  else
    local owner = nil
    if st[3] then
      local p = redis.call('XPENDING', st[3], ARGV[4], st[4], st[4], 1)
      if p[1] then owner = p[1][2] end
    end
    if owner ~= ARGV[5] then
      out[i] = {'moved'}
    elseif st[1] == 'running' and ARGV[12] ~= '' and st[8] == ARGV[12] then
      local rec = redis.call('HMGET', key, 'input', 'created_ms')
      out[i] = {'run', tonumber(st[5]), rec[1], rec[2]}
    elseif (solo and tonumber(st[6] or '0') >= tonumber(ARGV[7]))
        or tonumber(st[5] or '0') >= tonumber(ARGV[8]) then
      out[i] = {'poison', tonumber(st[5] or '0')}
    else
      -- From here the worker refreshes the entry on every beat; start its idle time now.
      redis.call('XCLAIM', st[3], ARGV[4], ARGV[5], 0, st[4], 'JUSTID')
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      if solo then redis.call('HINCRBY', key, 'solo', 1) end
      redis.call('HSET', key, 'status', 'running', 'started_ms', ARGV[1], 'worker', ARGV[2],
        'device', ARGV[3], 'batch', ARGV[12])
      local rec = redis.call('HMGET', key, 'input', 'created_ms', 'dueq', 'id', 'watch', 'hooks',
        'webhook')
      if rec[3] then redis.call('ZREM', rec[3], rec[4]) end
      if rec[5] then redis.call('PUBLISH', ARGV[9], rec[4]) end
      if rec[7] and rec[7] ~= '' and rec[6] and string.find(rec[6], 'running', 1, true) then
        redis.call('XADD', ARGV[10], 'MAXLEN', '~', ARGV[11], '*', 'job', rec[4], 'event',
          'running')
      end
      out[i] = {'run', attempts, rec[1], rec[2]}
    end
  end
end
return out
"""

# One call per batch. KEYS[1]: webhook stream, then one job key per job.
# ARGV: ttl_ms, channel, group, stats key prefix, webhook stream cap, publish cap (bytes of
# output), fence key ('' for none), fence token, then per job: status, n, and n field/value
# pairs.
# Writes each final state unless one is already there, then acks and deletes the job's stream
# entry either way (the entry's work is over). The publish carries "id\n" + the record as JSON
# (no input) so a long-poll answers without reading it back; only the id past the cap.
# With a fence (the batcher's own writes: shed, expired), nothing happens unless the lease still
# holds the token. Returns per job 1 written, 0 already final, -1 record gone; or 'fenced'.
FINISH = """
if ARGV[7] ~= '' and redis.call('GET', ARGV[7]) ~= ARGV[8] then return 'fenced' end
local out = {}
local a = 9
for k = 2, #KEYS do
  local key = KEYS[k]
  local status, n = ARGV[a], tonumber(ARGV[a + 1])
  local first, last = a + 2, a + 1 + 2 * n
  a = last + 1
  local cur = redis.call('HMGET', key, 'status', 'stream', 'entry')
  if not cur[1] then
    out[k - 1] = -1
  else
    out[k - 1] = 0
    if cur[1] == 'queued' or cur[1] == 'running' then
      redis.call('HSET', key, 'status', status, unpack(ARGV, first, last))
      redis.call('HDEL', key, 'input')
      local flat = redis.call('HGETALL', key)
      local rec = {}
      for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
      redis.call('HINCRBY', ARGV[4] .. rec['model'], status, 1)
      redis.call('PEXPIRE', key, tonumber(ARGV[1]))
      if #(rec['output'] or '') <= tonumber(ARGV[6]) then
        redis.call('PUBLISH', ARGV[2], rec['id'] .. '\\n' .. cjson.encode(rec))
      else
        redis.call('PUBLISH', ARGV[2], rec['id'])
      end
      -- A running job left its due set when it started (START).
      if rec['dueq'] and cur[1] == 'queued' then redis.call('ZREM', rec['dueq'], rec['id']) end
      if rec['webhook'] and rec['webhook'] ~= ''
          and string.find(rec['hooks'] or 'final', 'final', 1, true) then
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'job', rec['id'])
      end
      out[k - 1] = 1
    end
    if cur[2] then
      redis.call('XACK', cur[2], ARGV[3], cur[3])
      redis.call('XDEL', cur[2], cur[3])
    end
  end
end
return out
"""

# KEYS: job key, webhook stream. ARGV: owner, now_ms, ttl_ms, channel, group, stats prefix,
# cancel channel prefix, webhook stream cap.
# Returns {'ok'} | {'final', status} | {'missing'}.
CANCEL = """
local cur = redis.call('HMGET', KEYS[1], 'status', 'owner', 'stream', 'entry', 'id', 'model',
  'webhook', 'hooks', 'dueq')
if not cur[1] or cur[2] ~= ARGV[1] then return {'missing'} end
if cur[1] ~= 'queued' and cur[1] ~= 'running' then return {'final', cur[1]} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_ms', ARGV[2],
  'error', '{"type":"canceled","message":"canceled by the client"}')
redis.call('HDEL', KEYS[1], 'input')
redis.call('HINCRBY', ARGV[6] .. cur[6], 'canceled', 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], cur[5])
-- A running job left its due set when it started (START).
if cur[9] and cur[1] == 'queued' then redis.call('ZREM', cur[9], cur[5]) end
if cur[7] and cur[7] ~= '' and string.find(cur[8] or 'final', 'final', 1, true) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'job', cur[5])
end
if cur[3] then
  redis.call('XACK', cur[3], ARGV[5], cur[4])
  redis.call('XDEL', cur[3], cur[4])
  redis.call('PUBLISH', ARGV[7] .. cur[6], cur[5])
end
return {'ok'}
"""

# An SSE client follows a job. KEYS: job key. ARGV: owner. Marks the job watched (its start is
# then published) and returns its record, or {} when there is no such job for this owner. A
# record never gets the mark after it expired (no stray hash is created).
WATCH = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner or owner ~= ARGV[1] then return {} end
redis.call('HSET', KEYS[1], 'watch', '1')
return redis.call('HGETALL', KEYS[1])
"""

# The batcher's lease on a model, with fencing. KEYS: lease, epoch counter. ARGV: holder, ttl_ms.
# A new term takes the next epoch; the lease's value "holder/epoch" is the token every fenced
# script compares, so a batcher whose term ended can no longer change anything.
# Returns the token, or false when another batcher holds the lease.
LEASE_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = ARGV[1] .. '/' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: token, ttl_ms. Extends the lease only within the same term.
LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token.
LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Dispatch one batch to one worker, fenced. KEYS: lease, the worker's Celery queue, then the
# model's streams. ARGV: token, group, worker consumer, Celery message, the batcher's own
# consumer, then pairs (stream index in KEYS, entry id). In one step: check the term, move the
# entries the batcher holds to the worker's consumer (entries it no longer holds, i.e. canceled
# or already handed to a worker by a dispatch whose reply was lost, are left out), and push the
# task message onto the worker's queue, so an entry is never owned by a worker that has no
# message for it. Returns {'fenced'} | {'empty'} | {'ok', claimed id, ...} (ids as
# "stream index/entry id").
DISPATCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'fenced'} end
local by_stream = {}
for i = 6, #ARGV, 2 do
  local s, id = tonumber(ARGV[i]), ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[s], ARGV[2], id, id, 1)
  if p[1] and p[1][2] == ARGV[5] then
    by_stream[s] = by_stream[s] or {}
    table.insert(by_stream[s], id)
  end
end
local out = {'ok'}
for s, ids in pairs(by_stream) do
  local got = redis.call('XCLAIM', KEYS[s], ARGV[2], ARGV[3], 0, unpack(ids))
  for _, e in ipairs(got) do
    if e[2] then table.insert(out, s .. '/' .. e[1]) end
  end
end
if #out == 1 then return {'empty'} end
redis.call('LPUSH', KEYS[2], ARGV[4])
return out
"""

# Take over, fenced, what nobody alive holds. KEYS: lease, then the model's streams.
# ARGV: token, group, this batcher's consumer, worker consumer prefix, liveness key prefix,
# stale_ms.
# A consumer is gone when it is another batcher's (only the lease holder reads a model's
# streams; this includes the pre-1.0 in-flight consumer) or a worker's whose liveness key
# expired. Its entries are claimed by this batcher and the consumer deleted, in one step:
# nothing read in between can be dropped from the pending list. A live worker keeps the entries
# it works on fresh (see REFRESH); only its entries idle for `stale_ms` are claimed (a batch it
# gave up on). Returns {'fenced'} or {'ok', then per claimed entry: stream index, former
# consumer, id, fields (flat)}.
TAKEOVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'fenced'} end
local out = {'ok'}
local prefix = ARGV[4]
local function claim(s, name, ids)
  if #ids == 0 then return end
  local got = redis.call('XCLAIM', KEYS[s], ARGV[2], ARGV[3], 0, unpack(ids))
  for _, e in ipairs(got) do
    if e[2] then
      table.insert(out, s - 1)
      table.insert(out, name)
      table.insert(out, e[1])
      table.insert(out, e[2])
    end
  end
end
for s = 2, #KEYS do
  local infos = redis.call('XINFO', 'CONSUMERS', KEYS[s], ARGV[2])
  for _, info in ipairs(infos) do
    local name, pending = nil, 0
    for i = 1, #info, 2 do
      if info[i] == 'name' then name = info[i + 1] end
      if info[i] == 'pending' then pending = tonumber(info[i + 1]) end
    end
    local worker = string.sub(name, 1, #prefix) == prefix
    local gone = name ~= ARGV[3] and not (worker and
      redis.call('EXISTS', ARGV[5] .. string.sub(name, #prefix + 1)) == 1)
    if gone then
      while pending > 0 do
        local p = redis.call('XPENDING', KEYS[s], ARGV[2], '-', '+', 1000, name)
        if #p == 0 then break end
        local ids = {}
        for _, row in ipairs(p) do table.insert(ids, row[1]) end
        claim(s, name, ids)
        pending = pending - #p
      end
      redis.call('XGROUP', 'DELCONSUMER', KEYS[s], ARGV[2], name)
    elseif worker and pending > 0 then
      local p = redis.call('XPENDING', KEYS[s], ARGV[2], 'IDLE', ARGV[6], '-', '+', 1000, name)
      local ids = {}
      for _, row in ipairs(p) do table.insert(ids, row[1]) end
      claim(s, name, ids)
    end
  end
end
return out
"""

# A worker keeps the entries it works on fresh, on every heartbeat. KEYS: the model's streams.
# ARGV: group, the worker's consumer, then pairs (stream index in KEYS, entry id). Only entries
# it still owns are touched (never taken back from whoever holds them now). Returns the pairs
# "index/id" it no longer owns.
REFRESH = """
local lost = {}
for i = 3, #ARGV, 2 do
  local s, id = tonumber(ARGV[i]), ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[s], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[s], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, s .. '/' .. id)
  end
end
return lost
"""
