"""One exception root. Each error knows its HTTP status and its contract `type` string."""

from __future__ import annotations

from typing import Any


class AsyncInferError(Exception):
    """Root of every error asyncinfer raises on purpose."""

    status: int = 500
    type: str = "internal"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def body(self) -> dict[str, Any]:
        """The JSON error body of the HTTP contract."""
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        err.update(self.detail)
        return {"error": err}

    def headers(self) -> dict[str, str]:
        return {}


class Unauthorized(AsyncInferError):
    status, type = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(AsyncInferError):
    status, type = 404, "not_found"


class Conflict(AsyncInferError):
    status, type = 409, "conflict"


class PayloadTooLarge(AsyncInferError):
    status, type = 413, "payload_too_large"


class InvalidInput(AsyncInferError):
    status, type = 422, "invalid_input"


class QueueFull(AsyncInferError):
    status, type = 429, "queue_full"

    def __init__(self, message: str, retry_after_s: int, **detail: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineUnmeetable(QueueFull):
    """The job cannot finish by its `deadline_ms` given the queue ahead of it: not accepted."""

    status, type = 429, "deadline_unmeetable"


class Unavailable(AsyncInferError):
    status, type = 503, "unavailable"


class ConfigError(AsyncInferError):
    """A models configuration or setting that cannot work; raised at start-up."""

    type = "config"


class Fenced(AsyncInferError):
    """A batcher's fenced write found its term on the model over: another batcher leads now.
    Never reaches a client; the batcher ends its term and changes nothing more."""

    status, type = 503, "fenced"
