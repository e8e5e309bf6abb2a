"""API fuzzing with hypothesis: any body, path or header gives a contract status and shape,
never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from shared.settings import Settings

JOB_KEYS = {"id", "model", "status", "created_at", "metrics"}
ALLOWED = {200, 202, 404, 405, 409, 413, 422, 429}

# Text may hold lone surrogates (json.dumps writes them as \udXXX escapes), numbers may be far
# past a float's range: both reach the server's parser.
texts = st.text(st.characters(exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**600)
    | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20)
synthetic_inputs = st.fixed_dictionaries(
    {"x": st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)},
    optional={"fail": st.sampled_from([None, "nope", "predict"]),
              "sleep_s": st.floats(min_value=-1, max_value=100)})
envelopes = st.fixed_dictionaries(
    {"input": synthetic_inputs | json_values},
    optional={"priority": st.sampled_from(["high", "normal", "low", "urgent", 3]),
              "ttl_s": st.floats(allow_nan=False) | st.integers() | st.text(max_size=3),
              "webhook": st.text(max_size=30) | st.just("http://127.0.0.1:9/hook")})


@pytest.fixture(scope="module")
def api(redis_server: Any) -> Iterator[TestClient]:
    s = Settings(redis_url=redis_server.url, models=None, max_body_bytes=4096)
    with TestClient(create_app(s)) as client:
        yield client


def _check(r: Any) -> None:
    assert r.status_code in ALLOWED, (r.status_code, r.text)
    body = r.json()
    if r.status_code >= 400:
        assert set(body["error"]) >= {"type", "message"}, body
    elif "jobs" in body:
        assert all(set(j) >= JOB_KEYS for j in body["jobs"])
    else:
        assert set(body) >= JOB_KEYS and body["status"] in {"queued", "running", "succeeded",
                                                            "failed", "canceled", "expired"}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=envelopes | json_values, model=st.sampled_from(["synthetic", "mlp", "x y", "ü"]),
       prefer=st.sampled_from(["", "wait=0", "wait=abc", "respond-async, wait=0.01"]))
def test_submit_never_500(api: TestClient, body: Any, model: str, prefer: str) -> None:
    r = api.post(f"/v1/models/{model}/jobs", content=json.dumps(body),
                 headers={"content-type": "application/json", "prefer": prefer,
                          "idempotency-key": "k" if isinstance(body, dict) else ""})
    _check(r)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(inputs=st.lists(synthetic_inputs | json_values, max_size=4) | json_values)
def test_batch_submit_never_500(api: TestClient, inputs: Any) -> None:
    # json.dumps, as above: httpx's json= cannot encode a lone surrogate (ensure_ascii=False).
    _check(api.post("/v1/models/synthetic/jobs:batch", content=json.dumps({"inputs": inputs}),
                    headers={"content-type": "application/json"}))


def _nested(depth: int, opener: bytes) -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    inner = opener * depth if opener == b"[" else b'{"a":' * depth
    return b'{"input": ' + inner + b"1" + closer * depth + b"}"


# Bodies no JSON encoder writes: deep nesting, surrogate escapes, overflowing numbers, other
# encodings, truncation.
hostile_bodies = st.one_of(
    st.builds(_nested, st.integers(150, 6000), st.sampled_from([b"[", b"{"])),
    st.integers(0xD800, 0xDFFF).map(lambda c: b'{"input": {"x": 1, "s": "\\u%04x"}}' % c),
    st.integers(309, 5000).map(lambda e: b'{"input": {"x": 1e%d}}' % e),
    st.integers(300, 5000).map(lambda n: b'{"input": {"x": -' + b"9" * n + b"}}"),
    st.builds(lambda body, enc: json.dumps(body).encode(enc), envelopes,
              st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"])),
    st.builds(lambda body, cut: json.dumps(body).encode()[:cut], envelopes, st.integers(0, 40)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=hostile_bodies, batch=st.booleans())
def test_hostile_bodies_never_500(api: TestClient, raw: bytes, batch: bool) -> None:
    path = "/v1/models/synthetic/jobs" + (":batch" if batch else "")
    _check(api.post(path, content=raw, headers={"content-type": "application/json"}))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=5000),
       job=st.text(min_size=1, max_size=40),
       wait=st.sampled_from(["", "0", "-1", "abc", "0.01", "1e9"]))
def test_raw_bytes_and_odd_ids_never_500(api: TestClient, raw: bytes, job: str,
                                         wait: str) -> None:
    _check(api.post("/v1/models/synthetic/jobs", content=raw,
                    headers={"content-type": "application/json"}))
    safe = quote(job, safe="")
    for r in (api.get(f"/v1/jobs/{safe}", params={"wait": wait} if wait else None),
              api.delete(f"/v1/jobs/{safe}")):
        _check(r)


def test_non_finite_numbers_are_422(api: TestClient) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        r = api.post("/v1/models/synthetic/jobs", content=b'{"input": {"x": ' + literal + b"}}",
                     headers={"content-type": "application/json"})
        assert r.status_code == 422, literal


def test_openapi_schema_lists_the_contract_paths(api: TestClient) -> None:
    paths = set(api.get("/openapi.json").json()["paths"])
    # Submits are described per served model, each with that model's input schema.
    assert {"/v1/models/synthetic/jobs", "/v1/models/synthetic/jobs:batch", "/v1/models/mlp/jobs",
            "/v1/jobs/{job_id}", "/v1/models", "/v1/models/{model}", "/healthz", "/readyz",
            "/metrics"} <= paths


number_texts = st.one_of(
    st.from_regex(rb"\A-?[1-9][0-9]{0,400}(\.[0-9]{1,20})?([eE][+-]?0{0,3}[0-9]{1,4})?\Z"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()))


@given(number=number_texts, padding=st.binary(max_size=40).filter(lambda b: b"e" not in b))
@settings(max_examples=400, deadline=None)
def test_the_cheap_prefilter_never_misses_a_number_beyond_a_float(number: bytes,
                                                                  padding: bytes) -> None:
    """The raw-bytes prefilter that spares most bodies the walk of the parsed value must say
    "maybe" for every number that parses to infinity or is an integer past a float's range."""
    from gateway import inputs

    body = b'{"input": {"x": ' + number + b"}}"
    beyond = inputs._has_infinity(json.loads(body))
    if beyond:
        assert inputs._maybe_huge(body + padding), number[:40]
