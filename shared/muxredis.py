"""One Redis connection shared by every request of a process, commands pipelined on it.

Why not redis-py here: on the gateway's hot path (a submit's Lua call, a job read) redis-py's
per-command machinery (pool checkout under a lock, a timeout context, retry wrapper, command
packing in Python, health checks) cost about a third of the gateway's CPU per job, more than
the HTTP handling. Redis answers the commands of one connection in order, so many concurrent
callers can share it: each command is packed by hiredis in C, written with the others of the
same event-loop iteration in one send, and its reply resolves the oldest waiting future.

Errors are redis-py's exception types, so callers and the gateway's error handlers treat both
clients alike. A connection that fails or stalls past the timeout fails every command waiting on
it (their order is lost) and the next command reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import parse_url

log = logging.getLogger(__name__)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: MuxRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(encoding="utf-8", replyError=rx.ResponseError)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.owner._pending
        while (reply := self.reader.gets()) is not False:
            if not pending:  # a reply nobody waits for: the stream is out of step
                self.owner._fail(rx.ConnectionError("unexpected reply from Redis"))
                return
            fut = pending.popleft()[0]
            if not fut.done():
                if isinstance(reply, rx.ResponseError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class MuxRedis:
    """A pipelined asyncio client for plain commands and scripts (no pub/sub, no blocking
    reads: a blocking command would hold up everyone behind it)."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.params = parse_url(url)
        self.timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._connecting = asyncio.Lock()
        self._watch: asyncio.TimerHandle | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command; its reply (strings decoded), or the redis-py exception."""
        if self._transport is None:
            await self._connect()
        return await self._send(hiredis.pack_command(args))

    def _send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fut, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(packed)
        if self._watch is None:
            self._watch = loop.call_later(self.timeout_s, self._check_stall)
        return fut

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if self._transport is not None and data:
            self._transport.write(data)

    def _check_stall(self) -> None:
        """One timer per connection, not one per command: fail all if the oldest is late."""
        self._watch = None
        if not self._pending:
            return
        loop = asyncio.get_running_loop()
        age_s = loop.time() - self._pending[0][1]
        if age_s >= self.timeout_s:
            self._fail(rx.TimeoutError(f"no reply from Redis in {self.timeout_s} s"))
        else:
            self._watch = loop.call_later(self.timeout_s - age_s, self._check_stall)

    async def _connect(self) -> None:
        async with self._connecting:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            p = self.params
            try:
                if "path" in p:
                    coro = loop.create_unix_connection(lambda: _Protocol(self), p["path"])
                else:
                    coro = loop.create_connection(lambda: _Protocol(self),
                                                  p.get("host", "127.0.0.1"), p.get("port", 6379))
                transport, protocol = await asyncio.wait_for(coro, self.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise rx.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            self._transport, self._protocol = transport, protocol
            hello: list[Any] = []
            if p.get("password"):
                hello.append(("AUTH", *([p["username"]] if p.get("username") else []),
                              p["password"]))
            if p.get("db"):
                hello.append(("SELECT", p["db"]))
            for command in hello:
                await self._send(hiredis.pack_command(command))
            log.info("redis connected mux=1 host=%s", p.get("host", p.get("path")))

    def _fail(self, exc: Exception) -> None:
        transport = self._transport
        self._transport = self._protocol = None
        self._out = []
        while self._pending:
            fut = self._pending.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
        if transport is not None:
            transport.abort()

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._fail(rx.ConnectionError(f"Redis connection lost: {exc or 'closed'}"))

    async def hgetall(self, key: str) -> dict[str, str]:
        flat = await self.execute("HGETALL", key)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its digest, loading it once if Redis does not have it (a restart)."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except rx.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", source)
        return await self.execute("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._transport is not None:
            self._fail(rx.ConnectionError("client closed"))
