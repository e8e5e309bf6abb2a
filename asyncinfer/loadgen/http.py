"""A small keep-alive HTTP/1.1 client on asyncio streams: the load generator's transport.

httpx costs a few milliseconds of CPU per request, which caps one generator process near
200 jobs/s; this client costs a few tens of microseconds, so one process can drive thousands of
requests a second. It speaks just what the generator needs: one request at a time per
connection, Content-Length or chunked answers, `Connection: close`, plain HTTP or TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit


class HTTPError(Exception):
    """A transport failure: no answer. `sent` is False only when the request surely never left
    (the connection could not be made), so a submit that failed otherwise may have been queued."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class _Conn:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RawClient:
    """A pool of at most `max_connections` keep-alive connections to one server. A request on a
    reused connection that the server had closed meanwhile is retried once on a fresh one.
    `headers` go on every request (an API key, say)."""

    def __init__(self, base_url: str, max_connections: int, timeout_s: float,
                 headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base_url)
        tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if tls else None
        self.timeout_s = timeout_s
        self.retries = 0
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        fixed = f"Host: {parts.netloc}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed = fixed.encode()

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                                       limit=1 << 20)
        return _Conn(reader, writer)

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one request; HTTPError when no answer came."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode(), self._fixed]
        if body is not None:
            head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        head.append(b"\r\n")
        data = b"".join(head) + (body or b"")
        sent = False
        async with self._slots:
            for attempt in range(2):
                # A retry always gets a fresh connection: the other idle ones may be stale too.
                try:
                    conn = (self._idle.pop() if self._idle and attempt == 0
                            else await self._connect())
                except OSError as exc:
                    raise HTTPError(f"connect: {type(exc).__name__}: {exc}", sent) from exc
                sent = True
                try:
                    # asyncio.timeout, not wait_for: wait_for wraps the exchange in a task of
                    # its own, which cost the generator about a quarter of its CPU per request.
                    async with asyncio.timeout(self.timeout_s):
                        status, payload, keep = await _exchange(conn, data)
                except TimeoutError as exc:
                    # First: TimeoutError is an OSError, and a request that timed out must not
                    # be sent again (a resent submit could make a second job).
                    conn.close()
                    raise HTTPError("timeout") from exc
                except (OSError, asyncio.IncompleteReadError, ValueError,
                        asyncio.LimitOverrunError) as exc:
                    conn.close()
                    if conn.reused and attempt == 0:
                        self.retries += 1
                        continue  # the server closed an idle keep-alive connection: retry
                    raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    conn.reused = True
                    self._idle.append(conn)
                else:
                    conn.close()
                return status, payload
        raise HTTPError("unreachable")

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _exchange(conn: _Conn, data: bytes) -> tuple[int, bytes, bool]:
    conn.writer.write(data)
    reader = conn.reader
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"bad status line {lines[0][:80]!r}") from exc
    length = -1
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep = b"close" not in value.lower()
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size + 2))
        return status, b"".join(p[:-2] for p in parts), keep
    if length >= 0:
        return status, await reader.readexactly(length), keep
    return status, await reader.read(), False
