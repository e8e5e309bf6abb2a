"""Typed settings, read from the environment (prefix ``ASYNCINFER_``) once per entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the system. Build it once in an entry point and pass it down."""

    model_config = SettingsConfigDict(env_prefix="ASYNCINFER_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// (TLS) URL, with user, password and db index as needed: "
        "rediss://USER:PASSWORD@HOST:PORT/DB.",
    )
    redis_timeout_s: float = Field(2.0, description="Timeout of one Redis command, seconds.")
    redis_tls_ca_file: str | None = Field(
        None, description="CA bundle that signed the Redis server's certificate (rediss://); "
        "unset: the system's CAs.")
    redis_tls_cert_file: str | None = Field(
        None, description="Client certificate for Redis servers that require one (rediss://).")
    redis_tls_key_file: str | None = Field(None, description="Key of redis_tls_cert_file.")
    redis_appendfsync: Literal["always", "everysec"] = Field(
        "always", description="fsync policy of the Redis that `asyncinfer up` starts itself "
        "(not used with ASYNCINFER_REDIS_URL): 'always' answers a write only once it is on disk, "
        "so no answered 202 is lost even to a power cut; 'everysec' answers sooner (the p50 "
        "14-26% lower at 200 and 400 jobs/s with two MLP workers on 2 cores, "
        "docs/deployment.md) and can lose about a second of answered writes to a power cut.")

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_processes: int = Field(
        0, ge=0, le=64, description="HTTP server processes of one gateway, sharing its port; 0: "
        "one per 4 usable cores, at most 4 (one process tops out near one core).")
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
    idempotency_ttl_s: int = Field(
        3600, description="How long an Idempotency-Key is remembered; never longer than the jobs "
        "it names stay readable (result_ttl_s), so a replay always finds them.")

    devices: str = Field(
        "auto",
        description="Devices this host's autoscaler owns: 'auto' (every visible GPU, else one CPU "
        "slot per core), 'cpu:N', 'cpu:I-J', 'cuda', or 'cuda:0,1' / 'cuda:GPU-...' (see "
        "docs/gpu.md).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads of one GPU worker; unset: the host's cores / its "
        "devices (a CPU slot always computes on its one core).")
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="How often a worker's Celery consumer loop publishes its heartbeat."
    )
    heartbeat_lapse_s: float = Field(
        3.0, gt=0, description="A worker silent this long is dead: its batches run again."
    )
    reclaim_idle_s: float = Field(
        60.0, description="Webhook deliveries idle this long are taken over from a dead gateway."
    )
    max_attempts: int = Field(
        3, ge=1, description="Times a job may take its worker down while running alone before it "
        "fails as poison and goes to the dead letters.")
    lookahead_batches: int = Field(3, description="Full batches a batcher reads ahead.")
    lease_ttl_s: float = Field(5.0, description="A batcher's lease on its model; takeover time.")

    task_events: bool = Field(
        False,
        description="Send Celery task events even with no monitor; Flower turns them on by itself "
        "while it runs, so they cost nothing when nobody watches.",
    )
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: str = Field(
        "", description="Basic-auth password of that Flower; `asyncinfer up` generates one on "
        "first start (kept in its state directory).")

    log_dir: str | None = Field(None, description="Where the local launcher writes worker logs.")
    webhook_secret: str = Field(
        "", description="Key(s) of the webhook signatures (Standard Webhooks, `whsec_...`); "
        "several separated by spaces sign with each (rotation). Empty: webhooks are refused "
        "(422). `asyncinfer up` generates one on first start.")
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
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="Webhook targets allowed although private, loopback or link-local: CIDR "
        "ranges ('10.1.0.0/16') or exact host names ('hooks.internal'). JSON list.",
    )
    fault_injection: bool = Field(
        False, description="Accept the fault hooks of models (the synthetic model's `fail`, "
        "`sleep_s`, `pre_sleep_s`): for tests and drills only; off, they are refused (422).")
