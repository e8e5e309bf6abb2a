"""`asyncinfer up`: the whole system on this machine, stopped cleanly by Ctrl-C.

Redis (a private server unless ASYNCINFER_REDIS_URL is set), the gateway, the batcher, the
autoscaler (which starts the workers) and Flower, each a child process in its own session that
dies with this one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from asyncinfer import status
from asyncinfer.secrets import StackSecrets, ensure_secrets
from shared.flower import flower_command
from shared.procs import spawn, terminate, wait_port
from shared.redisconn import redact
from shared.redisserver import RedisServer
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Stack:
    settings: Settings
    state_dir: Path
    with_flower: bool = True
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis: RedisServer | None = None
    secrets: StackSecrets | None = None

    def start(self) -> None:
        if "ASYNCINFER_REDIS_URL" not in os.environ:
            self.redis = RedisServer(self.state_dir / "redis").start()
            self.settings = self.settings.model_copy(update={"redis_url": self.redis.url})
        self.secrets = ensure_secrets(self.state_dir, self.settings)
        self.settings = self.settings.model_copy(update=self.secrets.settings_update())
        env = {"ASYNCINFER_REDIS_URL": self.settings.redis_url,
               "ASYNCINFER_LOG_DIR": str(self.state_dir / "logs"), **self.secrets.values}
        logs = self.state_dir / "logs"
        self.procs["gateway"] = spawn(["-m", "gateway"], env, logs / "gateway.log")
        self.procs["batcher"] = spawn(["-m", "batcher"], env, logs / "batcher.log")
        self.procs["autoscaler"] = spawn(["-m", "workers.autoscaler"], env,
                                         logs / "autoscaler.log")
        if self.with_flower:
            args, credentials = flower_command(self.settings)
            self.procs["flower"] = spawn(args, {**env, **credentials}, logs / "flower.log")
        if not wait_port(self.settings.gateway_host, self.settings.gateway_port, 60):
            raise RuntimeError(f"gateway did not start; see {logs / 'gateway.log'}")

    def urls(self) -> dict[str, str]:
        s = self.settings
        out = {"gateway": f"http://{s.gateway_host}:{s.gateway_port}",
               "redis": redact(s.redis_url), "logs": str(self.state_dir / "logs")}
        if self.with_flower:
            where = self.secrets.path if self.secrets else "ASYNCINFER_FLOWER_PASSWORD"
            out["flower"] = (f"http://127.0.0.1:{s.flower_port} (user {s.flower_user}, "
                             f"password in {where})")
        return out

    def crashed(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        # Workers drain through the autoscaler; it and the batcher go first, the gateway last.
        for name in ("autoscaler", "batcher", "flower", "gateway"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                terminate(proc, grace_s=30 if name == "autoscaler" else 10)
        if self.redis is not None:
            self.redis.stop()


def _role_rows(stack: Stack) -> list[status.RoleRow]:
    procs: dict[str, subprocess.Popen[bytes] | None] = {}
    if stack.redis is not None:
        procs["redis"] = stack.redis.proc
    procs.update(stack.procs)
    urls = stack.urls()
    logs = stack.state_dir / "logs"
    details = {name: urls.get(name) or str(logs / f"{name}.log") for name in procs}
    return status.role_rows(procs, details)


def up(settings: Settings, state_dir: Path, with_flower: bool = True) -> int:
    """Run the stack in the foreground until SIGINT/SIGTERM; returns an exit code."""
    stack = Stack(settings, state_dir, with_flower)
    stopping = False

    def _stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    problems = status.ProblemTail(state_dir / "logs")
    try:
        stack.start()
        print("asyncinfer is up:", flush=True)
        for name, url in stack.urls().items():
            print(f"  {name:<8} {url}", flush=True)
        if stack.secrets is not None and stack.secrets.created:
            print(f"New secrets, shown this once (kept in {stack.secrets.path}):", flush=True)
            for name, value in stack.secrets.created.items():
                print(f"  {name}={value}", flush=True)
        print(status.table(_role_rows(stack)), flush=True)
        print("Ctrl-C stops everything. Problems in the logs show up below.", flush=True)
        while not stopping:
            for line in problems.look():
                print(f"  ! {line}", file=sys.stderr, flush=True)
            dead = stack.crashed()
            if dead:
                print(status.table(_role_rows(stack)), file=sys.stderr, flush=True)
                for name in dead:
                    log_path = state_dir / "logs" / f"{name}.log"
                    print(f"stopping: {name} exited; the end of {log_path}:", file=sys.stderr)
                    for line in status.last_lines(log_path):
                        print(f"  | {line}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()
        print("asyncinfer stopped.", flush=True)
