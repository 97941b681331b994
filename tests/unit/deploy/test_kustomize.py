"""Every kustomize overlay renders, validates, and its objects refer to each other correctly.

Core objects are validated against the Kubernetes OpenAPI schema (``kubernetes-validate``, strict:
unknown fields are errors) for the oldest and the newest Kubernetes version we support. The
Prometheus Operator's custom resources have no schema there; they are checked structurally.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import numpy as np
import pytest
import yaml

from nacguard.monitoring import DriftReference, Metrics
from nacguard.settings import Settings
from tests.unit.deploy.manifests import (
    CRD_API_GROUPS,
    K8S,
    OVERLAYS,
    Obj,
    container_env,
    find,
    kustomize_build,
    load_yaml,
    one,
    require_tool,
    selects,
)

#: Oldest Kubernetes minor version the manifests are meant for (documented in docs/deployment.md).
MIN_KUBERNETES = "1.29"
NAMESPACE = "nacguard"
HPA_METRIC = "nacguard_in_flight_images"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "ServiceMonitor",
    "PrometheusRule",
}
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _is_crd(obj: Obj) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_API_GROUPS


def _pod_labels(deploy: Obj) -> dict[str, str]:
    return dict(deploy["spec"]["template"]["metadata"].get("labels", {}))


def _schema_errors(objs: list[Obj], version: str) -> list[str]:
    errors = []
    for obj in objs:
        if _is_crd(obj):
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{where} @ {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
    return errors


def _with_profile_volume(
    tmp_path: Path, overlay: str, component: str = "profile-volume"
) -> list[Obj]:
    """Render an overlay with a component, as docs/deployment.md tells users."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],
        "components": [os.path.relpath(K8S / "components" / component, tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize_build(tmp_path)


# --- rendering and schema ----------------------------------------------------------------------


def test_every_overlay_directory_is_tested() -> None:
    on_disk = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert on_disk == set(OVERLAYS)


def test_overlay_renders_the_whole_stack(objs: list[Obj]) -> None:
    kinds = {o["kind"] for o in objs}
    assert kinds == EXPECTED_KINDS
    assert {d["metadata"]["name"] for d in find(objs, "Deployment")} == {
        "nacguard",
        "nacguard-redis",
    }
    assert {s["metadata"]["name"] for s in find(objs, "Service")} == {"nacguard", "nacguard-redis"}


@pytest.mark.parametrize("version", [MIN_KUBERNETES, kubernetes_validate.latest_version()])
def test_core_objects_validate_against_the_kubernetes_schema(objs: list[Obj], version: str) -> None:
    assert _schema_errors(objs, version) == []


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_profile_volume_component_renders_and_validates(tmp_path: Path, overlay_name: str) -> None:
    objs = _with_profile_volume(tmp_path, overlay_name)
    assert _schema_errors(objs, MIN_KUBERNETES) == []
    deploy = one(objs, "Deployment", "nacguard")
    pod = deploy["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "nacguard")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/opt/nacguard/profile")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one(objs, "PersistentVolumeClaim", claim)
    assert container_env(container, objs)["NACGUARD_PROFILE"] == "/opt/nacguard/profile"


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_model_repository_component_renders_and_validates(
    tmp_path: Path, overlay_name: str
) -> None:
    """The whole claim is mounted read-only where NACGUARD_REPOSITORY points, in poll mode."""
    objs = _with_profile_volume(tmp_path, overlay_name, "model-repository")
    assert _schema_errors(objs, MIN_KUBERNETES) == []
    deploy = one(objs, "Deployment", "nacguard")
    pod = deploy["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "nacguard")
    env = container_env(container, objs)
    assert env["NACGUARD_REPOSITORY_MODE"] == "poll"
    mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == env["NACGUARD_REPOSITORY"]
    )
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = one(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    # The settings the component sets are ones the server knows, with valid values.
    from nacguard.settings import Settings

    keys = ("REPOSITORY", "REPOSITORY_MODE", "POLL_INTERVAL_S", "VERSION_POLICY")
    Settings(**{k.lower(): env[f"NACGUARD_{k}"] for k in keys})


def test_schema_validation_rejects_a_misspelt_field(objs: list[Obj]) -> None:
    deploy = one(objs, "Deployment", "nacguard")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in e for e in _schema_errors([deploy], MIN_KUBERNETES))


# --- custom resources, structurally ------------------------------------------------------------


def test_servicemonitor_scrapes_the_server_metrics_port(objs: list[Obj]) -> None:
    monitor = one(objs, "ServiceMonitor", "nacguard")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in find(objs, "Service") if selects(selector, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["nacguard"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert _DURATION.match(endpoint["interval"])
    namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames")
    assert namespaces is None or monitor["metadata"]["namespace"] in namespaces


def test_prometheusrule_is_well_formed(objs: list[Obj], tmp_path: Path) -> None:
    rule = one(objs, "PrometheusRule", "nacguard")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule["spec"]["groups"]
    assert groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    alerts = 0
    for group in groups:
        assert group["rules"], group["name"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip(), r
            if "for" in r:
                assert _DURATION.match(str(r["for"])), r
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in r.get(key, {}).values()), r
            alerts += "alert" in r
    assert alerts > 0


def test_prometheusrule_passes_promtool(objs: list[Obj], tmp_path: Path) -> None:
    # The operator hands spec.groups to Prometheus as a rule file: check it as one.
    promtool = require_tool("promtool")
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(
        yaml.safe_dump({"groups": one(objs, "PrometheusRule", "nacguard")["spec"]["groups"]})
    )
    proc = subprocess.run(
        [promtool, "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- objects refer to each other -------------------------------------------------------------


def test_every_namespaced_object_is_in_the_nacguard_namespace(objs: list[Obj]) -> None:
    for obj in objs:
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["kind"]
    assert one(objs, "Namespace", NAMESPACE)


def test_selectors_pick_exactly_the_pods_they_mean(objs: list[Obj]) -> None:
    deployments = {d["metadata"]["name"]: d for d in find(objs, "Deployment")}
    for deploy in deployments.values():
        assert selects(deploy["spec"]["selector"]["matchLabels"], _pod_labels(deploy))

    def targets(selector: dict[str, str]) -> list[str]:
        return [n for n, d in deployments.items() if selects(selector, _pod_labels(d))]

    for service in find(objs, "Service"):
        assert targets(service["spec"]["selector"]) == [service["metadata"]["name"]]
    [pdb] = find(objs, "PodDisruptionBudget")
    assert targets(pdb["spec"]["selector"]["matchLabels"]) == ["nacguard"]
    for policy in find(objs, "NetworkPolicy"):
        assert len(targets(policy["spec"]["podSelector"]["matchLabels"])) == 1
    server = deployments["nacguard"]["spec"]["template"]["spec"]
    for constraint in server.get("topologySpreadConstraints", []):
        assert targets(constraint["labelSelector"]["matchLabels"]) == ["nacguard"]


def test_service_ports_resolve_to_container_ports(objs: list[Obj]) -> None:
    for service in find(objs, "Service"):
        deploy = one(objs, "Deployment", service["metadata"]["name"])
        ports = [p for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), port


def test_hpa_scales_the_server_on_in_flight_images(objs: list[Obj]) -> None:
    [hpa] = find(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "nacguard")
    assert one(objs, "Deployment", ref["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_prometheus_adapter_rule_provides_the_hpa_metric(objs: list[Obj]) -> None:
    values = load_yaml(K8S / "prometheus-adapter" / "values.yaml")
    [hpa] = find(objs, "HorizontalPodAutoscaler")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    providing = [r for r in values["rules"]["custom"] if r["name"]["as"] == wanted]
    assert len(providing) == 1, f"no prometheus-adapter rule publishes {wanted}"
    rule = providing[0]
    series = rule["seriesQuery"].split("{")[0].strip()
    assert re.fullmatch(rule["name"]["matches"], series)
    # Pods metrics need the series mapped to pods (and their namespace).
    overrides = rule["resources"]["overrides"]
    assert {v["resource"] for v in overrides.values()} >= {"pod", "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_the_server_exports_the_hpa_metric() -> None:
    metrics = Metrics(
        model="m",
        profile="p",
        drift_reference=DriftReference(np.linspace(0.0, 1.0, 50), 0.1),
        expected_ood_rate=0.05,
    )
    metrics.set_in_flight(3)
    body, _ = metrics.render()
    assert re.search(rf"^{HPA_METRIC}\{{[^}}]*\}} 3(\.0)?$", body.decode(), re.MULTILINE)


def test_config_keys_are_settings_fields_with_valid_values(
    objs: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy = one(objs, "Deployment", "nacguard")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container, objs)  # also proves the envFrom ConfigMap exists
    fields = {f"NACGUARD_{name.upper()}" for name in Settings.model_fields}
    ours = {k: v for k, v in env.items() if k.startswith("NACGUARD_")}
    assert set(ours) <= fields, f"not settings: {sorted(set(ours) - fields)}"
    # Let pydantic-settings parse them exactly as the server will at start-up.
    for key in list(os.environ):
        if key.startswith("NACGUARD_"):
            monkeypatch.delenv(key)
    for key, value in ours.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    Settings()


def test_redis_url_points_at_the_redis_service(objs: list[Obj]) -> None:
    container = one(objs, "Deployment", "nacguard")["spec"]["template"]["spec"]["containers"][0]
    url = urlparse(str(container_env(container, objs)["NACGUARD_REDIS_URL"]))
    assert url.scheme in {"redis", "rediss"}
    service = one(objs, "Service", str(url.hostname).split(".")[0])
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_network_policies_let_server_reach_redis_and_nothing_reach_redis_else(
    objs: list[Obj],
) -> None:
    server_labels = _pod_labels(one(objs, "Deployment", "nacguard"))
    redis_labels = _pod_labels(one(objs, "Deployment", "nacguard-redis"))
    policies = {
        name: next(
            p
            for p in find(objs, "NetworkPolicy")
            if selects(p["spec"]["podSelector"]["matchLabels"], labels)
        )
        for name, labels in (("server", server_labels), ("redis", redis_labels))
    }
    for policy in policies.values():
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # Server egress: DNS and Redis only.
    egress = policies["server"]["spec"]["egress"]
    assert any(
        any(
            selects(peer.get("podSelector", {}).get("matchLabels"), redis_labels)
            for peer in rule.get("to", [])
        )
        and {p["port"] for p in rule["ports"]} == {6379}
        for rule in egress
    )
    for rule in egress:
        assert rule.get("to") or {p["port"] for p in rule["ports"]} == {53}
    # Redis ingress: from server pods only.
    for rule in policies["redis"]["spec"]["ingress"]:
        peers = rule.get("from", [])
        assert peers and all(
            selects(peer.get("podSelector", {}).get("matchLabels"), server_labels)
            and "namespaceSelector" not in peer
            for peer in peers
        )


def test_server_takes_http_and_grpc_through_service_and_network_policy(objs: list[Obj]) -> None:
    deploy = one(objs, "Deployment", "nacguard")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {"http": 8000, "grpc": 8001}
    service_targets = {p["targetPort"] for p in one(objs, "Service", "nacguard")["spec"]["ports"]}
    assert service_targets == set(declared)
    policy = next(
        p
        for p in find(objs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], _pod_labels(deploy))
    )
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == set(declared)
