"""A TCP relay in front of a real Redis that can lose one reply: the command reaches Redis and
runs, the client's connection breaks before the answer comes back. That is what a client sees
when Redis stops (or the network fails) between running a command and sending its reply, the
one case where a client cannot know whether its write happened."""

from __future__ import annotations

import asyncio
import contextlib


class ReplyLoss:
    """Relays every connection to `127.0.0.1:upstream_port`; `lose_reply_to(marker)` makes the
    next command carrying `marker` run and its connection close unanswered."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.lost = 0  # replies swallowed so far
        self._marker: bytes | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ReplyLoss:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()

    def lose_reply_to(self, marker: bytes) -> None:
        self._marker = marker

    async def _relay(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        swallow = asyncio.Event()

        async def requests() -> None:
            while chunk := await client_r.read(65536):
                if self._marker is not None and self._marker in chunk:
                    self._marker = None
                    swallow.set()
                up_w.write(chunk)
                await up_w.drain()

        async def replies() -> None:
            while chunk := await up_r.read(65536):
                if swallow.is_set():
                    # Redis ran the command (it answered): the client never hears of it.
                    self.lost += 1
                    return
                client_w.write(chunk)
                await client_w.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for w in (client_w, up_w):
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()
