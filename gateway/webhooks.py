"""Webhook delivery: POST each finished job's public JSON to the URL it was submitted with.

FINISH and CANCEL (shared/scripts.py) append `{job: id}` to `keys.webhooks()` for jobs with a
webhook. One `WebhookDeliverer` per gateway process reads it in a consumer group. An entry stays
pending until delivered or given up; a dead deliverer's entries are reclaimed (XAUTOCLAIM), and
as attempts and the next due time live in Redis, a reclaimed entry keeps its schedule. Delivery
never touches the job record. Bodies are signed as Standard Webhooks specifies
(standardwebhooks.com): `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64
HMAC-SHA256 of "<id>.<timestamp>.<body>">`, so receivers verify with any of its libraries (or
`verify_signature` here). Every connection goes through the address policy
(gateway.webhook_targets): no private, loopback or metadata targets unless allow-listed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import time
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.webhook_targets import TargetPolicy, guarded_client, refused
from shared import keys
from shared.jobs import FINAL_STATUSES, from_hash, now_ms
from shared.settings import Settings

log = logging.getLogger(__name__)

READ_BLOCK_S = 2.0  # longest XREADGROUP block; the client's socket timeout must exceed it
MAX_HELD = 1000  # entries one deliverer holds (due, backing off, in flight); the rest stay in Redis
STALE_CONSUMER_S = 3600  # consumers of gone gateways, with nothing pending, are dropped after this
REDIS_RETRY_S = 1.0  # pause after a Redis error before the next try
SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: base64 after `whsec_` (the Standard Webhooks form, what
    `asyncinfer up` generates and receivers' libraries expect); any other text as UTF-8."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            pass
    return secret.encode()


def sign(secrets: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,<base64>` per secret (several during a rotation),
    separated by spaces."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), message, hashlib.sha256).digest())
        .decode() for s in secrets.split())


def signed_headers(secrets: str, msg_id: str, body: bytes,
                   timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`, stamped `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(t),
            "webhook-signature": sign(secrets, msg_id, t, body)}


def verify_signature(secret: str, headers: dict[str, str], body: bytes | str,
                     tolerance_s: float = 300.0, *, now: float | None = None) -> bool:
    """Whether `headers` (webhook-id, webhook-timestamp, webhook-signature; any case) sign
    `body` with `secret` and were stamped within `tolerance_s` of now. Pass the raw body as
    received (re-serialised JSON has other bytes)."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp = h.get("webhook-id", ""), h.get("webhook-timestamp", "")
    current = time.time() if now is None else now
    if not msg_id or not stamp.isdigit() or abs(current - int(stamp)) > tolerance_s:
        return False  # the tolerance is what makes a captured request useless for replays
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, msg_id, int(stamp), raw).split()[0].partition(",")[2]
    given = [sig.partition(",")[2] for sig in h.get("webhook-signature", "").split()
             if sig.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


def delivery_of(fields: dict[str, str]) -> str:
    """What a webhook stream entry asks for: the job id for its final state, `id#running` for
    its start (`webhook_events`). State and locks are per delivery."""
    event = fields.get("event", "final")
    job = fields.get("job", "")
    return job if event == "final" else f"{job}#{event}"


class WebhookDeliverer:
    """Delivers the webhooks stream in one gateway process: `start()`, later `await stop()`."""

    def __init__(self, redis: aioredis.Redis, settings: Settings,
                 policy: TargetPolicy | None = None) -> None:
        self.redis = redis  # its socket timeout must exceed READ_BLOCK_S (redisconn.connect)
        self.s = settings
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.http = guarded_client(
            policy or TargetPolicy(settings.webhook_allow), timeout_s=settings.webhook_timeout_s,
            max_connections=settings.webhook_concurrency,
            headers={"user-agent": "asyncinfer-webhooks/0.1"})
        self.stream = keys.webhooks()
        self.idle_ms = int(settings.reclaim_idle_s * 1000)  # entries idle this long are orphans
        self._held: dict[str, str] = {}  # entry id -> job id: every entry this deliverer owns
        self._due: dict[str, float] = {}  # entry id -> loop time of its next attempt
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()  # an entry arrived or a delivery ended
        self._room = asyncio.Event()  # an entry was released: the reader may read more
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # loops check it: redis-py can swallow a cancel (3.11 wait_for)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-deliverer")

    async def stop(self) -> None:
        """Stop reading and posting; hand held entries to the other deliverers at once."""
        self._stopping = True
        self._wake.set()
        self._room.set()
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # a swallowed cancellation still ends at the next loop check, bounded
            await asyncio.wait(tasks, timeout=READ_BLOCK_S + 1)
        with contextlib.suppress(RedisError, OSError):
            if self._held:  # IDLE makes them look abandoned now, not after reclaim_idle_s
                await self.redis.xclaim(self.stream, keys.WEBHOOK_GROUP, self.consumer, 0,
                                        list(self._held), idle=self.idle_ms, justid=True)
        await self.http.aclose()
        await self.redis.aclose()
        log.info("webhook deliverer stopped consumer=%s handed_off=%d", self.consumer,
                 len(self._held))

    async def _run(self) -> None:
        log.info("webhook deliverer started consumer=%s concurrency=%d max_attempts=%d",
                 self.consumer, self.s.webhook_concurrency, self.s.webhook_max_attempts)
        while not self._stopping:
            try:
                with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                    await self.redis.xgroup_create(self.stream, keys.WEBHOOK_GROUP, id="0",
                                                   mkstream=True)
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._read_loop())
                    group.create_task(self._schedule_loop())
            except* (RedisError, OSError) as errors:
                if not self._stopping:
                    log.warning("webhook deliverer reconnecting error=%r", errors.exceptions[0])
                    await asyncio.sleep(REDIS_RETRY_S)
            except* Exception:  # a bug: say so in the log (the task is kept, nobody awaits it)
                log.exception("webhook deliverer crashed consumer=%s", self.consumer)
                raise

    def _hold(self, entry_id: str, job_id: str, delay_s: float) -> None:
        if entry_id not in self._held:
            self._held[entry_id] = job_id
            self._due[entry_id] = asyncio.get_running_loop().time() + delay_s
            self._wake.set()

    async def _read_loop(self) -> None:
        while not self._stopping:
            self._room.clear()
            if len(self._held) >= MAX_HELD:  # backpressure: the backlog stays in the stream
                await self._room.wait()
                continue
            reply: Any = await self.redis.xreadgroup(
                keys.WEBHOOK_GROUP, self.consumer, {self.stream: ">"},
                count=min(100, MAX_HELD - len(self._held)), block=int(READ_BLOCK_S * 1000))
            batches = reply.values() if isinstance(reply, dict) else [e for _, e in reply or []]
            for entries in batches:
                for entry_id, fields in entries:
                    self._hold(entry_id, delivery_of(fields or {}), 0.0)

    async def _schedule_loop(self) -> None:
        loop = asyncio.get_running_loop()
        upkeep_every_s = max(0.2, self.s.reclaim_idle_s / 3)
        next_upkeep = 0.0
        while True:
            if loop.time() >= next_upkeep:
                await self._upkeep()
                next_upkeep = loop.time() + upkeep_every_s
            if self._stopping:  # checked after the awaits, right before clearing the event
                return
            self._wake.clear()
            now = loop.time()
            for entry_id, due in sorted(self._due.items(), key=lambda kv: kv[1]):
                if due > now or len(self._inflight) >= self.s.webhook_concurrency:
                    break
                del self._due[entry_id]
                self._inflight[entry_id] = asyncio.create_task(
                    self._deliver(entry_id, self._held[entry_id]))
            # With every slot busy only a finished delivery (the event) can start another.
            free = len(self._inflight) < self.s.webhook_concurrency
            until = min([next_upkeep, *(self._due.values() if free else ())])
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, until - loop.time())):
                    await self._wake.wait()

    async def _upkeep(self) -> None:
        """Keep our entries from looking idle, take over idle ones of dead deliverers, and drop
        consumers of gateways long gone."""
        held: list[Any] = list(self._held)
        for i in range(0, len(held), 500):
            await self.redis.xclaim(self.stream, keys.WEBHOOK_GROUP, self.consumer, 0,
                                    held[i:i + 500], justid=True)
        room = MAX_HELD - len(self._held)
        if room > 0:  # at most 100 a round: the next round takes more
            reply: Any = await self.redis.xautoclaim(
                self.stream, keys.WEBHOOK_GROUP, self.consumer, self.idle_ms, "0-0",
                count=min(100, room))
            claimed = [(i, f) for i, f in reply[1] if f]  # f is None for a deleted entry
            pipe = self.redis.pipeline(transaction=False)
            for _, fields in claimed:
                pipe.hget(keys.webhook_delivery(delivery_of(fields)), "next_ms")
            for (entry_id, fields), next_ms in zip(claimed, await pipe.execute(), strict=True):
                # The schedule lives in Redis: a reclaimed entry waits out its current delay.
                self._hold(entry_id, delivery_of(fields),
                           max(0.0, (int(next_ms or 0) - now_ms()) / 1000))
            if claimed:
                log.info("webhook entries reclaimed consumer=%s count=%d", self.consumer,
                         len(claimed))
        for c in await self.redis.xinfo_consumers(self.stream, keys.WEBHOOK_GROUP):
            if (c["name"] != self.consumer and int(c["pending"]) == 0
                    and int(c["idle"]) > STALE_CONSUMER_S * 1000):
                await self.redis.xgroup_delconsumer(self.stream, keys.WEBHOOK_GROUP, c["name"])

    async def _deliver(self, entry_id: str, job_id: str) -> None:
        delay: float | None
        try:
            delay = await self._attempt(entry_id, job_id)
            if delay is None:
                await self._release(entry_id, job_id)
        except Exception as exc:  # even a bug must not strand the entry (attempts are bounded)
            delay = REDIS_RETRY_S
            log.warning("webhook attempt deferred job=%s error=%r", job_id, exc,
                        exc_info=not isinstance(exc, RedisError | OSError))
        finally:
            self._inflight.pop(entry_id, None)
            self._wake.set()
        if delay is None:
            del self._held[entry_id]
            self._room.set()
        else:
            self._due[entry_id] = asyncio.get_running_loop().time() + delay

    async def _attempt(self, entry_id: str, job_id: str) -> float | None:
        """At most one POST; returns the delay before the next one, or None when the entry is
        done (delivered, given up, or nothing left to deliver)."""
        lock = keys.webhook_lock(job_id)
        lock_ms = int((self.s.webhook_timeout_s + 5) * 1000)
        if not await self.redis.set(lock, self.consumer, nx=True, px=lock_ms):
            return self.s.webhook_timeout_s  # another deliverer is posting it right now
        try:
            return await self._post(entry_id, job_id)
        finally:
            await self.redis.delete(lock)

    async def _post(self, entry_id: str, delivery: str) -> float | None:
        job_id, _, event = delivery.partition("#")
        event = event or "final"
        state = keys.webhook_delivery(delivery)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.hget(state, "done")
        # Counted before the POST, so an attempt cut short by a crash still counts.
        pipe.hincrby(state, "attempts", 1)
        pipe.expire(state, keys.WEBHOOK_STATE_TTL_S)
        fields, done, attempts, _ = await pipe.execute()
        if done:
            return None
        url, cap = fields.get("webhook"), self.s.webhook_max_attempts
        # A final event needs a final record; a running one, a started job (expired: gone).
        status = fields.get("status")
        gone = not url or (status not in FINAL_STATUSES and not (
            event == "running" and status == "running"))
        if gone or attempts > cap:  # > cap: a holder that died used up the attempts
            log.warning("webhook gave up job=%s attempts=%d reason=%s", job_id, attempts - 1,
                        "job_gone" if gone else "attempts_exhausted")
            return None
        if not self.s.webhook_secret.strip():
            log.warning("webhook gave up job=%s reason=no_secret", job_id)
            return None
        body = json.dumps(from_hash(fields).public(), separators=(",", ":")).encode()
        # webhook-id stays the same across retries: receivers deduplicate on it. A "running"
        # event carries the job as it is when delivered (it may have finished meanwhile).
        msg_id = f"msg_{job_id}" if event == "final" else f"msg_{job_id}_{event}"
        headers = {"content-type": "application/json",
                   **signed_headers(self.s.webhook_secret, msg_id, body),
                   "x-asyncinfer-job": job_id, "x-asyncinfer-event": event,
                   "x-asyncinfer-attempt": str(attempts)}
        started, retry_after = time.monotonic(), "0"
        try:  # the whole attempt is bounded (not each phase), so the lock outlives it
            async with asyncio.timeout(self.s.webhook_timeout_s), self.http.stream(
                    "POST", url, content=body, headers=headers) as response:
                code, detail = response.status_code, f"status={response.status_code}"
                # 408, 429 and 5xx may pass; any other answer (3xx, 4xx) will not change.
                verdict = "delivered" if 200 <= code < 300 else "retry" if code in (
                    408, 429) or code >= 500 else "final"
                retry_after = response.headers.get("retry-after", "0")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            verdict, detail = "final", f"error={type(exc).__name__}"
        except (httpx.HTTPError, TimeoutError) as exc:  # the receiver may recover
            verdict, detail = "retry", f"error={type(exc).__name__}"
            if refused(exc):  # the address policy: no retry changes that
                verdict, detail = "final", f"refused={exc}"
        took_ms = (time.monotonic() - started) * 1000
        if verdict == "delivered":
            log.info("webhook delivered job=%s attempt=%d %s ms=%.0f", job_id, attempts, detail,
                     took_ms)
            return None
        if verdict == "retry" and attempts < cap:
            delay = self._backoff(attempts, retry_after)
            await self.redis.hset(state, "next_ms", now_ms() + int(delay * 1000))
            log.info("webhook retry job=%s attempt=%d/%d %s delay_s=%.2f", job_id, attempts, cap,
                     detail, delay)
            return delay
        log.warning("webhook gave up job=%s attempts=%d %s", job_id, attempts, detail)
        return None

    def _backoff(self, attempts: int, retry_after: str) -> float:
        cap = self.s.webhook_max_backoff_s
        delay = min(cap, self.s.webhook_backoff_s * 2 ** (attempts - 1))
        # Retry-After in seconds is a floor; its HTTP-date form is left to the schedule.
        floor_s = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 0.0
        # Jitter spreads the retries of many jobs that failed together (one receiver outage).
        return float(min(cap, max(floor_s, delay * random.uniform(0.5, 1.0))))

    async def _release(self, entry_id: str, job_id: str) -> None:
        state = keys.webhook_delivery(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, keys.WEBHOOK_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.hset(state, "done", 1)
        pipe.expire(state, keys.WEBHOOK_DONE_TTL_S)
        await pipe.execute()
