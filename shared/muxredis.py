"""One Redis connection shared by every request of a process, commands pipelined on it.

Why not redis-py here: on the gateway's hot path (a submit's Lua call, a job read) redis-py's
per-command machinery (pool checkout under a lock, a timeout context, retry wrapper, command
packing in Python, health checks) cost about a third of the gateway's CPU per job, more than
the HTTP handling. Redis answers the commands of one connection in order, so many concurrent
callers can share it: each command is packed by hiredis in C, written with the others of the
same event-loop iteration in one send, and its reply resolves the oldest waiting future.

Errors are redis-py's exception types, so callers and the gateway's error handlers treat both
clients alike. A connection that fails or stalls past the timeout fails every command waiting on
it (their order is lost) and the next command reconnects. So does a reply that says this server
cannot serve us now (READONLY: a replica after a failover; LOADING; MASTERDOWN): the next
connection may reach the new primary.

A (re)connection is usable only after its handshake (AUTH, SELECT) has been answered: commands
issued meanwhile wait for it, so none can run unauthenticated or on db 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import hiredis
from redis import exceptions as rx

if TYPE_CHECKING:
    from shared.redisconn import RedisTarget

log = logging.getLogger(__name__)

# Error replies after which this connection is the wrong one to keep using.
RECONNECT_REPLIES = ("READONLY", "LOADING", "MASTERDOWN")


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
            if isinstance(reply, rx.ResponseError) and str(reply).startswith(RECONNECT_REPLIES):
                err = rx.ConnectionError(f"Redis cannot serve this connection: {reply}")
                if not fut.done():
                    fut.set_exception(err)
                self.owner._fail(err)
                return
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

    def __init__(self, target: RedisTarget, *, timeout_s: float) -> None:
        """Build it with `shared.redisconn.connect_mux(settings)`."""
        self.target = target
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
        self._arm_watch(loop)
        return fut

    def _arm_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watch is None:
            self._watch = loop.call_later(self.timeout_s, self._check_stall)

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
            t = self.target
            try:
                if t.unix_path:
                    coro = loop.create_unix_connection(lambda: _Protocol(self), t.unix_path)
                else:
                    ctx = t.ssl_context()
                    coro = loop.create_connection(
                        lambda: _Protocol(self), t.host, t.port, ssl=ctx,
                        server_hostname=t.host if ctx is not None else None)
                transport, protocol = await asyncio.wait_for(coro, self.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise rx.ConnectionError(f"cannot connect to Redis: {exc}") from exc
            await self._handshake(transport, protocol)
            log.info("redis connected mux=1 host=%s tls=%s db=%d", t.unix_path or t.host,
                     t.tls, t.db)

    async def _handshake(self, transport: Any, protocol: _Protocol) -> None:
        """AUTH and SELECT, written directly and answered before the connection is published:
        until `_transport` is set every other caller waits on `_connecting`."""
        t = self.target
        hello: list[tuple[Any, ...]] = []
        if t.password:
            hello.append(("AUTH", *([t.username] if t.username else []), t.password))
        if t.db:
            hello.append(("SELECT", t.db))
        self._protocol = protocol
        loop = asyncio.get_running_loop()
        futures = []
        for _ in hello:
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending.append((fut, loop.time()))
            futures.append(fut)
        if hello:
            self._arm_watch(loop)
            transport.write(b"".join(hiredis.pack_command(c) for c in hello))
        try:
            for command, fut in zip(hello, futures, strict=True):
                try:
                    await fut
                except rx.ResponseError as exc:
                    kind = rx.AuthenticationError if command[0] == "AUTH" else rx.ResponseError
                    raise kind(f"Redis refused {command[0]}: {exc}") from None
        except BaseException:
            self._protocol = None
            self._pending.clear()
            transport.abort()
            for fut in futures:  # the replies after the failing one are of no interest
                if fut.done() and not fut.cancelled():
                    fut.exception()
                else:
                    fut.cancel()
            raise
        self._transport = transport

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
