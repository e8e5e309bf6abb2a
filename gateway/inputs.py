"""Request parsing for the gateway: size limit, JSON, the submit envelope, the model's input
schema. Every failure becomes a contract error (413/422) naming what was wrong."""

from __future__ import annotations

import asyncio
import math
import re
import sys
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json, to_json
from starlette.requests import ClientDisconnect, Request

from shared.errors import InvalidInput, PayloadTooLarge
from shared.model import fault_hooks
from shared.modelspec import ModelSpec
from shared.store import NewJob

MAX_TTL_S = 7 * 86_400


class Envelope(BaseModel):
    """Fields shared by single and batch submits."""

    model_config = ConfigDict(extra="ignore", strict=True)

    priority: Literal["high", "normal", "low"] = "normal"
    ttl_s: float | None = Field(None, gt=0, le=MAX_TTL_S)
    webhook: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    # Worth computing only if finished within this many ms of the submit.
    deadline_ms: int | None = Field(None, gt=0, le=int(MAX_TTL_S * 1000))
    webhook_events: list[Literal["running", "final"]] | None = Field(None, min_length=1,
                                                                     max_length=2)


class SubmitBody(Envelope):
    input: Any


class BatchBody(Envelope):
    inputs: list[Any] = Field(min_length=1, max_length=10_000)


# A body over the limit is read and thrown away (up to these bounds) before the 413 is sent:
# a client that writes its whole body before reading (urllib, requests) would otherwise see the
# connection reset under its feet instead of the answer. Past the bounds the answer is sent and
# the connection closed anyway.
DRAIN_MAX_BYTES = 128 * 1024 * 1024
DRAIN_MAX_S = 10.0

# Numbers whose text can overflow a float (to inf, which JSON cannot carry): an exponent of
# three or more digits, or 300 or more digits in a row. Only bodies with one are searched.
# What a number beyond a float's range needs in its text: a positive exponent of three digits, or
# a run of 300 digits. Checked on the raw bytes because a walk of the parsed value costs more;
# the exponent regex runs only when an 'e' is there, and the digit run is found by mapping every
# digit to '0' and searching (one regex over both cost 90 µs for a 5 KB body of floats, the
# MLP's input; this costs 3-18 µs).
_BIG_EXPONENT = re.compile(rb"[eE]\+?0*[1-9][0-9]{2}")
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGITS = b"0" * 300
_UTF8_BOM = b"\xef\xbb\xbf"
_FLOAT_MAX = int(sys.float_info.max)


async def discard(chunks: AsyncIterator[bytes]) -> bool:
    """Read and drop what is left of a body within DRAIN_MAX_BYTES and DRAIN_MAX_S; True when
    it was read to its end."""
    size = 0
    try:
        async with asyncio.timeout(DRAIN_MAX_S):
            async for chunk in chunks:
                size += len(chunk)
                if size > DRAIN_MAX_BYTES:
                    return False
    except (TimeoutError, ClientDisconnect):
        return False
    return True


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) once it passes `limit` bytes. A body with a declared length
    over the limit never gets here (gateway.middleware answers it)."""
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await discard(stream)
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The body's JSON, parsed once from the raw bytes (UTF-8, as RFC 8259 requires; a leading
    BOM is ignored). Nesting deeper than 200, lone surrogates, invalid UTF-8, NaN/Infinity and
    numbers too large for a float are 422s, never a 500 or a value the worker cannot read."""
    if raw.startswith(_UTF8_BOM):
        raw = raw[3:]
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}", field="body") from None
    if _maybe_huge(raw) and _has_infinity(value):
        raise InvalidInput("body holds a number too large for a 64-bit float", field="body")
    return value


def _maybe_huge(raw: bytes) -> bool:
    """Whether the text may hold a number too large for a float (no false negatives)."""
    if (b"e" in raw or b"E" in raw) and _BIG_EXPONENT.search(raw):
        return True
    return len(raw) >= len(_LONG_DIGITS) and _LONG_DIGITS in raw.translate(_DIGITS_TO_ZERO)


def _has_infinity(value: Any) -> bool:
    """Whether a number beyond a 64-bit float's range hides in `value`: an overflowed float, or
    an integer a float field would turn into one (RFC 8259 §6: not interoperable anyway).
    Depth is bounded by the parser's 200."""
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, int):
        return abs(value) > _FLOAT_MAX
    if isinstance(value, dict):
        return any(_has_infinity(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_infinity(v) for v in value)
    return False


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def invalid(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> InvalidInput:
    errors = [{"field": _where(prefix + tuple(e["loc"])), "message": e["msg"]}
              for e in exc.errors(include_url=False)]
    first = errors[0]
    return InvalidInput(f"{first['field']}: {first['message']}", field=first["field"],
                        errors=errors[:20])


def envelope(body: Any, cls: type[Envelope]) -> Any:
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object", field="body")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from exc


def validate_input(spec: ModelSpec, value: Any, where: tuple[Any, ...],
                   faults: bool = False) -> str:
    """Validate one input against the model's schema; returns it encoded once for the queue.
    A fault hook set to anything but its default is refused unless `faults` is on."""
    cls = spec.cls.Input
    try:  # strict: a bool or a numeric string is no number, as the published schema says
        item = cls.model_validate(value, strict=True)
    except ValidationError:
        try:  # JSON's strict mode still takes the JSON forms of dates, enums, UUIDs
            item = cls.model_validate_json(to_json(value), strict=True)
        except ValidationError as exc:
            raise invalid(exc, where) from exc
    if not faults:
        for name in fault_hooks(cls):
            if getattr(item, name) != cls.model_fields[name].default:
                field = _where((*where, name))
                raise InvalidInput(f"{field}: fault hooks are off in this deployment "
                                   "(ASYNCINFER_FAULT_INJECTION)", field=field)
    return item.model_dump_json()


def public_schema(schema: dict[str, Any], cls: type[BaseModel], faults: bool) -> dict[str, Any]:
    """A model's input JSON schema as published: without its fault hooks unless they are on."""
    hooks = fault_hooks(cls)
    if faults or not hooks:
        return schema
    props = {k: v for k, v in schema.get("properties", {}).items() if k not in hooks}
    return {**schema, "properties": props}


def new_jobs(spec: ModelSpec, inputs: list[tuple[tuple[Any, ...], Any]],
             env: Envelope, faults: bool = False) -> list[NewJob]:
    events = tuple(dict.fromkeys(env.webhook_events or ["final"]))
    return [NewJob(validate_input(spec, value, where, faults), priority=env.priority,
                   ttl_s=env.ttl_s, webhook=env.webhook, deadline_ms=env.deadline_ms,
                   webhook_events=events) for where, value in inputs]


_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)")


def prefer_wait_s(header: str | None, cap_s: float) -> float:
    """Seconds asked for by `Prefer: wait=N` (RFC 7240), capped; 0 when absent."""
    match = _WAIT.search(header or "")
    return min(float(match.group(1)), cap_s) if match else 0.0


def query_wait_s(raw: str | None, cap_s: float) -> float:
    """`?wait=N` seconds for a long-poll, clamped to [0, cap]; 422 when not a number."""
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise InvalidInput("query.wait: Input should be a valid number", field="query.wait")
    return min(max(value, 0.0), cap_s)
