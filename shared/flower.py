"""How Flower is started, the one way for `asyncinfer up`, compose and Kubernetes to agree on:
`celery -A shared.flowerapp flower`, the broker from the asyncinfer settings in the environment
and the basic-auth credentials in `FLOWER_BASIC_AUTH`, so no secret is on a command line."""

from __future__ import annotations

import sys

from shared.settings import Settings


def flower_command(settings: Settings, *, address: str = "127.0.0.1"
                   ) -> tuple[list[str], dict[str, str]]:
    """Arguments (no secrets) and the environment to add (credentials) of a Flower process."""
    args = [sys.executable, "-m", "celery", "-A", "shared.flowerapp", "flower",
            f"--port={settings.flower_port}", f"--address={address}",
            "--purge_offline_workers=60"]
    return args, {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{settings.flower_password}"}
