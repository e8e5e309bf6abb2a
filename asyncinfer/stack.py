"""`asyncinfer up`: the whole system on this machine, supervised, stopped cleanly by Ctrl-C.

Redis (a private server unless ASYNCINFER_REDIS_URL is set), the gateway, the batcher, the
autoscaler (which starts the workers) and Flower, each a child process in its own session that
dies with this one. A role that crashes is restarted with backoff (asyncinfer.supervisor) and
counted in Redis for the gateway's /metrics; the private Redis restarts on its own data. A role
that keeps dying on start stops the stack with exit code 1 and the end of its log.
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

import redis
from redis.exceptions import RedisError

from asyncinfer import status
from asyncinfer.secrets import StackSecrets, ensure_secrets
from asyncinfer.supervisor import Role, RoleFailed, Supervisor
from shared import keys
from shared.flower import flower_command
from shared.procs import spawn, wait_port
from shared.redisconn import connect_sync, redact
from shared.redisserver import RedisServer
from shared.settings import Settings

log = logging.getLogger(__name__)

# The Python entry point of each role. The autoscaler is the same command in docker-compose.yml:
# one launcher path for both ways of running on one host.
ROLE_MODULES = {"gateway": "gateway", "batcher": "batcher", "autoscaler": "workers.autoscaler"}
# Workers drain through the autoscaler; it and the batcher go first, the gateway, then Redis last.
STOP_ORDER = ["autoscaler", "batcher", "flower", "gateway", "redis"]
POLL_S = 0.2


@dataclass
class Stack:
    settings: Settings
    state_dir: Path
    with_flower: bool = True
    redis_server: RedisServer | None = None
    supervisor: Supervisor | None = None
    secrets: StackSecrets | None = None
    _counts_dirty: bool = True  # publish the zeros at start too
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def _env(self) -> dict[str, str]:
        secrets = self.secrets.values if self.secrets is not None else {}
        return {"ASYNCINFER_REDIS_URL": self.settings.redis_url,
                "ASYNCINFER_LOG_DIR": str(self.logs), **secrets}

    def _python_role(self, name: str, grace_s: float = 10.0) -> Role:
        path = self.logs / f"{name}.log"
        return Role(name, lambda: spawn(["-m", ROLE_MODULES[name]], self._env(), path), path,
                    grace_s)

    def _flower_role(self) -> Role:
        path = self.logs / "flower.log"
        # The broker URL and the password reach Flower through its environment, never argv.
        args, credentials = flower_command(self.settings)
        return Role("flower", lambda: spawn(args, {**self._env(), **credentials}, path), path)

    def _redis_role(self, server: RedisServer) -> Role:
        def start() -> subprocess.Popen[bytes]:
            server.start(wait_s=0)
            assert server.proc is not None
            # Others reconnect on their own; waiting here only orders the first start.
            wait_port("127.0.0.1", server.port, 10)
            return server.proc

        return Role("redis", start, server.data_dir / "redis.log", stop_grace_s=5)

    def roles(self) -> list[Role]:
        out = [] if self.redis_server is None else [
            self._redis_role(self.redis_server)]
        out += [self._python_role("gateway"), self._python_role("batcher"),
                self._python_role("autoscaler", grace_s=30)]
        if self.with_flower:
            out.append(self._flower_role())
        return out

    def start(self) -> None:
        if "ASYNCINFER_REDIS_URL" not in os.environ:
            self.redis_server = RedisServer(self.state_dir / "redis",
                                            appendfsync=self.settings.redis_appendfsync)
            self.settings = self.settings.model_copy(
                update={"redis_url": self.redis_server.url})
        self.secrets = ensure_secrets(self.state_dir, self.settings)
        self.settings = self.settings.model_copy(update=self.secrets.settings_update())
        self.supervisor = Supervisor(self.roles(), on_restart=self._restarted)
        self.supervisor.start_all()

    def _restarted(self, role: Role) -> None:
        self._counts_dirty = True

    def poll(self) -> None:
        """Restart what crashed; raises RoleFailed when a role is given up."""
        assert self.supervisor is not None
        self.supervisor.poll()
        if self._counts_dirty:
            self._publish_counts()

    def _publish_counts(self) -> None:
        # Best effort and retried each poll: Redis itself may be what is restarting.
        assert self.supervisor is not None
        if self._client is None:
            self._client = connect_sync(self.settings)
        pipe = self._client.pipeline(transaction=False)
        for name, role in self.supervisor.roles.items():
            pipe.hset(keys.restarts(), name, role.loop.restarts)
        try:
            pipe.execute()
            self._counts_dirty = False
        except (RedisError, OSError):
            pass

    def ready(self) -> bool:
        s = self.settings
        return wait_port(s.gateway_host, s.gateway_port, 0.2)

    def urls(self) -> dict[str, str]:
        s = self.settings
        out = {"gateway": f"http://{s.gateway_host}:{s.gateway_port}",
               "redis": redact(s.redis_url), "logs": str(self.logs)}
        if self.with_flower:
            where = self.secrets.path if self.secrets else "ASYNCINFER_FLOWER_PASSWORD"
            out["flower"] = (f"http://127.0.0.1:{s.flower_port} (user {s.flower_user}, "
                             f"password in {where})")
        return out

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(STOP_ORDER)
        if self._client is not None:
            self._client.close()


def _role_rows(stack: Stack) -> list[status.RoleRow]:
    if stack.supervisor is None:
        return []
    roles = stack.supervisor.roles
    urls = stack.urls()
    return status.role_rows(
        {name: r.proc for name, r in roles.items()},
        {name: urls.get(name) or str(r.log_path or "") for name, r in roles.items()},
        restarts={name: r.loop.restarts for name, r in roles.items()},
        starting={name for name, r in roles.items() if not r.up})


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
        announced = False
        while not stopping:
            stack.poll()
            if not announced and stack.ready():
                announced = True
                print("asyncinfer is up:", flush=True)
                for name, url in stack.urls().items():
                    print(f"  {name:<8} {url}", flush=True)
                if stack.secrets is not None and stack.secrets.created:
                    print(f"New secrets, shown this once (kept in {stack.secrets.path}):",
                          flush=True)
                    for name, value in stack.secrets.created.items():
                        print(f"  {name}={value}", flush=True)
                print(status.table(_role_rows(stack)), flush=True)
                print("Ctrl-C stops everything. Crashed processes are restarted; problems in "
                      "the logs show up below.", flush=True)
            for line in problems.look():
                print(f"  ! {line}", file=sys.stderr, flush=True)
            time.sleep(POLL_S)
        return 0
    except RoleFailed as exc:
        print(status.table(_role_rows(stack)), file=sys.stderr, flush=True)
        print(exc.report(), file=sys.stderr, flush=True)
        return 1
    finally:
        stack.stop()
        print("asyncinfer stopped.", flush=True)
