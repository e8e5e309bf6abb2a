"""Typed settings, read from the environment (prefix ``ASYNCINFER_``) once per entry point."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the system. Build it once in an entry point and pass it down."""

    model_config = SettingsConfigDict(env_prefix="ASYNCINFER_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(2.0, description="Timeout of one Redis command, seconds.")

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    models: Path | None = Field(
        None, description="Models configuration file (TOML); None serves the built-in models."
    )
    max_body_bytes: int = 1_048_576
    max_wait_s: float = Field(60.0, description="Cap on `?wait=` and `Prefer: wait=`.")
    result_ttl_s: int = Field(3600, description="How long a finished job stays readable.")
    job_ttl_s: int = Field(3600, description="Default time a queued job may wait before expiring.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted API keys as sha256 hex digests; empty turns authentication off.",
    )
    idempotency_ttl_s: int = 86_400

    devices: str = Field(
        "auto",
        description="Devices this host's autoscaler owns: 'auto' (every visible GPU, else one CPU "
        "slot per core), 'cpu:N', 'cpu:I-J', 'cuda', or 'cuda:0,1' / 'cuda:GPU-...' (see "
        "docs/gpu.md).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads of one GPU worker; unset: the host's cores / its "
        "devices (a CPU slot always computes on its one core).")
    heartbeat_interval_s: float = 1.0
    reclaim_idle_s: float = Field(
        60.0, description="Stream entries idle this long are reclaimed from a dead consumer."
    )
    max_attempts: int = Field(3, description="Runs of one job before it goes to the dead letters.")
    lookahead_batches: int = Field(3, description="Full batches a batcher reads ahead.")
    lease_ttl_s: float = Field(5.0, description="A batcher's lease on its model; takeover time.")

    task_events: bool = Field(
        False,
        description="Send Celery task events even with no monitor; Flower turns them on by itself "
        "while it runs, so they cost nothing when nobody watches.",
    )
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: str = "asyncinfer"

    log_dir: str | None = Field(None, description="Where the local launcher writes worker logs.")
    webhook_secret: str = "change-me"
    log_level: str = "INFO"

    webhook_max_attempts: int = Field(
        5, ge=1, description="HTTP attempts per webhook before it is given up."
    )
    webhook_backoff_s: float = Field(
        1.0, gt=0, description="Delay before a webhook's first retry; doubles per attempt."
    )
    webhook_max_backoff_s: float = Field(300.0, gt=0, description="Cap on one retry delay.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Timeout of one webhook POST.")
    webhook_concurrency: int = Field(
        16, ge=1, description="Webhook POSTs in flight at once per gateway process."
    )
