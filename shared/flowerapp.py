"""The Celery app Flower monitors: `celery -A shared.flowerapp flower`.

Flower gets the broker (URL, password, TLS options) from the settings in its environment, as
every other process does, never from its command line, where `ps` would show the password.
Flower's own options come from `FLOWER_*` variables (`FLOWER_BASIC_AUTH=user:password`).
"""

from __future__ import annotations

from shared.celeryapp import make_celery
from shared.settings import Settings

app = make_celery(Settings())
