"""What every request goes through once, before any route: who the caller is (the API key, parsed
here and nowhere else), a body declared over the size limit (413), and the contract's JSON error
envelope for anything unexpected (500, logged with a request id the response also carries).

A pure ASGI middleware: no per-request objects beyond a small `send` wrapper.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import ApiKeys
from gateway.inputs import DRAIN_MAX_BYTES, discard
from shared.errors import AsyncInferError, PayloadTooLarge

log = logging.getLogger(__name__)

# Paths that answer without an API key: probes, scrapers and the API's own description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def owner_of(request: Request) -> str:
    """The caller's owner id, as the middleware found it ('' when authentication is off)."""
    owner: str = request.scope["state"]["owner"]
    return owner


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys, max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = length = request_id = None
        expect_continue = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = value
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
            elif name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                request_id = value.decode()
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            state = scope.setdefault("state", {})
            state["owner"] = "" if scope["path"] in OPEN_PATHS else self.keys.owner(
                authorization)
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._too_large(int(length), expect_continue, receive)
            await self.app(scope, receive, tracked)
        except AsyncInferError as exc:  # ours, raised above (401, 413)
            headers = exc.headers()
            if isinstance(exc, PayloadTooLarge):
                headers["connection"] = "close"
            await _respond(send, exc.status, exc.body(), headers)
        except Exception:
            request_id = request_id or os.urandom(8).hex()
            log.exception("unhandled error request_id=%s method=%s path=%s", request_id,
                          scope.get("method"), scope.get("path"))
            if not started:  # else the server closes the half-sent response
                await _respond(send, 500, {"error": {
                    "type": "internal", "request_id": request_id,
                    "message": f"internal error; the server log has it as {request_id}"}},
                    {"x-request-id": request_id})

    async def _too_large(self, length: int, expect_continue: bool, receive: Receive) -> None:
        # With `Expect: 100-continue` the client waits for a go-ahead: answering at once
        # saves it sending the body at all. Otherwise it is sending; read it to its end so that
        # it reaches the point of reading the answer.
        if not expect_continue and length <= DRAIN_MAX_BYTES:
            await discard(_chunks(receive))
        raise PayloadTooLarge(f"body of {length} bytes is over the limit of "
                              f"{self.max_body_bytes}")


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _respond(send: Send, status: int, body: dict[str, Any],
                   headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           *((k.lower().encode(), v.encode("latin-1")) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
