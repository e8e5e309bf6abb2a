"""Lua scripts that make each job transition atomic and one round trip.

Why Lua: a submit must check the backlog and the idempotency key, write the record and append the
stream entry as one step; a final state must be written at most once (first writer wins) even when
a reclaimed batch runs a job twice.
"""

from __future__ import annotations

# KEYS: 3 streams of the model (high, normal, low), idempotency key or "", the caller's owner
# queue or "" (no per-key limit), then one job key per job.
# ARGV: max_queue, result_ttl_ms, idem_ttl_ms, body_hash, model, created_ms, n, per-key limit,
#       job key prefix, prune minimum, then per job 8 values: id, stream index (1..3),
#       expires_ms, rows, priority, input, owner, webhook
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
local ids = {}
local last = 0
for i = 0, n - 1 do
  local base = 11 + i * 8
  local id, sidx, expires, rows = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  local skey = KEYS[sidx]
  local entry = redis.call('XADD', skey, '*', 'job', id, 'rows', rows, 'exp', expires)
  local jkey = KEYS[6 + i]
  redis.call('HSET', jkey, 'id', id, 'model', ARGV[5], 'status', 'queued', 'created_ms', ARGV[6],
    'expires_ms', expires, 'rows', rows, 'priority', ARGV[base + 4], 'input', ARGV[base + 5],
    'owner', ARGV[base + 6], 'webhook', ARGV[base + 7], 'stream', skey, 'entry', entry,
    'attempts', 0)
  redis.call('PEXPIREAT', jkey, tonumber(expires) + tonumber(ARGV[2]))
  -- i/1000 ms keeps a batch's jobs in submit order among equal deadlines (the prune's order)
  if okey ~= '' then redis.call('ZADD', okey, tonumber(expires) + i / 1000, id) end
  last = math.max(last, tonumber(expires))
  ids[#ids + 1] = id
end
if okey ~= '' then redis.call('PEXPIREAT', okey, last) end
local joined = table.concat(ids, ',')
if KEYS[4] ~= '' then
  redis.call('HSET', KEYS[4], 'ids', joined, 'hash', ARGV[4])
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[3]))
end
return {'ok', joined}
"""

# One call per batch. KEYS: the batch's job keys. ARGV: now_ms, worker, device, max_attempts.
# Returns, per job: {'run', attempts, input, created_ms} | {'poison', attempts} | {'skip', status}
# | {'missing'}.
START = """
local out = {}
for i, key in ipairs(KEYS) do
  local st = redis.call('HMGET', key, 'status', 'expires_ms')
  if not st[1] then
    out[i] = {'missing'}
  elseif st[1] ~= 'queued' and st[1] ~= 'running' then
    out[i] = {'skip', st[1]}
  elseif st[1] == 'queued' and tonumber(st[2]) <= tonumber(ARGV[1]) then
    out[i] = {'skip', 'expired'}
  else
    local attempts = redis.call('HINCRBY', key, 'attempts', 1)
    if attempts > tonumber(ARGV[4]) then
      out[i] = {'poison', attempts}
    else
      redis.call('HSET', key, 'status', 'running', 'started_ms', ARGV[1], 'worker', ARGV[2],
        'device', ARGV[3])
      local rec = redis.call('HMGET', key, 'input', 'created_ms')
      out[i] = {'run', attempts, rec[1], rec[2]}
    end
  end
end
return out
"""

# One call per batch. KEYS[1]: webhook stream, then one job key per job.
# ARGV: ttl_ms, channel, group, stats key prefix, webhook stream cap, publish cap (bytes of
# output), then per job: status, n, and n field/value pairs.
# Writes each final state unless one is already there, then acks and deletes the job's stream
# entry either way (the entry's work is over). The publish carries "id\n" + the record as JSON
# (no input) so a long-poll answers without reading it back; only the id past the cap.
# Returns per job 1 written, 0 already final, -1 record gone.
FINISH = """
local out = {}
local a = 7
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
      if rec['webhook'] and rec['webhook'] ~= '' then
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
local cur = redis.call('HMGET', KEYS[1], 'status', 'owner', 'stream', 'entry', 'id')
if not cur[1] or cur[2] ~= ARGV[1] then return {'missing'} end
if cur[1] ~= 'queued' and cur[1] ~= 'running' then return {'final', cur[1]} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_ms', ARGV[2],
  'error', '{"type":"canceled","message":"canceled by the client"}')
redis.call('HDEL', KEYS[1], 'input')
redis.call('HINCRBY', ARGV[6] .. redis.call('HGET', KEYS[1], 'model'), 'canceled', 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], cur[5])
local hook = redis.call('HGET', KEYS[1], 'webhook')
if hook and hook ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'job', cur[5])
end
if cur[3] then
  redis.call('XACK', cur[3], ARGV[5], cur[4])
  redis.call('XDEL', cur[3], cur[4])
  redis.call('PUBLISH', ARGV[7] .. redis.call('HGET', KEYS[1], 'model'), cur[4])
end
return {'ok'}
"""
