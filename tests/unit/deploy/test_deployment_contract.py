"""The rendered Deployments keep the settings production depends on.

Probes, the preStop/drain/grace arithmetic, the hardened securityContext and the resource
settings are checked on what ``kubectl kustomize`` renders for every overlay, so an edit to the
base, an overlay or a patch cannot drop one silently. The checkers return a list of problems;
the second half of this file breaks a rendered Deployment in each of the ways they guard against
and asserts that the checkers notice, so they cannot pass vacuously.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest

from nacguard.settings import Settings
from tests.unit.deploy.conftest import Render
from tests.unit.deploy.manifests import Obj, container_env, find, one, parse_quantity

SERVER = "nacguard"  # Deployment and container name of the server
#: Seconds a startup probe must allow for loading and warming a model before liveness counts.
MIN_STARTUP_BUDGET_S = 120
#: Liveness must tolerate this long without an answer: a restart costs a full model load.
MIN_LIVENESS_TOLERANCE_S = 20
#: Time between the drain deadline and SIGKILL for the process to flush logs and exit.
MIN_EXIT_MARGIN_S = 5
_SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/env"}


# --- checkers ------------------------------------------------------------------------------


def _server(objs: list[Obj]) -> tuple[Obj, Obj, Obj]:
    deploy = one(objs, "Deployment", SERVER)
    pod = deploy["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == SERVER]
    assert len(containers) == 1, f"Deployment {SERVER} has no container named {SERVER}"
    return deploy, pod, containers[0]


def _setting(env: dict[str, str | None], field: str) -> Any:
    """A setting's value in the container: its env variable if set literally, else its default."""
    raw = env.get(f"NACGUARD_{field.upper()}")
    default = Settings.model_fields[field].default
    return default if raw is None else type(default)(raw)


def _arg(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _probe_port(probe: Obj, ports: dict[str, int]) -> int | str | None:
    port = probe.get("httpGet", {}).get("port")
    return ports.get(port, port) if isinstance(port, str) else port


def process_problems(objs: list[Obj]) -> list[str]:
    """The server runs as PID 1 (no shell wrapper), binds all interfaces, on the probed port."""
    _, _, container = _server(objs)
    env = container_env(container, objs)
    problems = []
    command = container.get("command")
    if command is not None and (command[0] in _SHELLS or command != ["nacguard"]):
        problems.append(
            f"command {command}: run the image's `nacguard` entrypoint directly so the server is "
            "PID 1 and receives SIGTERM"
        )
    args = container.get("args", [])
    if not args or args[0] != "serve":
        problems.append(f"args {args}: the container must run `nacguard serve`")
    host = _arg(args, "--host") or env.get("NACGUARD_HOST") or Settings.model_fields["host"].default
    if host != "0.0.0.0":
        problems.append(f"server binds {host}: probes and the Service need 0.0.0.0")
    port = int(_arg(args, "--port") or env.get("NACGUARD_PORT") or _setting(env, "port"))
    declared = [p["containerPort"] for p in container.get("ports", [])]
    if port not in declared:
        problems.append(f"server listens on {port}, containerPorts are {declared}")
    grpc_port = int(
        _arg(args, "--grpc-port") or env.get("NACGUARD_GRPC_PORT") or _setting(env, "grpc_port")
    )
    if grpc_port and grpc_port not in declared:
        problems.append(f"gRPC listens on {grpc_port}, containerPorts are {declared}")
    return problems


def probe_problems(objs: list[Obj]) -> list[str]:
    """Startup covers a slow load, readiness is /readyz, liveness is /healthz, all on the port."""
    _, _, container = _server(objs)
    env = container_env(container, objs)
    port = int(_arg(container.get("args", []), "--port") or _setting(env, "port"))
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    problems = []
    expected = {
        "startupProbe": {"/healthz", "/readyz"},
        "readinessProbe": {"/readyz"},
        "livenessProbe": {"/healthz"},
    }
    for kind, paths in expected.items():
        probe = container.get(kind)
        if probe is None:
            problems.append(f"{kind} is missing")
            continue
        path = probe.get("httpGet", {}).get("path")
        if path not in paths:
            problems.append(f"{kind} checks {path!r}, expected one of {sorted(paths)}")
        if _probe_port(probe, ports) != port:
            problems.append(
                f"{kind} probes port {probe.get('httpGet', {}).get('port')}, not {port}"
            )
    startup = container.get("startupProbe")
    if startup is not None:
        delay, period = startup.get("initialDelaySeconds", 0), startup.get("periodSeconds", 10)
        budget = delay + period * startup.get("failureThreshold", 3)
        if budget < MIN_STARTUP_BUDGET_S:
            problems.append(
                f"startupProbe allows {budget} s for model load and warm-up, "
                f"needs >= {MIN_STARTUP_BUDGET_S}"
            )
    liveness = container.get("livenessProbe")
    if liveness is not None:
        tolerance = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
        if tolerance < MIN_LIVENESS_TOLERANCE_S:
            problems.append(
                f"livenessProbe restarts after {tolerance} s without an answer, "
                f"needs >= {MIN_LIVENESS_TOLERANCE_S}"
            )
    return problems


def _prestop_seconds(container: Obj) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return None
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes >= 1.30)
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    words = " ".join(command).split()
    for i, word in enumerate(words[:-1]):
        if word.endswith("sleep"):
            return float(words[i + 1])
    return None


def shutdown_problems(objs: list[Obj]) -> list[str]:
    """preStop sleep, then a drain bounded by NACGUARD_DRAIN_TIMEOUT_S, all inside the grace."""
    deploy, pod, container = _server(objs)
    env = container_env(container, objs)
    problems = []
    pre_stop = _prestop_seconds(container)
    if pre_stop is None or pre_stop <= 0:
        problems.append("preStop sleep is missing: pods would be killed while still routed to")
        pre_stop = 0.0
    drain = float(_setting(env, "drain_timeout_s"))
    request_timeout = float(_setting(env, "request_timeout_s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < pre_stop + drain + MIN_EXIT_MARGIN_S:
        problems.append(
            f"terminationGracePeriodSeconds {grace} < preStop {pre_stop:g} + drain {drain:g} "
            f"+ {MIN_EXIT_MARGIN_S} s margin: accepted work would be killed"
        )
    if drain < request_timeout:
        problems.append(
            f"drain timeout {drain:g} s < request timeout {request_timeout:g} s: "
            "accepted requests could be cut off during a drain"
        )
    strategy = deploy["spec"].get("strategy", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or str(
        strategy.get("rollingUpdate", {}).get("maxUnavailable", "25%")
    ) not in {"0", "0%"}:
        problems.append("rolling update must keep maxUnavailable 0 (zero-downtime upgrades)")
    return problems


def security_problems(deploy: Obj) -> list[str]:
    """Non-root, read-only root, no privilege escalation, no capabilities, RuntimeDefault seccomp."""
    name = deploy["metadata"]["name"]
    pod = deploy["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext", {})
    problems = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{name}: {flag} is on")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: automountServiceAccountToken must be false")
    for container in pod.get("initContainers", []) + pod["containers"]:
        where = f"{name}/{container['name']}"
        sc = {**pod_sc, **container.get("securityContext", {})}
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"{where}: capabilities added: {caps['add']}")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    return problems


def writable_tmp_problems(objs: list[Obj]) -> list[str]:
    """The read-only server still has a writable /tmp (HOME and the torch caches live there)."""
    _, pod, container = _server(objs)
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if mounts.get("/tmp") not in empty_dirs:
        return ["/tmp is not an emptyDir mount: the read-only root leaves nothing writable"]
    return []


def resource_problems(deploy: Obj) -> list[str]:
    """Every container requests and limits CPU and memory; limits are >= requests."""
    name = deploy["metadata"]["name"]
    problems = []
    for container in deploy["spec"]["template"]["spec"]["containers"]:
        where = f"{name}/{container['name']}"
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for resource in ("cpu", "memory"):
            if resource not in requests:
                problems.append(f"{where}: no requests.{resource}")
            if resource not in limits:
                problems.append(f"{where}: no limits.{resource}")
            both = resource in requests and resource in limits
            if both and parse_quantity(limits[resource]) < parse_quantity(requests[resource]):
                problems.append(f"{where}: limits.{resource} < requests.{resource}")
    return problems


def thread_problems(objs: list[Obj]) -> list[str]:
    """torch's thread count follows the CPU limit (it would otherwise use every node core)."""
    _, _, container = _server(objs)
    for item in container.get("env", []):
        if item["name"] == "NACGUARD_TORCH_THREADS":
            ref = item.get("valueFrom", {}).get("resourceFieldRef", {})
            if ref.get("resource") == "limits.cpu":
                return []
    env = container_env(container, objs)
    threads = env.get("NACGUARD_TORCH_THREADS")
    limit = container.get("resources", {}).get("limits", {}).get("cpu")
    if threads is None or limit is None or not 0 < int(threads) <= parse_quantity(limit):
        return [
            "NACGUARD_TORCH_THREADS must come from limits.cpu (resourceFieldRef) or be a "
            f"literal within it; it is {threads!r} with limits.cpu {limit!r}"
        ]
    return []


def _resolved(container: Obj, name: str) -> int | None:
    """An env var as a number: a literal, or ``limits.cpu`` where it comes from there."""
    limit = container.get("resources", {}).get("limits", {}).get("cpu")
    for item in container.get("env", []):
        if item["name"] != name:
            continue
        if "value" in item:
            return int(item["value"])
        ref = item.get("valueFrom", {}).get("resourceFieldRef", {})
        if ref.get("resource") == "limits.cpu" and limit is not None:
            return math.ceil(parse_quantity(limit) / parse_quantity(ref.get("divisor", "1")))
    return None


def worker_problems(objs: list[Obj]) -> list[str]:
    """Workers times torch threads fit the CPU limit, and use it: every core serves (CPU), and
    one worker per GPU (a second would add a model copy and a CUDA context)."""
    _, _, container = _server(objs)
    limits = container.get("resources", {}).get("limits", {})
    cores = math.ceil(parse_quantity(limits["cpu"])) if "cpu" in limits else None
    workers = _resolved(container, "NACGUARD_WORKERS")
    threads = _resolved(container, "NACGUARD_TORCH_THREADS")
    if cores is None or workers is None or threads is None:
        return [f"NACGUARD_WORKERS ({workers}) and _TORCH_THREADS ({threads}) must resolve"]
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if gpus and workers != gpus:
        return [f"NACGUARD_WORKERS is {workers} for {gpus} GPU(s): one worker per GPU"]
    if workers * threads != cores:
        return [
            f"NACGUARD_WORKERS x _TORCH_THREADS = {workers} x {threads}, not limits.cpu {cores}"
        ]
    return []


def gpu_problems(objs: list[Obj]) -> list[str]:
    """GPU pods ask for a GPU, land on GPU nodes, and run CUDA in fp16."""
    _, pod, container = _server(objs)
    env = container_env(container, objs)
    resources = container.get("resources", {})
    problems = []
    gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    if gpus < 1:
        problems.append("limits has no nvidia.com/gpu")
    requested = resources.get("requests", {}).get("nvidia.com/gpu")
    if requested is not None and int(requested) != gpus:
        problems.append("requests.nvidia.com/gpu differs from the limit (Kubernetes refuses it)")
    affinity = pod.get("affinity", {}).get("nodeAffinity")
    if not pod.get("nodeSelector") and not affinity:
        problems.append("no nodeSelector or node affinity for GPU nodes")
    if not any(
        t.get("key") == "nvidia.com/gpu" or (t.get("operator") == "Exists" and "key" not in t)
        for t in pod.get("tolerations", [])
    ):
        problems.append("no toleration for the nvidia.com/gpu taint")
    devices = [d.strip() for d in str(env.get("NACGUARD_DEVICE", "")).split(",") if d.strip()]
    if not devices or not all(d.startswith("cuda") for d in devices):
        problems.append(f"NACGUARD_DEVICE is {env.get('NACGUARD_DEVICE')!r}, expected cuda")
    elif len(devices) > max(gpus, 1):
        problems.append(f"{len(devices)} CUDA devices configured for {gpus} GPU(s)")
    if env.get("NACGUARD_PRECISION") != "fp16":
        problems.append(f"NACGUARD_PRECISION is {env.get('NACGUARD_PRECISION')!r}, expected fp16")
    return problems


def cpu_problems(objs: list[Obj]) -> list[str]:
    """CPU pods neither ask for GPUs nor configure a CUDA device."""
    _, _, container = _server(objs)
    env = container_env(container, objs)
    problems = []
    for section in ("requests", "limits"):
        if "nvidia.com/gpu" in container.get("resources", {}).get(section, {}):
            problems.append(f"{section} asks for nvidia.com/gpu on the CPU overlay")
    if env.get("NACGUARD_DEVICE") != "cpu":
        problems.append(f"NACGUARD_DEVICE is {env.get('NACGUARD_DEVICE')!r} on the CPU overlay")
    return problems


def all_problems(overlay: str, objs: list[Obj]) -> list[str]:
    """Every contract problem of one rendered overlay."""
    problems = (
        process_problems(objs)
        + probe_problems(objs)
        + shutdown_problems(objs)
        + writable_tmp_problems(objs)
        + thread_problems(objs)
        + worker_problems(objs)
    )
    for deploy in find(objs, "Deployment"):
        problems += security_problems(deploy) + resource_problems(deploy)
    problems += gpu_problems(objs) if overlay == "gpu" else cpu_problems(objs)
    return problems


# --- the rendered overlays satisfy the contract ----------------------------------------------


def test_rendered_overlay_meets_the_deployment_contract(overlay: str, objs: list[Obj]) -> None:
    assert all_problems(overlay, objs) == []


def test_grace_period_covers_prestop_and_default_drain(objs: list[Obj]) -> None:
    # Spelled out once more with the numbers the issue names: drain defaults to 25 s.
    _, pod, container = _server(objs)
    env = container_env(container, objs)
    drain = float(_setting(env, "drain_timeout_s"))
    pre_stop = _prestop_seconds(container)
    assert Settings.model_fields["drain_timeout_s"].default == 25
    assert pre_stop is not None
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain


# --- the checkers catch what they guard against ----------------------------------------------

Mutation = Callable[[list[Obj]], object]  # edits the objects in place


def _container(objs: list[Obj]) -> Obj:
    return _server(objs)[2]


def _config(objs: list[Obj]) -> Obj:
    ref = _container(objs)["envFrom"][0]["configMapRef"]["name"]
    return one(objs, "ConfigMap", ref)


def _redis(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment", "nacguard-redis")["spec"]["template"]["spec"]["containers"][0]


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "no readiness probe": (lambda o: _container(o).pop("readinessProbe"), "readinessProbe"),
    "no startup probe": (lambda o: _container(o).pop("startupProbe"), "startupProbe"),
    "liveness on readyz": (
        lambda o: _container(o)["livenessProbe"]["httpGet"].update(path="/readyz"),
        "livenessProbe checks",
    ),
    "short startup budget": (
        lambda o: _container(o)["startupProbe"].update(failureThreshold=3, periodSeconds=5),
        "startupProbe allows",
    ),
    "gRPC port not declared": (
        lambda o: _container(o).update(
            ports=[p for p in _container(o)["ports"] if p["name"] != "grpc"]
        ),
        "gRPC listens on 8001",
    ),
    "probe on wrong port": (
        lambda o: _container(o)["readinessProbe"]["httpGet"].update(port=9999),
        "readinessProbe probes port",
    ),
    "shell wrapper": (
        lambda o: _container(o).update(command=["sh", "-c", "nacguard serve"]),
        "PID 1",
    ),
    "loopback bind": (
        lambda o: _container(o).update(args=["serve", "--host", "127.0.0.1", "--port", "8000"]),
        "binds 127.0.0.1",
    ),
    "no preStop": (lambda o: _container(o).pop("lifecycle"), "preStop"),
    "short grace": (
        lambda o: _server(o)[1].update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds",
    ),
    "longer drain, same grace": (
        lambda o: _config(o)["data"].update(NACGUARD_DRAIN_TIMEOUT_S="60"),
        "terminationGracePeriodSeconds",
    ),
    "drain shorter than requests": (
        lambda o: _config(o)["data"].update(NACGUARD_REQUEST_TIMEOUT_S="30"),
        "request timeout",
    ),
    "surge-less rollout": (
        lambda o: _server(o)[0]["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
        "maxUnavailable",
    ),
    "writable root": (
        lambda o: _container(o)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "privilege escalation": (
        lambda o: _container(o)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "capabilities kept": (
        lambda o: _container(o)["securityContext"]["capabilities"].update(drop=[]),
        "drop ALL",
    ),
    "capability added": (
        lambda o: _container(o)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "capabilities added",
    ),
    "root user": (
        lambda o: _container(o)["securityContext"].update(runAsUser=0, runAsNonRoot=False),
        "runAsNonRoot",
    ),
    "no seccomp": (
        lambda o: (
            _server(o)[1]["securityContext"].pop("seccompProfile"),
            _container(o)["securityContext"].pop("seccompProfile"),
        ),
        "seccompProfile",
    ),
    "redis runs writable": (
        lambda o: _redis(o)["securityContext"].update(readOnlyRootFilesystem=False),
        "nacguard-redis/redis: readOnlyRootFilesystem",
    ),
    "no /tmp": (
        lambda o: _container(o).update(
            volumeMounts=[m for m in _container(o)["volumeMounts"] if m["mountPath"] != "/tmp"]
        ),
        "/tmp",
    ),
    "no memory limit": (
        lambda o: _container(o)["resources"]["limits"].pop("memory"),
        "limits.memory",
    ),
    "limit below request": (
        lambda o: _container(o)["resources"]["limits"].update(cpu="100m"),
        "limits.cpu < requests.cpu",
    ),
    "workers beyond the cores": (
        lambda o: _container(o).update(
            env=[
                {"name": e["name"], "value": "8"} if e["name"] == "NACGUARD_WORKERS" else e
                for e in _container(o)["env"]
            ]
        ),
        "NACGUARD_WORKERS",
    ),
    "threads unbounded": (
        lambda o: _container(o).update(
            env=[e for e in _container(o)["env"] if e["name"] != "NACGUARD_TORCH_THREADS"]
        ),
        "NACGUARD_TORCH_THREADS",
    ),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checkers_catch_a_broken_deployment(render: Render, overlay: str, name: str) -> None:
    objs = render(overlay)
    mutate, expected = MUTATIONS[name]
    mutate(objs)
    problems = all_problems(overlay, objs)
    assert any(expected in p for p in problems), problems


GPU_MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "no gpu limit": (
        lambda o: _container(o)["resources"]["limits"].pop("nvidia.com/gpu"),
        "nvidia.com/gpu",
    ),
    "no node selector": (lambda o: _server(o)[1].pop("nodeSelector"), "nodeSelector"),
    "no toleration": (lambda o: _server(o)[1].pop("tolerations"), "toleration"),
    "cpu device": (lambda o: _config(o)["data"].update(NACGUARD_DEVICE="cpu"), "expected cuda"),
    "fp32": (lambda o: _config(o)["data"].update(NACGUARD_PRECISION="fp32"), "fp16"),
    "two devices one gpu": (
        lambda o: _config(o)["data"].update(NACGUARD_DEVICE="cuda:0,cuda:1"),
        "2 CUDA devices",
    ),
}


@pytest.mark.parametrize("name", sorted(GPU_MUTATIONS))
def test_gpu_checker_catches_a_broken_gpu_overlay(render: Render, name: str) -> None:
    objs = copy.deepcopy(render("gpu"))
    mutate, expected = GPU_MUTATIONS[name]
    mutate(objs)
    assert any(expected in p for p in gpu_problems(objs)), gpu_problems(objs)


def test_cpu_checker_catches_a_gpu_request(render: Render) -> None:
    objs = render("cpu")
    _container(objs)["resources"]["limits"]["nvidia.com/gpu"] = "1"
    assert any("nvidia.com/gpu" in p for p in cpu_problems(objs))
