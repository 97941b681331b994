"""Helpers for the deployment tests: render kustomizations, find objects, read container env.

Everything here reads the repository's own files; nothing talks to a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = [
    "CRD_API_GROUPS",
    "DOCKER",
    "K8S",
    "OVERLAYS",
    "ROOT",
    "Obj",
    "container_env",
    "find",
    "kustomize_build",
    "load_yaml",
    "one",
    "parse_quantity",
    "require_tool",
    "selects",
]

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
#: Every overlay a user may apply; a new overlay directory must be added here to be tested.
OVERLAYS = ("cpu", "gpu")
#: API groups of custom resources (Prometheus Operator): no Kubernetes schema to validate against.
CRD_API_GROUPS = ("monitoring.coreos.com",)

Obj = dict[str, Any]  # one Kubernetes object as parsed YAML


def require_tool(name: str) -> str:
    """Return the path of an executable, or skip the calling test saying which tool is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed; this check runs where it is (CI installs it)")
    return path


def kustomize_build(directory: Path) -> list[Obj]:
    """Render a kustomization with ``kubectl kustomize`` and return its objects.

    Skips the calling test when kubectl is absent; fails it with kubectl's message when the
    kustomization does not render.
    """
    kubectl = require_tool("kubectl")
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objs: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    """All objects of a kind (and name, if given)."""
    return [
        o
        for o in objs
        if o.get("kind") == kind and (name is None or o["metadata"].get("name") == name)
    ]


def one(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    """The single object of this kind and name; an assertion error names what is missing."""
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    """Whether an equality selector (matchLabels) matches a label set; empty selects nothing."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def container_env(container: Obj, objs: Iterable[Obj]) -> dict[str, str | None]:
    """The environment a container starts with, as Kubernetes assembles it.

    ``envFrom`` ConfigMaps first, then ``env`` entries, which win on a clash. Values that come
    from ``valueFrom`` (resource fields, secrets) are known only at run time and map to None.
    """
    objs = list(objs)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is None:
            continue
        config = one(objs, "ConfigMap", ref["name"])
        prefix = source.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in config.get("data", {}).items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ('500m', '2', '8Gi') as a number in base units."""
    match = _QUANTITY.match(str(value))
    if match is None or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))
