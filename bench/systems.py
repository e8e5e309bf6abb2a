"""The servers a benchmark drives, each started and stopped cleanly (no process left behind).

- `TrivialServer`: bench.trivial_server on uvicorn (the bare HTTP ceiling).
- `GatewayOnly`: a private Redis plus `python -m gateway`, nothing else: the submit path alone.
- `OursStack`: `asyncinfer up --no-flower` with a models file that pins the mlp worker count.
- `BentoServer`: `bentoml serve` of bench/bentoml_service in its own virtual environment.

Every child runs in its own session and dies with this process (shared.procs.spawn), and is
stopped by a signal to its process group, escalating to SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bench.docs import REPO
from shared import keys
from shared.procs import die_with_parent, free_port, terminate, wait_port
from shared.redisserver import RedisServer

BENTO_DIR = REPO / "bench" / "bentoml_service"
MODEL = "mlp"
MLP_CLASS = "workers.builtin.mlp:MLPModel"
MAX_BATCH_SIZE = 64
MAX_LATENCY_MS = 250
# The peer's version, pinned: its batching changes between releases (checked on PyPI
# 2026-05, the newest release then). torch as the project pins it.
BENTOML_PIN = "bentoml==1.4.40"
TORCH_PIN = "torch==2.13.0"


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
          unset: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """A child in its own session (so its whole group can be signalled) that gets SIGTERM when
    this process dies. `args[0] == '-m'` runs this Python."""
    if args[0] == "-m":
        args = [sys.executable, *args]
    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=cwd, env=full, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)


def http_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_http(url: str, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    hint = f"; see {log}" if log else ""
    raise RuntimeError(f"{what} did not come up at {url} within {timeout_s:.0f} s{hint}")


def model_table(name: str, class_path: str, workers: int, **options: object) -> str:
    """One `[models.NAME]` table with exactly `workers` workers from the start (no scale from
    zero, no scaling during a run)."""
    lines = [f"[models.{name}]", f'class = "{class_path}"']
    lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    lines += [f"min_workers = {workers}", f"max_workers = {workers}",
              "scale_down_delay_s = 3600"]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers and booleans read the same in TOML


def models_toml(workers: int) -> str:
    """Only the mlp model, with `max_batch_size=64` and `max_latency_ms=250` like the peer's."""
    return model_table(MODEL, MLP_CLASS, workers, max_batch_size=MAX_BATCH_SIZE,
                       max_latency_ms=MAX_LATENCY_MS)


@dataclass
class Server:
    """Base: one child process tree, a URL, a log file."""

    work_dir: Path
    name: str = "server"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Where the processes start: `python -m` imports from there first (another copy of the
    # code can be measured by pointing this and PYTHONPATH at it).
    cwd: Path = REPO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.work_dir / f"{self.name}.log"

    def start(self) -> Self:
        raise NotImplementedError

    def roots(self) -> list[int]:
        """Process trees whose CPU counts as this server's."""
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace_s=30)
            self.proc = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class TrivialServer(Server):
    name: str = "trivial"

    def start(self) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(["-m", "bench.trivial_server", "--port", str(self.port)],
                          {"PYTHONPATH": str(REPO)}, self.log, cwd=self.cwd)
        wait_http(f"{self.url}/healthz", 30, "trivial server", self.log)
        return self


def _stack_env(redis_url: str, port: int, models: Path, devices: str,
               state: Path) -> dict[str, str]:
    return {"ASYNCINFER_REDIS_URL": redis_url, "ASYNCINFER_GATEWAY_PORT": str(port),
            "ASYNCINFER_MODELS": str(models), "ASYNCINFER_DEVICES": devices,
            "ASYNCINFER_LOG_LEVEL": "WARNING", "ASYNCINFER_LOG_DIR": str(state / "logs")}


@dataclass
class GatewayOnly(Server):
    """Redis and the gateway alone: submits queue up, nothing consumes them."""

    name: str = "gateway-only"
    redis: RedisServer | None = None

    def start(self) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        models = self.work_dir / "models.toml"
        models.write_text(models_toml(1))
        self.redis = RedisServer(self.work_dir / "redis").start()
        env = _stack_env(self.redis.url, self.port, models, "cpu:1", self.work_dir)
        self.proc = spawn(["-m", "gateway"], env, self.log, cwd=self.cwd)
        wait_http(f"{self.url}/readyz", 60, "gateway", self.log)
        return self

    def roots(self) -> list[int]:
        extra = [self.redis.proc.pid] if self.redis is not None and self.redis.proc else []
        return super().roots() + extra

    def flush(self) -> None:
        """Drop the queued jobs between runs."""
        if self.redis is not None:
            import redis

            client = redis.Redis.from_url(self.redis.url)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        super().stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.work_dir / "redis", ignore_errors=True)


@dataclass
class OursStack(Server):
    """`asyncinfer up --no-flower --state-dir <tmp>`: Redis, gateway, batcher, autoscaler and
    the workers of `models` (a models file; default: `workers` mlp workers) on
    ASYNCINFER_DEVICES=`devices`."""

    name: str = "asyncinfer"
    devices: str = "cpu:1"
    workers: int = 1
    models: str = ""
    workers_timeout_s: float = 120.0  # for the workers to serve, once `up` answers
    env: dict[str, str] = field(default_factory=dict)  # more settings, e.g. an fsync policy

    def start(self) -> Self:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        models = self.work_dir / "models.toml"
        models.write_text(self.models or models_toml(self.workers))
        env = {**_stack_env("", self.port, models, self.devices, self.work_dir), **self.env}
        del env["ASYNCINFER_REDIS_URL"]  # `up` starts its own private Redis without it
        self.proc = spawn(["-m", "asyncinfer.cli", "up", "--no-flower", "--state-dir",
                           str(self.work_dir / "state")], env, self.log, cwd=self.cwd,
                          unset=("ASYNCINFER_REDIS_URL",))
        if not wait_port("127.0.0.1", self.port, 90):
            raise RuntimeError(f"asyncinfer up did not start; see {self.log}")
        for name, table in tomllib.loads(models.read_text())["models"].items():
            self.wait_workers(self.workers_timeout_s, name, int(table.get("min_workers", 1)))
        return self

    def model_info(self, model: str = MODEL) -> dict[str, Any]:
        info: dict[str, Any] = http_json(f"{self.url}/v1/models/{model}")
        return info

    def wait_workers(self, timeout_s: float, model: str = MODEL, workers: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"asyncinfer up exited; see {self.log}")
            try:
                info = self.model_info(model)
                ready = [w for w in info.get("workers", []) if w.get("state") in ("ready",
                                                                                  "busy")]
                if len(ready) >= workers and info["batcher"].get("slots", 0) > 0:
                    return
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{workers} {model} worker(s) not ready in {timeout_s:.0f} s; "
                           f"see {self.work_dir / 'state' / 'logs'}")

    @property
    def redis_url(self) -> str:
        """The private Redis that `up` started: its log names it."""
        found = re.findall(r"redis\s+(redis://\S+)", self.log.read_text(errors="replace"))
        if not found:
            raise RuntimeError(f"no Redis URL in {self.log}")
        return str(found[-1])

    def worker_reports(self, model: str, since_ms: int, until_ms: int) -> list[dict[str, str]]:
        """The workers' batch reports (the model's completions stream: rows, predict_ms, ...)
        written between `since_ms` and `until_ms` (wall clock, the stream's id unit). The
        stream keeps its last COMPLETIONS_MAXLEN reports at least; more in the window than
        that raises, rather than summing up part of it."""
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=10)
        try:
            entries = client.xrange(keys.completions(model), min=f"{since_ms}-0",
                                    max=f"{until_ms}-0") or []
        finally:
            client.close()
        if len(entries) >= keys.COMPLETIONS_MAXLEN:
            raise RuntimeError(f"{len(entries)} reports in the window: the stream was trimmed")
        return [{str(k): str(v) for k, v in fields.items()} for _, fields in entries if fields]

    def wait_idle(self, timeout_s: float, model: str = MODEL) -> bool:
        """Until no job is queued or running (a run's stragglers must not leak into the next)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if int(self.model_info(model).get("queue_depth", 0)) == 0:
                    return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.25)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            # `up` stops its children itself (autoscaler drains the workers) on SIGTERM.
            terminate(self.proc, grace_s=60)
            self.proc = None
            # The benchmark's jobs (their append-only file) are of no further use.
            shutil.rmtree(self.work_dir / "state" / "redis", ignore_errors=True)


def bento_venv(root: Path) -> Path:
    return root / ".venv-bentoml"


def _offline_bento_venv(venv: Path, wheels: Path, run: Callable[..., None]) -> None:
    """A machine with no package index (a lent GPU machine): BentoML's wheels from `wheels`
    (made where pip works, by bench/gpu_wheels.sh) in a venv that also sees this interpreter's
    own packages, so BentoML serves with the same torch (a CUDA build there) as asyncinfer."""
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    py = venv / "bin" / "python"
    # Behind the venv's own site-packages, so BentoML's pins win over this interpreter's.
    mine = [p for p in site.getsitepackages() if Path(p).is_dir()]
    probe = "import sysconfig; print(sysconfig.get_path('purelib'))"
    target = subprocess.run([str(py), "-c", probe], check=True, capture_output=True,
                            text=True).stdout.strip()
    Path(target, "_bench_base.pth").write_text("".join(f"{p}\n" for p in mine))
    files = sorted(str(f) for f in wheels.glob("*.whl"))
    if not any(Path(f).name.startswith("bentoml-") for f in files):
        raise OSError(f"no bentoml wheel in {wheels}")
    # pip comes from this interpreter's packages through the .pth; --ignore-installed puts
    # every wheel in the venv rather than trusting a version found behind it.
    run(str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
        "--ignore-installed", *files)


def ensure_bento_venv(root: Path, log: Path) -> Path:
    """BentoML (pinned) and torch in their own virtual environment, made once, then reused;
    made again when the pin changes. With BENCH_BENTO_WHEELS naming a folder of wheels, made
    from those with this interpreter's torch instead (no package index needed). Raises
    RuntimeError when they cannot be installed (no package index reachable, say)."""
    venv = bento_venv(root)
    py = venv / "bin" / "python"
    marker = venv / ".complete"
    wheels = os.environ.get("BENCH_BENTO_WHEELS")
    pins = (TORCH_PIN, BENTOML_PIN) if not wheels else (f"offline:{wheels}", BENTOML_PIN)
    if py.exists() and marker.exists() and marker.read_text().split() == list(pins):
        return venv
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing {BENTOML_PIN} into {venv} (once; log {log})", file=sys.stderr,
          flush=True)
    with open(log, "ab") as out:
        def run(*args: str) -> None:
            subprocess.run(args, check=True, stdout=out, stderr=subprocess.STDOUT)

        try:
            if wheels:
                shutil.rmtree(venv, ignore_errors=True)
                _offline_bento_venv(venv, Path(wheels), run)
            else:
                if not py.exists():
                    run(sys.executable, "-m", "venv", str(venv))
                # A pinned torch resolves to the local CPU wheel; an unpinned one would pull
                # CUDA. Fail fast where no package index answers (a lent GPU machine, say).
                run(str(py), "-m", "pip", "install", "-q", "--retries", "1", "--timeout", "20",
                    *pins)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise RuntimeError(f"cannot install {BENTOML_PIN} (see {log}): {exc}") from exc
    marker.write_text("\n".join(pins) + "\n")
    return venv


@dataclass
class BentoServer(Server):
    name: str = "bentoml"
    venv: Path = Path()
    workers: int = 1
    device: str = "cpu"

    def launch(self) -> Self:
        """Start `bentoml serve` without waiting for it to be ready."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = {"PYTHONPATH": str(REPO), "BENTOML_DO_NOT_TRACK": "true",
               "BENTOML_HOME": str(self.work_dir / "bentoml-home"),
               "BENCH_BENTO_WORKERS": str(self.workers), "BENCH_TORCH_THREADS": "1",
               "BENCH_DEVICE": "cuda:0" if self.device.startswith("cuda") else "cpu",
               "VIRTUAL_ENV": str(self.venv),
               "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}"}
        cmd = [str(self.venv / "bin" / "bentoml"), "serve", "service:MLPService",
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = spawn(cmd, env, self.log, cwd=BENTO_DIR)
        return self

    def start(self) -> Self:
        return self.launch().wait_ready()

    def wait_ready(self) -> Self:
        """Until it answers /readyz (after `launch`: several can start at once)."""
        wait_http(f"{self.url}/readyz", 240, f"bentoml ({self.name})", self.log)
        return self

    def wait_recovered(self, body: bytes, timeout_s: float = 120.0) -> float:
        """Until 3 single requests in a row answer 200; returns the seconds it took.

        Driven far past its peak, BentoML's dispatcher goes on answering 503 for a while after
        the load stops (its latency estimate has to come back down); a run that starts before
        it has recovered would measure that, not the load it is given."""
        started = time.monotonic()
        ok = 0
        while ok < 3 and time.monotonic() - started < timeout_s:
            req = urllib.request.Request(f"{self.url}/predict", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    ok = ok + 1 if resp.status == 200 else 0
            except (urllib.error.URLError, OSError):
                ok = 0
                time.sleep(0.5)
        return time.monotonic() - started

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of bentoml_service_adaptive_batch_size over all workers."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("bentoml_service_adaptive_batch_size_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("bentoml_service_adaptive_batch_size_count"):
                count += float(line.rsplit(" ", 1)[1])
        return total, count


# -- CPU accounting over a process tree -------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return "?"
    if "--multiprocessing-fork" in words or any("multiprocessing.resource_tracker" in w
                                                for w in words):
        return ""  # a multiprocessing child (a gateway's server process): its parent's label
    if "-m" in words:
        i = words.index("-m")
        rest = words[i + 1:]
        name = rest[0] if rest else "python"
        if name == "workers" and "--index" in rest:
            return f"worker-{rest[rest.index('--index') + 1]}"
        if name.startswith("_bentoml_impl"):
            return "bentoml-worker"
        return {"asyncinfer.cli": "asyncinfer-up", "workers.autoscaler": "autoscaler"}.get(
            name, name)
    if any(Path(w).name == "asyncinfer" for w in words[:2]):
        return "asyncinfer-up"
    base = Path(words[0]).name
    if base.startswith("redis-server"):
        return "redis"
    if base == "bentoml" or any("bentoml" in w for w in words[:3]):
        return "bentoml-" + ("worker" if any("worker" in w for w in words) else "serve")
    if base == "asyncinfer":
        return "asyncinfer-up"
    return base


def tree_cpu(root: int | list[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of `root` (or several) and every descendant, by pid, labelled."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, tuple[str, float]] = {}
    todo = [(pid, "?") for pid in (root if isinstance(root, list) else [root])]
    while todo:
        pid, above = todo.pop()
        label = _label(pid) or above
        if pid in cpu:
            out[pid] = (label, cpu[pid])
        todo.extend((child, label) for child in children.get(pid, []))
    return out


def cpu_delta(before: dict[int, tuple[str, float]],
              after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two `tree_cpu` snapshots, summed by label."""
    out: dict[str, float] = {}
    for pid, (label, total) in after.items():
        spent = total - before.get(pid, (label, 0.0))[1]
        out[label] = out.get(label, 0.0) + max(0.0, spent)
    return out
