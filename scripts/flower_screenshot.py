"""Screenshots of Flower for the docs: docs/img/flower-workers.png and docs/img/flower-tasks.png.

Not part of the test suite. It starts a private Redis, the batcher, two synthetic workers, the
gateway and Flower (behind basic auth), runs a short open-loop load through the gateway, then has
headless Chromium capture Flower's workers and tasks pages, and stops everything.

    .venv/bin/python scripts/flower_screenshot.py [--out docs/img] [--rate 40] [--duration 6]

Needs Chromium on PATH (Debian: `apt-get install -y chromium`). Chromium 156 sends credentials
embedded in the URL (http://user:pass@host/) for the page and its same-origin assets, so Flower
keeps its basic auth here.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncinfer.loadgen import Config, run_blocking
from shared.flower import flower_command
from shared.procs import free_port, spawn, terminate, wait_port
from shared.redisserver import RedisServer
from shared.settings import Settings

log = logging.getLogger("flower_screenshot")
USER, PASSWORD = "admin", "asyncinfer"
WORKERS = 2


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no Chromium on PATH: apt-get install -y chromium")


def screenshot(browser: str, url: str, out: Path, profile: Path) -> None:
    subprocess.run([
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,900",
        # Flower fills its tables from XHRs after load: give the page's scripts time to run.
        "--virtual-time-budget=5000", f"--screenshot={out}", url,
    ], check=True, capture_output=True, timeout=120)
    log.info("screenshot written path=%s", out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/img", type=Path)
    parser.add_argument("--rate", default=40.0, type=float, help="jobs per second")
    parser.add_argument("--duration", default=6.0, type=float, help="seconds of load")
    args = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="flower-shot-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis = RedisServer(tmp / "redis").start()
        gw_port, fl_port = free_port(), free_port()
        env = {"ASYNCINFER_REDIS_URL": redis.url, "ASYNCINFER_DEVICES": f"cpu:{WORKERS}",
               "ASYNCINFER_GATEWAY_PORT": str(gw_port), "ASYNCINFER_LOG_LEVEL": "WARNING"}
        logs = tmp / "logs"
        flower_args, credentials = flower_command(Settings(
            redis_url=redis.url, flower_port=fl_port, flower_user=USER, flower_password=PASSWORD))
        procs = [spawn(["-m", "batcher"], env, logs / "batcher.log"),
                 spawn(["-m", "gateway"], env, logs / "gateway.log"),
                 spawn(flower_args, {**env, **credentials}, logs / "flower.log")]
        procs += [spawn(["-m", "workers", "--model", "synthetic", "--index", str(i)],
                        {**env, "WORKER_INDEX": str(i)}, logs / f"worker-{i}.log")
                  for i in range(1, WORKERS + 1)]
        try:
            gateway, flower = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{fl_port}"
            if not (wait_port("127.0.0.1", gw_port, 60) and wait_port("127.0.0.1", fl_port, 60)):
                raise RuntimeError(f"gateway or Flower did not start; logs in {logs}")
            api = httpx.Client(base_url=flower, auth=(USER, PASSWORD), timeout=10)

            def online() -> bool:
                status = api.get("/api/workers", params={"status": 1}).json()
                return sum(1 for alive in status.values() if alive) >= WORKERS

            wait_for(online, 120, "Flower to see the workers online")
            log.info("load starting rate=%s duration_s=%s", args.rate, args.duration)
            cfg = Config(url=gateway, path="/v1/models/synthetic/jobs", arrivals="fixed",
                         rate=args.rate, duration_s=args.duration, warmup_s=0)
            summary = run_blocking(cfg, lambda i: b'{"input": {"x": 1.0}}')
            log.info("load done outcomes=%s", summary["status_counts"])
            authed = flower.replace("http://", f"http://{USER}:{PASSWORD}@")
            screenshot(browser, f"{authed}/", args.out / "flower-workers.png", tmp / "profile")
            screenshot(browser, f"{authed}/tasks", args.out / "flower-tasks.png", tmp / "profile")
        finally:
            for proc in reversed(procs):
                terminate(proc, grace_s=10)
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
