"""The KServe resources in k8s/kserve: well-formed, and consistent with the server they run.

KServe's CRD schemas are not in the ``kserve`` Python package (scripts/install.sh installs it
for its protocol types); these checks hold the manifests to what nacguard itself defines
instead: the container runs ``nacguard serve`` with valid flags, its ports and
probes are the ones the server opens and answers, and the InferenceService uses the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nacguard.api import create_app
from nacguard.cli import _parser, _settings_from
from nacguard.settings import Settings

KSERVE = Path(__file__).resolve().parents[3] / "k8s" / "kserve"


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    return doc


def _container() -> dict[str, Any]:
    (container,) = _load("servingruntime.yaml")["spec"]["containers"]
    return container


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_load("kustomization.yaml")["resources"])
    assert listed == {p.name for p in KSERVE.glob("*.yaml")} - {"kustomization.yaml"}


def test_runtime_serves_both_protocol_versions() -> None:
    runtime = _load("servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ServingRuntime"
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    assert _container()["name"] == "kserve-container"  # the name KServe injects storage for


def _settings() -> Settings:
    args = _parser().parse_args(_container()["args"])
    assert args.command == "serve"
    return _settings_from(args)


def test_container_args_are_valid_serve_flags_on_the_declared_ports() -> None:
    settings = _settings()
    assert settings.host == "0.0.0.0"
    assert str(settings.profile) == "/mnt/models"  # where KServe puts the storageUri
    assert settings.grpc_port != 0 and settings.grpc_port != settings.port
    ports = {p["containerPort"] for p in _container()["ports"]}
    assert settings.port in ports


def test_probes_hit_v2_health_routes_the_server_answers_without_a_key() -> None:
    settings = _settings()
    routes = set(create_app(Settings()).openapi()["paths"])
    for kind, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        probe = _container()[kind]["httpGet"]
        assert probe == {"path": path, "port": settings.port}
        assert path in routes
        assert path in settings.auth_exempt_paths


def test_inference_service_uses_the_runtime_and_its_format() -> None:
    isvc = _load("inferenceservice.yaml")
    runtime = _load("servingruntime.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
