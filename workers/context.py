"""Where the current worker process runs, for user model code (public as
`asyncinfer.worker_context`):

    from asyncinfer import worker_context
    worker_context().worker_index, worker_context().device
"""

from __future__ import annotations

from shared.model import ModelContext

_current: ModelContext | None = None


def set_current(ctx: ModelContext) -> None:
    global _current
    _current = ctx


def current() -> ModelContext:
    """The context of this worker process; raises outside a worker."""
    if _current is None:
        raise RuntimeError("not inside an asyncinfer worker process")
    return _current
