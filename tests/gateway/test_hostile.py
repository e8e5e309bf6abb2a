"""Bodies an attacker (or a broken client) sends, against a real uvicorn gateway over TCP: each is
a 4xx in the contract's JSON envelope, never a 500, a plain-text page or a reset connection."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import BaseModel, field_validator

from gateway.app import create_app
from shared.model import InferenceModel
from shared.modelspec import ModelSpec
from shared.settings import Settings
from tests.conftest import Procs

SUBMIT = "/v1/models/synthetic/jobs"

HOSTILE: list[tuple[str, bytes]] = [
    ("nesting 5000 deep", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("unclosed nesting", b"[" * 20_000),
    ("lone high surrogate", b'{"input": {"x": 1, "note": "\\ud800"}}'),
    ("lone low surrogate in a key", b'{"input": {"\\udc00": 1, "x": 1}}'),
    ("surrogate bytes (invalid UTF-8)", b'{"input": {"x": "\xed\xa0\x80"}}'),
    ("invalid UTF-8", b'{"input": {"x": 1}, "p": "\xff\xfe"}'),
    ("UTF-16", '{"input": {"x": 1}}'.encode("utf-16")),
    ("float overflow", b'{"input": {"x": 1e400}}'),
    ("negative float overflow", b'{"input": {"x": -1.5E+309}}'),
    ("400-digit float", b'{"input": {"x": 1' + b"0" * 400 + b'.5}}'),
    ("5000-digit integer", b'{"input": {"x": ' + b"9" * 5000 + b"}}"),
    ("huge integer for a float", b'{"input": {"x": ' + b"9" * 400 + b"}}"),
    ("NaN", b'{"input": {"x": NaN}}'),
    ("bool for a number", b'{"input": {"x": true}}'),
    ("string for a number", b'{"input": {"x": "1.5"}}'),
    ("null input", b'{"input": null}'),
    ("wrong priority type", b'{"input": {"x": 1}, "priority": 3}'),
    ("string ttl", b'{"input": {"x": 1}, "ttl_s": "5"}'),
    ("infinite ttl", b'{"input": {"x": 1}, "ttl_s": 1e999}'),
    ("list body", b"[1, 2, 3]"),
    ("empty body", b""),
    ("fault hook in a default deployment", b'{"input": {"x": 1, "fail": "kill"}}'),
]


def _post(base: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST with urllib, which writes the whole body before it reads anything."""
    request = urllib.request.Request(base + SUBMIT, data=body, method="POST",
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        assert err.headers.get_content_type() == "application/json", err.read()[:200]
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def gateway(procs_module: Procs) -> str:
    # The default deployment as to fault hooks (off) and body size (1 MiB).
    url: str = procs_module.gateway(ASYNCINFER_FAULT_INJECTION="false",
                                         ASYNCINFER_MAX_BODY_BYTES=str(1024 * 1024))
    return url


@pytest.mark.parametrize(("what", "body"), HOSTILE, ids=[w for w, _ in HOSTILE])
def test_hostile_bodies_are_4xx_json(gateway: str, what: str, body: bytes) -> None:
    status, answer = _post(gateway, body)
    assert 400 <= status < 500, (what, status, answer)
    assert set(answer["error"]) >= {"type", "message"}, answer


def test_a_bom_and_big_finite_numbers_are_fine(gateway: str) -> None:
    status, job = _post(gateway, b'\xef\xbb\xbf{"input": {"x": 1.7976931348623157e308}}')
    assert status == 202, job


def test_64_mib_from_a_client_that_writes_it_all_first_reads_413(gateway: str) -> None:
    body = b'{"input": {"x": 1}, "pad": "' + b"x" * (64 * 1024 * 1024) + b'"}'
    status, answer = _post(gateway, body)
    assert status == 413 and answer["error"]["type"] == "payload_too_large"


def _raw(base: str, head: bytes, body: bytes = b"") -> bytes:
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_expect_100_continue_gets_413_without_sending_the_body(gateway: str) -> None:
    head = (f"POST {SUBMIT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {512 * 1024 * 1024}\r\nExpect: 100-continue\r\n\r\n").encode()
    answer = _raw(gateway, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer and b'"payload_too_large"' in answer


def test_a_chunked_body_over_the_limit_is_413(gateway: str) -> None:
    head = (f"POST {SUBMIT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"
    answer = _raw(gateway, head, body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


class _Exploding(BaseModel):
    x: float

    @field_validator("x")
    @classmethod
    def _boom(cls, value: float) -> float:
        if value == 13:
            raise RuntimeError("a bug in a model's validator")  # not a ValueError: escapes
        return value


class ExplodingModel(InferenceModel):
    Input = _Exploding
    Output = _Exploding


async def test_an_unexpected_error_is_a_json_500_with_a_request_id(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    spec = ModelSpec.model_validate({"name": "boom", "class": f"{__name__}:ExplodingModel",
                                     "options": {}})
    app = create_app(settings, {"boom": spec})
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        ok = await client.post("/v1/models/boom/jobs", json={"input": {"x": 1}})
        assert ok.status_code == 202
        with caplog.at_level(logging.ERROR, logger="gateway.middleware"):
            r = await client.post("/v1/models/boom/jobs", json={"input": {"x": 13}},
                                  headers={"x-request-id": "req-42"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "internal"
    assert r.json()["error"]["request_id"] == "req-42" == r.headers["x-request-id"]
    assert "a bug" not in r.text  # the details go to the log, not to the caller
    assert any("request_id=req-42" in rec.getMessage() and rec.exc_info
               for rec in caplog.records)
