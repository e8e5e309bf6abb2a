"""docker-compose.yml and the Dockerfile point only at real things: entry points, settings,
models, health checks, and the Redis and GPU options the design depends on.

No Docker engine is needed; `docker compose config` runs only where the compose plugin exists.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncinfer.stack import ROLE_MODULES
from shared import keys
from shared.devices import parse_devices
from shared.errors import ConfigError
from shared.model import ServingOptions
from shared.modelspec import load_specs
from shared.procs import spawn, terminate
from shared.redisconn import connect
from shared.settings import Settings
from workers.runtime import STUCK_GRACE_S

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

ENTRY_MODULES = {"gateway", "batcher", "workers", "workers.autoscaler"}
SETTINGS_ENV = {f"ASYNCINFER_{name.upper()}" for name in Settings.model_fields}
EXTRA_ENV = {"WORKER_INDEX", "CUDA_VISIBLE_DEVICES", "FLOWER_USER", "FLOWER_PASSWORD",
             "FLOWER_BASIC_AUTH", "GATEWAY_BIND", "PYTORCH_NVML_BASED_CUDA_CHECK",
             "NVIDIA_DRIVER_CAPABILITIES"}
# `${VAR}`, `${VAR:-default}`, `$VAR`; `$$` is compose's escape for a literal `$`.
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
INTERPOLATION = re.compile(rf"(?<!\$)\$(?:\{{({NAME})[^}}]*\}}|({NAME}))")
DEFAULTED = re.compile(rf"\$\{{({NAME}):?-([^}}]*)\}}")
REQUIRED = re.compile(rf"\$\{{({NAME}):?\?[^}}]*\}}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def resolve_defaults(value: str) -> str:
    """What compose substitutes when only the required variables are set (to `<NAME>`)."""
    return REQUIRED.sub(lambda m: f"<{m.group(1)}>", DEFAULTED.sub(lambda m: m.group(2), value))


def module_of(service: dict[str, Any]) -> str | None:
    args = argv(service)
    if len(args) >= 3 and args[0] in ("python", "python3") and args[1] == "-m":
        return args[2]
    return None


def worker_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if module_of(svc) == "workers"}


def autoscaler_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items()
            if module_of(svc) == "workers.autoscaler"}


def option(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def seconds(duration: str | int | float) -> float:
    """Compose duration ('90s', '1m30s', '2m') in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def python_snippets(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every `python -c CODE` in a command or health check, by service."""
    found: dict[str, str] = {}
    for name, svc in services.items():
        for where, test in (("command", argv(svc)),
                            ("healthcheck", (svc.get("healthcheck") or {}).get("test", []))):
            parts = [str(p) for p in test] if isinstance(test, list) else [str(test)]
            for i, part in enumerate(parts[:-1]):
                if part == "-c" and i >= 1 and parts[i - 1].startswith("python"):
                    found[f"{name}.{where}"] = parts[i + 1]
    return found


def run_snippet(code: str, redis_url: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCINFER_")}
    env["ASYNCINFER_REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=60,
                          capture_output=True).returncode


# -- structure -------------------------------------------------------------------------------


def test_compose_has_every_role(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "gateway", "batcher", "autoscaler", "flower"} <= set(services)
    assert all(module_of(services[role]) == role for role in ("gateway", "batcher"))


def test_every_command_runs_a_real_entry_point(services: dict[str, dict[str, Any]]) -> None:
    builtin = set(load_specs(None))
    for name, svc in services.items():
        if name == "redis":
            continue
        args = argv(svc)
        module = module_of(svc)
        if module is not None:
            assert module in ENTRY_MODULES, f"{name}: python -m {module} is no entry point"
            assert importlib.util.find_spec(module) is not None, f"{name}: {module} not found"
            if module == "workers":
                assert option(args, "--model") in builtin, f"{name}: unknown model"
        elif args and args[0] == "celery":
            assert "flower" in args, f"{name}: celery without the flower command"
            assert importlib.util.find_spec("flower") is not None
            # The app (hence the broker) from the settings: no URL, no password in the args.
            assert option(args, "-A") == "shared.flowerapp", name
            assert importlib.util.find_spec("shared.flowerapp") is not None
            assert not any(a.startswith(("--broker", "--basic_auth")) for a in args), name
        else:
            pytest.fail(f"{name}: command {args} is no entry point of the project")


def test_the_autoscaler_owns_the_devices_with_the_launcher_of_asyncinfer_up(
        services: dict[str, dict[str, Any]]) -> None:
    scaler = services["autoscaler"]
    # The same command `asyncinfer up` supervises: one launcher path, the one the real-process
    # tests drive (tests/workers/test_autoscaler.py, test_launcher.py, test_multihost.py).
    assert argv(scaler) == ["python", "-m", ROLE_MODULES["autoscaler"]]
    assert not scaler.get("profiles"), "the default `docker compose up` must scale workers"
    assert not gpu_devices(scaler)
    devices = environment(scaler)["ASYNCINFER_DEVICES"]
    assert {d.kind for d in parse_devices(devices)} == {"cpu"}
    # Workers are the autoscaler's processes, not services of their own.
    assert not worker_services(services)
    assert set(autoscaler_services(services)) == {"autoscaler", "autoscaler-gpu"}


# -- settings ---------------------------------------------------------------------------------


def test_every_variable_is_a_setting_or_known(services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE.read_text()
    allowed = SETTINGS_ENV | EXTRA_ENV
    named = set(re.findall(r"\bASYNCINFER_[A-Z0-9_]+", text))
    assert named - SETTINGS_ENV == set(), "ASYNCINFER_ names that are no Settings field"
    interpolated = {a or b for a, b in INTERPOLATION.findall(text)}
    assert interpolated - allowed == set()
    for name, svc in services.items():
        assert set(environment(svc)) - allowed == set(), name


def test_environment_values_parse_as_settings(services: dict[str, dict[str, Any]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ASYNCINFER_"):
            monkeypatch.delenv(name)
    for name, svc in services.items():
        env = {k: resolve_defaults(v) for k, v in environment(svc).items()}
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings = Settings()
        if name != "redis":
            assert settings.redis_url.startswith("redis://redis:"), name
        if module_of(svc) == "workers.autoscaler" and settings.devices != "cuda":
            assert parse_devices(settings.devices)  # 'cuda' needs the GPUs it reserves


def test_flower_uses_the_shared_broker_and_required_credentials(
        services: dict[str, dict[str, Any]]) -> None:
    flower = environment(services["flower"])
    assert flower["ASYNCINFER_REDIS_URL"] == environment(services["gateway"])[
        "ASYNCINFER_REDIS_URL"]
    user, _, password = resolve_defaults(flower["FLOWER_BASIC_AUTH"]).partition(":")
    assert user == Settings.model_fields["flower_user"].default
    assert password == "<FLOWER_PASSWORD>"  # required: compose stops without it


def test_no_secret_has_a_default(services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE.read_text()
    for secret in ("ASYNCINFER_WEBHOOK_SECRET", "FLOWER_PASSWORD"):
        uses = re.findall(rf"\$\{{{secret}(:?[-?])", text)
        assert uses and set(uses) <= {":?", "?"}, (secret, uses)
    assert Settings.model_fields["webhook_secret"].default == ""
    assert Settings.model_fields["flower_password"].default == ""


# -- redis ------------------------------------------------------------------------------------


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any],
                                           services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")  # stream lag (XINFO GROUPS) needs 7+
    args = argv(redis)
    assert args[0] == "redis-server"
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--appendfsync") == "everysec"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert int(option(args, "--hz")) >= 100  # BLOCK timeouts are quantised to 1/hz
    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test
    volume, _, target = str(redis["volumes"][0]).partition(":")
    assert target == "/data" and volume in (compose.get("volumes") or {})


# -- health and ordering ----------------------------------------------------------------------


def test_depends_on_waits_only_for_services_with_healthchecks(
        services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        if name != "redis":
            assert deps.get("redis", {}).get("condition") == "service_healthy", name
        for target, how in deps.items():
            assert target in services, f"{name} depends on unknown {target}"
            if how.get("condition") == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), target


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert (svc.get("healthcheck") or {}).get("test"), name


def test_project_services_run_under_init(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if str(svc.get("image", "")).startswith("asyncinfer") or "build" in svc:
            assert svc.get("init") is True, name


def test_workers_outlast_their_longest_batch(services: dict[str, dict[str, Any]]) -> None:
    longest = max([ServingOptions().batch_timeout_s,
                   *(s.options.batch_timeout_s for s in load_specs(None).values())])
    # The autoscaler drains all its workers at once on SIGTERM: each may finish its batch, and
    # a stuck predict gets its grace before the worker exits.
    for name, svc in autoscaler_services(services).items():
        assert seconds(svc["stop_grace_period"]) > longest + STUCK_GRACE_S + 10, name


def test_python_snippets_compile_and_import_real_names(
        services: dict[str, dict[str, Any]]) -> None:
    snippets = python_snippets(services)
    assert any(k.startswith("gateway.") for k in snippets)
    for where, code in snippets.items():
        tree = ast.parse(code, filename=where)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert importlib.util.find_spec(alias.name) is not None, (where, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}") is not None, (where, alias.name)


def test_http_healthchecks_hit_the_right_paths(services: dict[str, dict[str, Any]]) -> None:
    snippets = python_snippets(services)
    port = environment(services["gateway"])["ASYNCINFER_GATEWAY_PORT"]
    assert f"127.0.0.1:{port}/readyz" in snippets["gateway.healthcheck"]
    assert "/healthcheck" in snippets["flower.healthcheck"]


async def test_autoscaler_and_batcher_healthchecks_follow_redis_state(
        services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    from shared.redisserver import RedisServer

    snippets = python_snippets(services)
    scaler_check = snippets["autoscaler.healthcheck"]
    assert snippets["autoscaler-gpu.healthcheck"] == scaler_check
    batcher_check = snippets["batcher.healthcheck"]
    try:
        server = RedisServer(tmp_path / "redis").start()
    except ConfigError as exc:
        pytest.skip(f"no redis-server: {exc}")
    redis = connect(Settings(redis_url=server.url))
    scaler = None
    try:
        assert await asyncio.to_thread(run_snippet, scaler_check, server.url) == 1
        # The real autoscaler, as the service runs it (CPU slots, no load: no worker).
        scaler = spawn(["-m", ROLE_MODULES["autoscaler"]], {
            "ASYNCINFER_REDIS_URL": server.url, "ASYNCINFER_DEVICES": "cpu:1"},
            tmp_path / "autoscaler.log")
        for _ in range(100):
            if await asyncio.to_thread(run_snippet, scaler_check, server.url) == 0:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail((tmp_path / "autoscaler.log").read_text())
        assert terminate(scaler, grace_s=30) == 0  # it takes its heartbeat with it
        assert await asyncio.to_thread(run_snippet, scaler_check, server.url) == 1

        assert await asyncio.to_thread(run_snippet, batcher_check, server.url) == 1
        for model in load_specs(None):
            await redis.set(keys.lease(model), "b-test", px=60_000)
        assert await asyncio.to_thread(run_snippet, batcher_check, server.url) == 0
    finally:
        if scaler is not None:
            terminate(scaler, grace_s=5)
        await redis.aclose()
        server.stop()


# -- ports ------------------------------------------------------------------------------------


def test_ports(services: dict[str, dict[str, Any]]) -> None:
    gateway_env = environment(services["gateway"])
    assert gateway_env["ASYNCINFER_GATEWAY_HOST"] == "0.0.0.0"  # inside its container
    port = gateway_env["ASYNCINFER_GATEWAY_PORT"]
    published = [resolve_defaults(str(p)) for p in services["gateway"]["ports"]]
    # On the host: loopback unless the operator opts in (GATEWAY_BIND).
    assert published == [f"127.0.0.1:{port}:{port}"]
    # Flower's /metrics and /healthcheck skip basic auth: never publish it beyond localhost.
    assert services["flower"]["ports"]
    assert all(str(p).startswith("127.0.0.1:") for p in services["flower"]["ports"])
    assert "ports" not in services["redis"]
    exposed = {name for name, svc in services.items() if svc.get("ports")}
    assert exposed == {"gateway", "flower"}


# -- GPUs ------------------------------------------------------------------------------------


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (((service.get("deploy") or {}).get("resources") or {})
                    .get("reservations") or {})
    return list(reservations.get("devices") or [])


def test_gpu_profile_reserves_the_gpus_to_an_autoscaler(
        services: dict[str, dict[str, Any]]) -> None:
    gpu = {name: svc for name, svc in services.items() if gpu_devices(svc)}
    assert set(gpu) == {"autoscaler-gpu"}
    svc = gpu["autoscaler-gpu"]
    assert svc.get("profiles") == ["gpu"]
    assert argv(svc) == argv(services["autoscaler"])  # the same launcher, other devices
    (device,) = gpu_devices(svc)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # Every GPU of the host (or a list of device_ids, never both: compose rejects that).
    assert (device.get("count") == "all") != bool(device.get("device_ids"))
    env = environment(svc)
    # It finds them with nvidia-smi, which the container gets with the utility capability,
    # and pins each worker by UUID itself: CUDA_VISIBLE_DEVICES is the launcher's to set.
    assert env["ASYNCINFER_DEVICES"] == "cuda"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert svc["image"] != services["gateway"]["image"], "needs the CUDA image"
    assert seconds(svc["stop_grace_period"]) == seconds(services["autoscaler"][
        "stop_grace_period"])
    for name, other in services.items():
        if "gpu" in (other.get("profiles") or []):
            assert name in gpu, f"{name}: in the gpu profile without a GPU"


# -- image ------------------------------------------------------------------------------------


def test_dockerfile_pins_torch_and_runs_as_a_user(services: dict[str, dict[str, Any]]) -> None:
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "torch==2.13.0" in text
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"--index-url \"?\$\{?TORCH_INDEX", text)
    assert re.search(r"pip install .*(\s\.|/src)\s*(&&|$)", text, re.M), "project not installed"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("CMD ") for ln in lines)
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").is_file(), name
        index = (build.get("args") or {}).get("TORCH_INDEX") if isinstance(build, dict) else None
        if name in {n for n, s in services.items() if gpu_devices(s)}:
            assert str(index).startswith("https://download.pytorch.org/whl/cu"), name


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()}
    assert {".git", ".venv"} <= ignored


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker client without the compose plugin")
    for extra in ([], ["--profile", "gpu"]):
        result = subprocess.run([docker, "compose", "-f", str(COMPOSE), *extra, "config", "-q"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
