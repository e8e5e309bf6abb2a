"""Worker claims: how autoscalers on several hosts share one model's desired worker count.

Before it starts a worker, an autoscaler claims a slot for the worker's name in the model's
claims hash in Redis; a Lua script admits the claim only while the live claims of every host
are below the desired count it computed, so all hosts together never start more than desired
(and so never more than `max_workers`), even when they decide at the same instant. A scale-down
turns a slot into a draining one only while the serving claims are above the desired count, so
two hosts that both see a lull remove one worker, not one each. A draining claim no longer counts
as serving, yet still holds its slot against new claims until its autoscaler sees the process
exit: a worker finishing its last batches is a process that exists, and a new one started
meanwhile on another host would pass `max_workers`. Claims expire unless their autoscaler
refreshes them (each pass), so a dead autoscaler's slots come back within `keys.CLAIM_TTL_S`.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from shared import keys

# KEYS[1] claims hash: name -> expiry_ms, negated for a draining worker's claim.
# ARGV: now_ms, name, limit, expiry_ms, mode ('claim' | 'release').
# Prunes expired claims, counts the others (not `name`), then: claim -> add `name` if the
# count (draining claims included: their processes still run) is below `limit`; release ->
# mark `name` draining if the serving count with it is above `limit`.
_CLAIM = """
local now = tonumber(ARGV[1])
local name = ARGV[2]
local limit = tonumber(ARGV[3])
local claiming = ARGV[5] == 'claim'
local flat = redis.call('HGETALL', KEYS[1])
local others = 0
local mine = false
for i = 1, #flat, 2 do
  local expiry = tonumber(flat[i + 1])
  if math.abs(expiry) <= now then
    redis.call('HDEL', KEYS[1], flat[i])
  elseif flat[i] == name then
    mine = expiry > 0
  elseif claiming or expiry > 0 then
    others = others + 1
  end
end
if claiming then
  if others < limit then
    redis.call('HSET', KEYS[1], name, ARGV[4])
    return 1
  end
  return 0
end
if mine and others + 1 > limit then
  redis.call('HSET', KEYS[1], name, -tonumber(ARGV[4]))
  return 1
end
return 0
"""

# A live worker keeps its claim even if it lapsed (Redis was away longer than the TTL): the
# claims count workers that exist, so a lapse never lets another host start one too many.


def _now_ms() -> int:
    return int(time.time() * 1000)


class Claims:
    """The claims of one autoscaler, for every model it serves."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float = keys.CLAIM_TTL_S) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self._claim = redis.register_script(_CLAIM)

    async def claim(self, model: str, name: str, desired: int) -> bool:
        """Take a slot for worker `name` if the model's live claims are below `desired`."""
        now = _now_ms()
        return bool(await self._claim(keys=[keys.worker_claims(model)],
                                      args=[now, name, desired, now + self.ttl_ms, "claim"]))

    async def release_above(self, model: str, name: str, desired: int) -> bool:
        """Mark `name`'s slot draining only while the serving claims exceed `desired`: it no
        longer serves, and holds its slot until `release` (its process exited)."""
        now = _now_ms()
        return bool(await self._claim(keys=[keys.worker_claims(model)],
                                      args=[now, name, desired, now + self.ttl_ms, "release"]))

    async def release(self, model: str, name: str) -> None:
        """The worker's process is gone: its slot is free."""
        await self.redis.hdel(keys.worker_claims(model), name)

    async def refresh(self, model: str, names: list[str],
                      draining: list[str] | None = None) -> list[str]:
        """Extend the claims of this autoscaler's live workers `names` and of its `draining`
        ones (still running); returns the model's serving claims (all hosts)."""
        now = _now_ms()
        expiry = now + self.ttl_ms
        drained = set(draining or ())
        pipe = self.redis.pipeline(transaction=False)
        if names or drained:
            pipe.hset(keys.worker_claims(model), mapping={
                n: -expiry if n in drained else expiry for n in [*names, *drained]})
        pipe.hgetall(keys.worker_claims(model))
        raw: dict[str, str] = (await pipe.execute())[-1]
        return [str(n) for n, expiry_ms in raw.items() if int(expiry_ms) > now]
