"""The one place Redis connections are made: every client of every process (redis-py asyncio
and sync, the pipelined `MuxRedis`, Celery's broker, Flower) is built here from the settings, so
TLS (`rediss://`), ACL user, password and db index mean the same thing everywhere.

redis-py clients use explicit timeouts, decoded replies and a blocking pool (redis-py 8 fails
fast past 100 connections; under a burst a caller should queue for a connection for a bounded
time, not get an error). Passwords never leave this module in printable form: `redact` is what
goes into logs and banners.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from shared.errors import ConfigError
from shared.muxredis import MuxRedis
from shared.settings import Settings

MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class RedisTarget:
    """Where and as whom to connect, parsed once from `redis_url` and the TLS settings."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    unix_path: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTarget:
        parts = urlsplit(settings.redis_url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis_url must be redis://, rediss:// or unix://, not "
                              f"{parts.scheme or 'no scheme'}://")
        path = parts.path.lstrip("/")
        db_text = path if parts.scheme != "unix" else ""
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        db_text = db_text or query.get("db", "0")
        if not db_text.isdigit():
            raise ConfigError(f"redis_url: db index must be a number, not {db_text!r}")
        return cls(
            host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=int(db_text),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss", ca_file=settings.redis_tls_ca_file,
            cert_file=settings.redis_tls_cert_file, key_file=settings.redis_tls_key_file,
            unix_path=parts.path if parts.scheme == "unix" else None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Verifying client context for rediss:// (the server's name and chain are checked)."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def redis_kwargs(self) -> dict[str, Any]:
        """Connection arguments shared by redis-py's sync and asyncio pools."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username,
                                  "password": self.password}
        if self.unix_path:
            return {**kwargs, "path": self.unix_path}
        kwargs |= {"host": self.host, "port": self.port}
        if self.tls:
            kwargs |= {"ssl_cert_reqs": "required", "ssl_ca_certs": self.ca_file,
                       "ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file,
                       "ssl_check_hostname": True}
        return kwargs


def redact(url: str) -> str:
    """`url` with its password replaced by `***`: what logs, banners and errors may show."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _pool_kwargs(settings: Settings, block_s: float) -> dict[str, Any]:
    return {
        **RedisTarget.from_settings(settings).redis_kwargs(),
        "max_connections": MAX_CONNECTIONS,
        "timeout": settings.redis_timeout_s,
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s + block_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 15,
        "retry_on_timeout": False,
    }


def _connection_class(target: RedisTarget, sync: bool) -> type[Any]:
    if target.unix_path:
        return redis.UnixDomainSocketConnection if sync else \
            aioredis.UnixDomainSocketConnection
    if target.tls:
        return redis.SSLConnection if sync else aioredis.SSLConnection
    return redis.Connection if sync else aioredis.Connection


def connect(settings: Settings, *, block_s: float = 0.0) -> aioredis.Redis:
    """An asyncio client. `block_s` is the longest BLOCK this client will issue: the socket
    timeout must exceed it (redis-py 8 defaults to 5 s and retries, turning a quiet stream into
    a minute-long hang)."""
    target = RedisTarget.from_settings(settings)
    pool = aioredis.BlockingConnectionPool(
        connection_class=_connection_class(target, sync=False), **_pool_kwargs(settings, block_s))
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


def connect_sync(settings: Settings) -> redis.Redis:
    """A blocking client (health checks, scripts, tests)."""
    target = RedisTarget.from_settings(settings)
    pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
        connection_class=_connection_class(target, sync=True), **_pool_kwargs(settings, 0.0))
    return redis.Redis.from_pool(pool)


def connect_mux(settings: Settings) -> MuxRedis:
    """The pipelined client of the gateway's hot path (shared.muxredis)."""
    return MuxRedis(RedisTarget.from_settings(settings), timeout_s=settings.redis_timeout_s)


def celery_broker(settings: Settings) -> dict[str, Any]:
    """Celery configuration of the broker connection: its URL and, for rediss://, the TLS
    options kombu's Redis transport takes (`broker_use_ssl`)."""
    target = RedisTarget.from_settings(settings)
    conf: dict[str, Any] = {"broker_url": settings.redis_url}
    if target.tls:
        conf["broker_use_ssl"] = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": target.ca_file,
            "ssl_certfile": target.cert_file, "ssl_keyfile": target.key_file}
    return conf
