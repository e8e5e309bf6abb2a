"""A Celery task message as kombu's Redis transport stores it in a queue, built without a broker.

Why: the batcher hands a batch to a worker in one Lua step that moves the batch's stream entries
to the worker's consumer and pushes the task onto the worker's queue (see `batcher.dispatch`), so
no entry can be owned by a worker that has no task for it. The message is Celery's own protocol
(Celery builds the headers and body); only the envelope kombu's Redis transport would wrap around
it for a direct publish (exchange "", routing key = queue) is written here, JSON, never pickle.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery
from kombu.serialization import dumps


def task_message(app: Celery, task: str, queue: str, args: Sequence[Any],
                 kwargs: Mapping[str, Any] | None = None,
                 headers: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(task id, the JSON string to LPUSH onto `queue`) for one call of `task`; `headers` are
    added to Celery's (the worker reads them on `task.request`, e.g. a trace context)."""
    task_id = str(uuid.uuid4())
    # argsrepr/kwargsrepr given, lists summarised: Celery would otherwise saferepr() the job ids
    # of every batch (Flower shows these strings; a count says enough).
    shown = ", ".join(f"<{len(a)} items>" if isinstance(a, list) else repr(a) for a in args)
    msg = app.amqp.as_task_v2(task_id, task, args=list(args), kwargs=dict(kwargs or {}),
                              argsrepr=f"[{shown}]", kwargsrepr="{...}")
    if headers:
        msg.headers.update(headers)
    content_type, encoding, body = dumps(msg.body, serializer="json")  # type: ignore[no-untyped-call]
    raw = body.encode(encoding) if isinstance(body, str) else body
    envelope = {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": msg.headers,
        "properties": {
            **msg.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return task_id, json.dumps(envelope)
