"""Python client of the asyncinfer HTTP API: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("http://127.0.0.1:8000") as c:
        print(c.run("synthetic", {"x": 21}, timeout_s=30).output)

Both share one sans-I/O core: each call is a generator that yields the HTTP requests (and the
pauses between retries) it needs and is sent the responses, so building requests, retrying,
long-polling and parsing exist once; the classes differ only in how they send and sleep. Every
failure is an `ApiError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypedDict, TypeVar, Unpack

import httpx
from pydantic import BaseModel, ConfigDict, Field

from shared.jobs import FINAL_STATUSES, Job

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})  # the server's "not now": queue full, Redis unreachable
FINAL_EVENT_ID = 3  # an event stream's last event (the job's final status)
FOLLOW_READ_S = 90.0  # an event stream may be quiet this long (the server sends keep-alives)
FOLLOW_RECONNECTS = 1000  # a follow reconnects at most this often (each connection is capped)

T = TypeVar("T")


class ApiError(Exception):
    """Any failed call. `status` and `type` are the API's (`404 not_found`, `429 queue_full`,
    ...); `status` is None for `connection_error` and `timeout`, which never reached an answer."""

    def __init__(self, status: int | None, type: str, message: str,
                 detail: dict[str, Any] | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message
        self.detail, self.retry_after_s = detail or {}, retry_after_s

    def __str__(self) -> str:
        return f"{self.status or ''} {self.type}: {self.message}".lstrip()


class ModelInfo(BaseModel):
    """One entry of `GET /v1/models`; fields the server adds later are kept as extras."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    class_path: str = Field("", alias="class")
    input_schema: dict[str, Any] = Field(default_factory=dict)
    output_schema: dict[str, Any] = Field(default_factory=dict)
    batching: dict[str, Any] = Field(default_factory=dict)
    scaling: dict[str, Any] = Field(default_factory=dict)
    workers: list[dict[str, Any]] = Field(default_factory=list)
    queue_depth: int = 0
    a: float | None = None
    b: float | None = None
    warning: str | None = None


class SubmitOptions(TypedDict, total=False):
    """Submit options; a repeated submit with the same idempotency key and body returns the
    first job instead of queueing a second. Without one the client makes a key per call, so its
    own retries (after a 503 or 429) never queue a job twice."""

    priority: Literal["high", "normal", "low"]
    ttl_s: float
    webhook: str
    webhook_events: list[Literal["running", "final"]]
    deadline_ms: int  # finish within this many ms of the submit, or it is not worth computing
    idempotency_key: str


@dataclass(frozen=True)
class JobEvent:
    """One status change of a job (`Client.events`): the status, its event id, the job."""

    event: str
    id: int
    job: Job


class SseParser:
    """Server-Sent Events, line by line: `feed` returns a JobEvent at each blank line that ends
    an event with data (comments and keep-alives yield nothing)."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        line = line.rstrip("\r\n")
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                self._fields[name] = (self._fields.get(name, "") + "\n" + value
                                      if name == "data" and name in self._fields else value)
            return None
        fields, self._fields = self._fields, {}
        if "data" not in fields:
            return None
        return JobEvent(fields.get("event", "message"), int(fields.get("id") or 0),
                        Job.model_validate_json(fields["data"]))


@dataclass(frozen=True)
class _Pause:
    seconds: float


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


_Call = Generator[httpx.Request | _Pause, httpx.Response | None, T]


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date (RFC 9110 allows both)."""
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(value or ""))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(0.0, email.utils.parsedate_to_datetime(value or "").timestamp() - time.time())
    return None


def _error_of(response: httpx.Response) -> ApiError:
    retry_after = _retry_after_s(response.headers.get("retry-after"))
    try:
        err = dict(response.json()["error"])
        return ApiError(response.status_code, str(err.pop("type")), str(err.pop("message")), err,
                        retry_after)
    except (ValueError, KeyError, TypeError):  # not our error shape (a proxy, a crash page)
        text = response.text.strip().replace("\n", " ")[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text, retry_after_s=retry_after)


def _resume(call: _Call[T], reply: httpx.Response | None) -> httpx.Request | _Pause | _Done[T]:
    """The call's next step given the last reply (None to start it or after a pause)."""
    try:
        return call.send(reply)
    except StopIteration as done:
        return _Done(done.value)


@contextlib.contextmanager
def _transport_errors(step: httpx.Request | _Pause) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:  # never reached the API: no status to report
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
        where = f"{step.method} {step.url}" if isinstance(step, httpx.Request) else "pause"
        raise ApiError(None, kind, f"{where}: {type(exc).__name__} {exc}") from exc


class _Core:
    """Builds the requests of each call and reads the answers; no I/O of its own."""

    def __init__(self, url: str | None, api_key: str | None, timeout_s: float, max_retries: int,
                 max_retry_wait_s: float) -> None:
        self.url = (url or os.environ.get("ASYNCINFER_URL") or DEFAULT_URL).rstrip("/")
        key = os.environ.get("ASYNCINFER_API_KEY") if api_key is None else api_key
        self.headers = {"accept": "application/json", "user-agent": "asyncinfer-client/0.1"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"
        self.timeout_s, self.max_retries, self.max_retry_wait_s = (timeout_s, max_retries,
                                                                   max_retry_wait_s)

    def request(self, method: str, path: str, *, body: Any = None, wait_s: float = 0.0,
                headers: dict[str, str] | None = None,
                params: dict[str, str] | None = None) -> httpx.Request:
        # A long-poll holds the answer for wait_s: the read timeout must outlast it.
        timeout = httpx.Timeout(self.timeout_s + wait_s, connect=self.timeout_s)
        return httpx.Request(method, self.url + path, json=body, params=params,
                             headers={**self.headers, **(headers or {})},
                             extensions={"timeout": timeout.as_dict()})

    def call(self, request: httpx.Request) -> _Call[Any]:
        """Send `request`, retrying 429/503 at most `max_retries` times after the server's
        Retry-After (else exponential backoff), capped at `max_retry_wait_s`; the JSON answer."""
        for attempt in itertools.count():
            response = yield request
            assert response is not None
            if response.status_code < 400:
                return response.json()
            error = _error_of(response)
            if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
                raise error
            delay = error.retry_after_s if error.retry_after_s is not None else 0.5 * 2 ** attempt
            yield _Pause(min(delay, self.max_retry_wait_s))
        raise AssertionError("unreachable")  # itertools.count() never ends

    def post_jobs(self, path: str, body: dict[str, Any], options: SubmitOptions,
                  wait_s: float | None = None) -> _Call[Any]:
        """A submit: the options go in the body, but the idempotency key is a header. Every
        submit has one (the caller's, else a fresh one): the retries of `call` resend the same
        request, so a submit whose answer was lost cannot create a second job."""
        headers = {"idempotency-key": options.get("idempotency_key") or uuid.uuid4().hex}
        if wait_s:
            headers["prefer"] = f"wait={wait_s:.3f}"
        body |= {k: v for k, v in options.items() if k != "idempotency_key"}
        return (yield from self.call(self.request("POST", path, body=body, wait_s=wait_s or 0.0,
                                                  headers=headers)))

    def submit(self, model: str, input: Any, wait_s: float | None,
               options: SubmitOptions) -> _Call[Job]:
        answer = yield from self.post_jobs(f"/v1/models/{model}/jobs", {"input": input}, options,
                                           wait_s)
        return Job.model_validate(answer)

    def submit_many(self, model: str, inputs: list[Any],
                    options: SubmitOptions) -> _Call[list[Job]]:
        answer = yield from self.post_jobs(f"/v1/models/{model}/jobs:batch",
                                           {"inputs": list(inputs)}, options)
        return [Job.model_validate(j) for j in answer["jobs"]]

    def get(self, job_id: str, wait_s: float | None) -> _Call[Job]:
        params = {"wait": f"{wait_s:.3f}"} if wait_s else None
        answer = yield from self.call(self.request("GET", f"/v1/jobs/{job_id}", params=params,
                                                   wait_s=wait_s or 0.0))
        return Job.model_validate(answer)

    def events_request(self, job_id: str, last_id: int) -> httpx.Request:
        """`GET /v1/jobs/{id}/events`, resuming after event `last_id`."""
        headers = {"accept": "text/event-stream"}
        if last_id:
            headers["last-event-id"] = str(last_id)
        return self.request("GET", f"/v1/jobs/{job_id}/events", headers=headers)

    @property
    def events_timeout(self) -> httpx.Timeout:
        """An event stream may be quiet for long: the read timeout is FOLLOW_READ_S."""
        return httpx.Timeout(FOLLOW_READ_S, connect=self.timeout_s)

    def cancel(self, job_id: str) -> _Call[Job]:
        answer = yield from self.call(self.request("DELETE", f"/v1/jobs/{job_id}"))
        return Job.model_validate(answer)

    def models(self) -> _Call[list[ModelInfo]]:
        answer = yield from self.call(self.request("GET", "/v1/models"))
        return [ModelInfo.model_validate(m) for m in answer["models"]]

    def run(self, model: str, input: Any, timeout_s: float, options: SubmitOptions) -> _Call[Job]:
        """Submit waiting up to `timeout_s`, then long-poll until the job is final. The server
        caps each wait (`max_wait_s`), hence the loop."""
        deadline = time.monotonic() + timeout_s
        job = yield from self.submit(model, input, timeout_s, options)
        while job.status not in FINAL_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(None, "timeout", f"job {job.id} is still {job.status} after "
                               f"{timeout_s:g} s", {"job_id": job.id})
            job = yield from self.get(job.id, remaining)
        return job


H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class _Base(Generic[H]):
    """What both clients hold. `url` defaults to $ASYNCINFER_URL, else http://127.0.0.1:8000;
    `api_key` to $ASYNCINFER_API_KEY (sent as `Authorization: Bearer`). `http` lets a caller
    bring its own httpx client (limits, transport); then closing it stays the caller's job."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout_s: float = 30.0, max_retries: int = 3, max_retry_wait_s: float = 30.0,
                 http: H | None = None) -> None:
        self._core = _Core(url, api_key, timeout_s, max_retries, max_retry_wait_s)
        self._own_http = http is None
        self._http: H = http if http is not None else self._http_class()

    _http_class: type[H]


class Client(_Base[httpx.Client]):
    """Blocking client; see `_Base` for the constructor."""

    _http_class = httpx.Client

    def _drive(self, call: _Call[T]) -> T:
        reply = None
        while not isinstance(step := _resume(call, reply), _Done):
            reply = None
            with _transport_errors(step):
                if isinstance(step, _Pause):
                    time.sleep(step.seconds)
                else:
                    reply = self._http.send(step)
        return step.value

    def submit(self, model: str, input: Any, *, wait_s: float | None = None,
               **options: Unpack[SubmitOptions]) -> Job:
        """Queue one job (`queued`); with `wait_s` the server holds the answer until the job is
        final or the time passes (`Prefer: wait`)."""
        return self._drive(self._core.submit(model, input, wait_s, options))

    def submit_many(self, model: str, inputs: list[Any], **options: Unpack[SubmitOptions]) -> \
            list[Job]:
        """Queue one job per input in one request; the jobs come back in input order."""
        return self._drive(self._core.submit_many(model, inputs, options))

    def get(self, job_id: str, wait: float | None = None) -> Job:
        """The job; with `wait` (seconds) a long-poll that returns as soon as it is final."""
        return self._drive(self._core.get(job_id, wait))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; ApiError 409 `conflict` once it is final."""
        return self._drive(self._core.cancel(job_id))

    def run(self, model: str, input: Any, timeout_s: float = 60.0,
            **options: Unpack[SubmitOptions]) -> Job:
        """Submit and wait for the final job; ApiError `timeout` if not final in `timeout_s`."""
        return self._drive(self._core.run(model, input, timeout_s, options))

    def models(self) -> list[ModelInfo]:
        """Served models: schemas, batching and scaling config, live workers, queue depth."""
        return self._drive(self._core.models())

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """The job's status changes as they happen (`queued`, `running`, then the final one),
        reconnecting with `Last-Event-ID` when a connection ends before the final event."""
        last = 0
        for _ in range(FOLLOW_RECONNECTS):
            request = self._core.events_request(job_id, last)
            with _transport_errors(request), self._http.stream(
                    request.method, request.url, headers=request.headers,
                    timeout=self._core.events_timeout
                    ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_of(response)
                parser = SseParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        last = event.id
                        yield event
                        if last >= FINAL_EVENT_ID:
                            return
        raise ApiError(None, "timeout", f"events of job {job_id}: no final event")

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base[httpx.AsyncClient]):
    """The asyncio twin of `Client`: the same calls, awaited."""

    _http_class = httpx.AsyncClient

    async def _drive(self, call: _Call[T]) -> T:
        reply = None
        while not isinstance(step := _resume(call, reply), _Done):
            reply = None
            with _transport_errors(step):
                if isinstance(step, _Pause):
                    await asyncio.sleep(step.seconds)
                else:
                    reply = await self._http.send(step)
        return step.value

    async def submit(self, model: str, input: Any, *, wait_s: float | None = None,
                     **options: Unpack[SubmitOptions]) -> Job:
        """See `Client.submit`."""
        return await self._drive(self._core.submit(model, input, wait_s, options))

    async def submit_many(self, model: str, inputs: list[Any],
                          **options: Unpack[SubmitOptions]) -> list[Job]:
        """See `Client.submit_many`."""
        return await self._drive(self._core.submit_many(model, inputs, options))

    async def get(self, job_id: str, wait: float | None = None) -> Job:
        """See `Client.get`."""
        return await self._drive(self._core.get(job_id, wait))

    async def cancel(self, job_id: str) -> Job:
        """See `Client.cancel`."""
        return await self._drive(self._core.cancel(job_id))

    async def run(self, model: str, input: Any, timeout_s: float = 60.0,
                  **options: Unpack[SubmitOptions]) -> Job:
        """See `Client.run`."""
        return await self._drive(self._core.run(model, input, timeout_s, options))

    async def models(self) -> list[ModelInfo]:
        """See `Client.models`."""
        return await self._drive(self._core.models())

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's status changes as they happen; see `Client.events`."""
        last = 0
        for _ in range(FOLLOW_RECONNECTS):
            request = self._core.events_request(job_id, last)
            with _transport_errors(request):
                async with self._http.stream(
                        request.method, request.url, headers=request.headers,
                        timeout=self._core.events_timeout
                        ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error_of(response)
                    parser = SseParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            last = event.id
                            yield event
                            if last >= FINAL_EVENT_ID:
                                return
        raise ApiError(None, "timeout", f"events of job {job_id}: no final event")

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
