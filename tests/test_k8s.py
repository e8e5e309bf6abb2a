"""deploy/k8s/*.yaml: well-formed objects whose commands, settings, labels, streams and KEDA
numbers match the code and the models configuration they ship. No cluster is needed."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, get_args

import pytest
import redis
import yaml

from shared import keys
from shared.modelspec import ModelSpec, load_specs
from shared.redisserver import RedisServer
from shared.settings import Settings
from tests.test_compose import run_snippet

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"

ENTRY_MODULES = {"gateway", "batcher", "workers", "workers.autoscaler"}
SETTINGS_ENV = {f"ASYNCINFER_{name.upper()}" for name in Settings.model_fields}
EXTRA_ENV = {"WORKER_INDEX", "CUDA_VISIBLE_DEVICES", "FLOWER_USER", "FLOWER_PASSWORD",
             "FLOWER_BASIC_AUTH",
             "PYTORCH_NVML_BASED_CUDA_CHECK"}
WORKLOADS = ("Deployment", "StatefulSet")
PRIORITIES: tuple[keys.PriorityName, ...] = get_args(keys.PriorityName)

Doc = dict[str, Any]


def load_manifests() -> list[tuple[str, Doc]]:
    docs: list[tuple[str, Doc]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert isinstance(doc, dict), path.name
                docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, Doc]]:
    docs = load_manifests()
    assert docs, "no manifests in deploy/k8s"
    return docs


def of_kind(manifests: list[tuple[str, Doc]], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for _, d in manifests if d["kind"] == kind}


def containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def config_maps(manifests: list[tuple[str, Doc]]) -> dict[str, Doc]:
    return of_kind(manifests, "ConfigMap")


def container_env(container: Doc, cms: dict[str, Doc]) -> dict[str, str | None]:
    """Name -> literal value (None when it comes from a Secret or a field)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is not None:
            assert ref["name"] in cms, f"envFrom names unknown ConfigMap {ref['name']}"
            env.update({k: str(v) for k, v in cms[ref["name"]].get("data", {}).items()})
        else:
            assert "secretRef" in source
    for item in container.get("env", []):
        ref = (item.get("valueFrom") or {}).get("configMapKeyRef")
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif ref is not None:
            env[item["name"]] = str(cms[ref["name"]]["data"][ref["key"]])
        else:
            env[item["name"]] = None
    return env


@pytest.fixture(scope="module")
def specs(manifests: list[tuple[str, Doc]], tmp_path_factory: pytest.TempPathFactory) -> \
        dict[str, ModelSpec]:
    toml = config_maps(manifests)["asyncinfer-models"]["data"]["models.toml"]
    path = tmp_path_factory.mktemp("k8s") / "models.toml"
    path.write_text(toml)
    loaded = load_specs(path)
    assert loaded
    return loaded


def argv(container: Doc) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


def option(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {args}")


def model_deployment(manifests: list[tuple[str, Doc]], model: str) -> Doc:
    found = [d for d in of_kind(manifests, "Deployment").values()
             for c in containers(d) if argv(c)[:3] == ["python", "-m", "workers"]
             and option(argv(c), "--model") == model]
    assert len(found) == 1, f"want one worker Deployment for {model}, found {len(found)}"
    return found[0]


# -- shape ------------------------------------------------------------------------------------


def test_every_object_is_named_and_namespace_agnostic(manifests: list[tuple[str, Doc]]) -> None:
    seen: set[tuple[str, str]] = set()
    for path, doc in manifests:
        assert doc.get("apiVersion") and doc.get("kind"), path
        meta = doc.get("metadata") or {}
        assert meta.get("name"), f"{path}: {doc['kind']} without a name"
        assert "namespace" not in meta, f"{path}: {meta['name']} pins a namespace"
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"{path}: {key} defined twice"
        seen.add(key)


def test_selectors_match_template_labels(manifests: list[tuple[str, Doc]]) -> None:
    services = of_kind(manifests, "Service")
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            match = workload["spec"]["selector"]["matchLabels"]
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert match and match.items() <= labels.items(), f"{kind} {name}"
            if kind == "StatefulSet":
                governing = services[workload["spec"]["serviceName"]]
                assert governing["spec"].get("clusterIP") == "None"


def test_services_reach_a_named_container_port(manifests: list[tuple[str, Doc]]) -> None:
    workloads = [w for kind in WORKLOADS for w in of_kind(manifests, kind).values()]
    for name, service in of_kind(manifests, "Service").items():
        selector = service["spec"]["selector"]
        targets = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = {p.get("name"): p["containerPort"]
                 for c in containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"Service {name} -> {target}"


# -- commands and settings -------------------------------------------------------------------


def test_container_commands_are_real_entry_points(manifests: list[tuple[str, Doc]]) -> None:
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            for container in containers(workload):
                args = argv(container)
                if str(container["image"]).startswith("redis:"):
                    assert str(container["image"]).startswith("redis:7"), name
                    continue
                if args[:2] == ["python", "-m"]:
                    assert args[2] in ENTRY_MODULES, f"{name}: python -m {args[2]}"
                    assert importlib.util.find_spec(args[2]) is not None, args[2]
                elif args[:1] == ["celery"]:
                    assert "flower" in args and importlib.util.find_spec("flower") is not None
                    # Broker and credentials from the environment: no secret in the args.
                    assert args[1:3] == ["-A", "shared.flowerapp"], name
                    assert not any(a.startswith(("--broker", "--basic_auth")) for a in args)
                else:
                    pytest.fail(f"{name}: {args} is no entry point of the project")


def test_env_vars_are_real_settings(manifests: list[tuple[str, Doc]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cms = config_maps(manifests)
    allowed = SETTINGS_ENV | EXTRA_ENV
    for name in list(os.environ):
        if name.startswith("ASYNCINFER_"):
            monkeypatch.delenv(name)
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            for container in containers(workload):
                if str(container["image"]).startswith("redis:"):
                    continue
                env = container_env(container, cms)
                assert set(env) - allowed == set(), f"{name}: not settings"
                # $(VAR) in a command expands only from the container's own environment.
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv(container))):
                    assert ref in env, f"{name}: $({ref}) undefined"
                with monkeypatch.context() as m:
                    for key, value in env.items():
                        if value is not None:
                            m.setenv(key, value)
                    settings = Settings()
                if settings.models is not None:
                    mounts = {vm["mountPath"] for vm in container.get("volumeMounts", [])}
                    assert str(settings.models.parent) in mounts, f"{name}: models not mounted"
    for name, cm in cms.items():
        if name != "asyncinfer-models":
            assert set(cm.get("data", {})) - allowed == set(), name


def test_models_file_is_mounted_from_the_config_map(manifests: list[tuple[str, Doc]]) -> None:
    cms = config_maps(manifests)
    path = Path(cms["asyncinfer-env"]["data"]["ASYNCINFER_MODELS"])
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            spec = workload["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in containers(workload):
                if "asyncinfer-env" not in str(container.get("envFrom")):
                    continue
                mount = next(vm for vm in container["volumeMounts"]
                             if vm["mountPath"] == str(path.parent))
                source = volumes[mount["name"]]["configMap"]["name"]
                assert path.name in cms[source]["data"], name


def _probe_snippets(manifests: list[tuple[str, Doc]]) -> dict[str, str]:
    found = {}
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            for container in containers(workload):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    command = ((container.get(probe) or {}).get("exec") or {}).get("command")
                    if command and command[:2] == ["python", "-c"]:
                        found[f"{name}.{probe}"] = command[2]
    return found


def test_worker_probe_follows_the_workers_own_heartbeat(manifests: list[tuple[str, Doc]],
                                                        redis_server: RedisServer) -> None:
    (check,) = set(_probe_snippets(manifests).values())
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    assert run_snippet(check, redis_server.url) == 1
    name = "mlp-1-cuda0@pod"
    beat = {"name": name, "model": "mlp", "state": "ready", "host": socket.gethostname(),
            "expires_ms": int((time.time() + 60) * 1000)}
    r.hset(keys.workers("mlp"), name, json.dumps(beat))
    assert run_snippet(check, redis_server.url) == 1  # a record alone is no sign of life
    r.set(keys.alive("mlp", name), "ready", px=3000)
    assert run_snippet(check, redis_server.url) == 0
    r.close()


def test_probe_snippets_compile_and_import_real_names(manifests: list[tuple[str, Doc]]) -> None:
    for kind in WORKLOADS:
        for name, workload in of_kind(manifests, kind).items():
            for container in containers(workload):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    command = ((container.get(probe) or {}).get("exec") or {}).get("command")
                    if not command or command[:2] != ["python", "-c"]:
                        continue
                    code = command[2]
                    for node in ast.walk(ast.parse(code)):
                        if isinstance(node, ast.ImportFrom) and node.module:
                            module = importlib.import_module(node.module)
                            assert all(hasattr(module, a.name) for a in node.names), name
                        elif isinstance(node, ast.Import):
                            assert all(importlib.util.find_spec(a.name) for a in node.names)


# -- roles ------------------------------------------------------------------------------------


def test_redis_keeps_an_append_only_file_and_never_evicts(
        manifests: list[tuple[str, Doc]]) -> None:
    redis = of_kind(manifests, "StatefulSet")["redis"]
    (container,) = containers(redis)
    args = argv(container)
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--appendfsync") == "everysec"
    assert option(args, "--maxmemory-policy") == "noeviction"
    data_dir = option(args, "--dir")
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert any(vm["mountPath"] == data_dir and vm["name"] in claims
               for vm in container["volumeMounts"])
    url = config_maps(manifests)["asyncinfer-env"]["data"]["ASYNCINFER_REDIS_URL"]
    service = of_kind(manifests, "Service")[url.split("//")[1].split(":")[0]]
    assert url.split(":")[2].split("/")[0] == str(service["spec"]["ports"][0]["port"])


def test_gateway_probes_and_port(manifests: list[tuple[str, Doc]]) -> None:
    gateway = of_kind(manifests, "Deployment")["gateway"]
    (container,) = containers(gateway)
    env = container_env(container, config_maps(manifests))
    assert env["ASYNCINFER_GATEWAY_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports["http"]) == env["ASYNCINFER_GATEWAY_PORT"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", ports["http"])


def test_batcher_runs_with_at_most_one_standby(manifests: list[tuple[str, Doc]]) -> None:
    batcher = of_kind(manifests, "Deployment")["batcher"]
    assert 1 <= batcher["spec"]["replicas"] <= 2  # a lease makes one of them active per model


def test_each_model_has_a_gpu_worker_deployment(manifests: list[tuple[str, Doc]],
                                                specs: dict[str, ModelSpec]) -> None:
    cms = config_maps(manifests)
    for model, spec in specs.items():
        deployment = model_deployment(manifests, model)
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > spec.options.batch_timeout_s
        (container,) = containers(deployment)
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        env = container_env(container, cms)
        assert env["ASYNCINFER_DEVICES"] == "cuda:0"
        assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin sets it


# -- KEDA -------------------------------------------------------------------------------------


def test_scaled_objects_target_existing_deployments(manifests: list[tuple[str, Doc]]) -> None:
    deployments = of_kind(manifests, "Deployment")
    scaled = of_kind(manifests, "ScaledObject")
    assert scaled
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        assert ref["name"] in deployments, f"ScaledObject {name} targets {ref['name']}"


def test_scaled_object_per_model_mirrors_its_options(manifests: list[tuple[str, Doc]],
                                                     specs: dict[str, ModelSpec]) -> None:
    scaled = of_kind(manifests, "ScaledObject").values()
    redis_port = of_kind(manifests, "Service")["redis"]["spec"]["ports"][0]["port"]
    for model, spec in specs.items():
        opts = spec.options
        target = model_deployment(manifests, model)["metadata"]["name"]
        (so,) = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == target]
        body = so["spec"]
        assert body["minReplicaCount"] == opts.min_workers
        assert opts.max_workers is not None, f"{model}: set max_workers for Kubernetes"
        assert body["maxReplicaCount"] == opts.max_workers
        assert body["cooldownPeriod"] == int(opts.scale_down_delay_s)

        triggers = body["triggers"]
        streams = {keys.stream(model, p) for p in PRIORITIES}
        lag = [t["metadata"] for t in triggers if "lagCount" in t["metadata"]]
        pending = [t["metadata"] for t in triggers if "pendingEntriesCount" in t["metadata"]]
        assert {m["stream"] for m in lag} == streams
        assert {m["stream"] for m in pending} == streams
        assert len(lag) + len(pending) == len(triggers)
        for meta in lag:
            assert meta["lagCount"] == str(opts.concurrency_target)
        for meta in pending:
            assert meta["pendingEntriesCount"] == str(opts.concurrency_target)
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "redis-streams"
            assert meta["consumerGroup"] == keys.BATCHER_GROUP
            assert meta["activationLagCount"] == "0"  # the first request wakes a model at zero
            # KEDA dials from its own namespace: the Redis Service, fully qualified.
            host, _, port = meta["address"].rpartition(":")
            assert re.fullmatch(r"redis\.[a-z0-9-]+\.svc\.cluster\.local", host), host
            assert int(port) == redis_port

        modifiers = body["advanced"]["scalingModifiers"]
        names = {t["name"] for t in triggers}
        assert set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", modifiers["formula"])) == names
        assert "+" in modifiers["formula"] and len(names) == len(triggers)
        assert modifiers["target"] == str(opts.concurrency_target)
        assert modifiers["activationTarget"] == "0"

        behavior = body["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] == int(opts.scale_down_delay_s)
        assert down["policies"] and all(
            p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_every_scaled_deployment_is_a_model_worker(manifests: list[tuple[str, Doc]],
                                                   specs: dict[str, ModelSpec]) -> None:
    targets = {so["spec"]["scaleTargetRef"]["name"]
               for so in of_kind(manifests, "ScaledObject").values()}
    workers = {model_deployment(manifests, m)["metadata"]["name"] for m in specs}
    assert targets == workers
