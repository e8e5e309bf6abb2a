"""The Celery application every process shares: broker, serialisation and delivery settings.

Batches are recovered through the Redis stream's pending entries (the batcher reclaims them),
not through Celery redelivery, so tasks are acknowledged early and Celery never runs a batch
twice on its own; see docs/architecture.md.
"""

from __future__ import annotations

from celery import Celery

from shared.redisconn import celery_broker
from shared.settings import Settings

BATCH_TASK = "asyncinfer.run_batch"


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to the settings' Redis. Workers register the batch task on it."""
    app = Celery("asyncinfer", set_as_current=False)
    app.conf.update(
        **celery_broker(settings),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        # Task events cost a Redis publish per task in the batcher and the worker; Flower
        # enables them on the workers itself (its enable_events timer) while it runs.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            "visibility_timeout": 3600,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue="asyncinfer.default",
    )
    return app
