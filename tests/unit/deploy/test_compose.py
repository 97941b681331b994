"""docker/compose.yaml gives a working stack: every file it mounts exists, the services find each
other by name, and Prometheus accepts its configuration as the container will see it.

There is no Docker engine in CI; the Prometheus check rebuilds the container's view of the
mounted files in a temporary folder and runs ``promtool`` on that.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from nacguard.settings import Settings
from tests.unit.deploy.manifests import DOCKER, load_yaml, require_tool

COMPOSE = DOCKER / "compose.yaml"
#: Time between the drain deadline and the SIGKILL of `docker stop` for the process to exit.
MIN_EXIT_MARGIN_S = 5


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def _mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """Bind mounts of a service as (host path, container path); named volumes are skipped."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        else:
            source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a path inside the container comes from on the host, if a bind mount provides it."""
    wanted = PurePosixPath(container_path)
    for source, target in _mounts(service):
        try:
            rest = wanted.relative_to(target)
        except ValueError:
            continue
        return source / rest if str(rest) != "." else source
    return None


def _seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * units[u] for n, u in parts)


# --- files -------------------------------------------------------------------------------------


def test_the_whole_stack_is_there(compose: dict[str, Any]) -> None:
    assert {"nacguard", "redis", "prometheus", "grafana"} <= set(compose["services"])


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    missing = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not context.is_dir():
                missing.append(f"{name}: build context {context}")
            elif not (context / (dockerfile or "Dockerfile")).is_file():
                missing.append(f"{name}: dockerfile {dockerfile}")
        for source, _ in _mounts(service):
            if not source.exists():
                missing.append(f"{name}: mounted {source}")
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if not (COMPOSE.parent / env_file).is_file():
                missing.append(f"{name}: env_file {env_file}")
    for section in ("configs", "secrets"):
        for name, item in compose.get(section, {}).items():
            if "file" in item and not (COMPOSE.parent / item["file"]).exists():
                missing.append(f"{section}.{name}: {item['file']}")
    assert missing == []


def test_mounted_directories_are_not_empty(compose: dict[str, Any]) -> None:
    # An empty provisioning or rules folder would start a stack with no dashboard or alerts.
    for name, service in compose["services"].items():
        for source, target in _mounts(service):
            if source.is_dir():
                assert any(source.iterdir()), f"{name}: {source} (mounted at {target}) is empty"


# --- prometheus -----------------------------------------------------------------------------


def _prometheus_config_path(service: dict[str, Any]) -> str:
    for arg in service.get("command", []):
        if arg.startswith("--config.file="):
            return str(arg.split("=", 1)[1])
    return "/etc/prometheus/prometheus.yml"  # the image's default


def test_promtool_accepts_the_config_as_mounted(compose: dict[str, Any], tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    service = compose["services"]["prometheus"]
    # Rebuild the container's filesystem view (only what compose mounts) under tmp_path.
    for source, target in _mounts(service):
        destination = tmp_path / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy(source, destination)
    config_path = tmp_path / _prometheus_config_path(service).lstrip("/")
    assert config_path.is_file(), "the --config.file path is not mounted"
    config = load_yaml(config_path)
    rule_files = []
    for pattern in config.get("rule_files", []):
        base = tmp_path if pattern.startswith("/") else config_path.parent
        rule_files += list(base.glob(pattern.lstrip("/")))
    assert rule_files, "no rule file is reachable inside the container: alerts would be missing"
    if any(p.startswith("/") for p in config.get("rule_files", [])):
        # Absolute paths name the container's filesystem: point them into the rebuilt view.
        config["rule_files"] = [
            str(tmp_path / p.lstrip("/")) if p.startswith("/") else p for p in config["rule_files"]
        ]
        config_path = config_path.with_name("checked-" + config_path.name)
        config_path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_nacguard_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    host_config = _host_path(service, _prometheus_config_path(service))
    assert host_config is not None
    config = load_yaml(host_config)
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    for target in targets:
        host, _, _ = target.partition(":")
        assert host in compose["services"] or host == "localhost", target
    port = Settings.model_fields["port"].default
    assert f"nacguard:{port}" in targets


# --- grafana -------------------------------------------------------------------------------


def test_grafana_datasources_point_at_compose_services(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    folder = _host_path(service, "/etc/grafana/provisioning/datasources")
    assert folder is not None and folder.is_dir()
    urls = [
        ds["url"]
        for path in sorted(folder.glob("*.y*ml"))
        for ds in load_yaml(path).get("datasources", [])
    ]
    assert urls
    for url in urls:
        assert urlparse(url).hostname in compose["services"], url


def test_grafana_dashboard_providers_find_dashboards(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    folder = _host_path(service, "/etc/grafana/provisioning/dashboards")
    assert folder is not None and folder.is_dir()
    providers = [
        p for path in sorted(folder.glob("*.y*ml")) for p in load_yaml(path).get("providers", [])
    ]
    assert providers
    for provider in providers:
        source = _host_path(service, provider["options"]["path"])
        assert source is not None, f"{provider['options']['path']} is not mounted"
        assert list(source.glob("**/*.json")), f"no dashboard JSON in {source}"
    home = service.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        home_source = _host_path(service, home)
        assert home_source is not None and home_source.is_file(), home


# --- nacguard -------------------------------------------------------------------------------


def test_nacguard_service_drains_and_finds_redis(compose: dict[str, Any]) -> None:
    service = compose["services"]["nacguard"]
    environment = service.get("environment", {})
    fields = {f"NACGUARD_{name.upper()}" for name in Settings.model_fields}
    assert set(environment) <= fields, "unknown NACGUARD_ variables"
    drain = float(
        environment.get(
            "NACGUARD_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default
        )
    )
    assert _seconds(service["stop_grace_period"]) >= drain + MIN_EXIT_MARGIN_S
    redis = urlparse(environment["NACGUARD_REDIS_URL"])
    assert redis.hostname in compose["services"]
    assert service["depends_on"][redis.hostname]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"][redis.hostname]


def test_nacguard_container_is_hardened_like_the_pod(compose: dict[str, Any]) -> None:
    service = compose["services"]["nacguard"]
    assert service.get("read_only") is True
    assert any(str(t).split(":")[0] == "/tmp" for t in service.get("tmpfs", []))
    assert "ALL" in service.get("cap_drop", [])
    assert "no-new-privileges:true" in service.get("security_opt", [])


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is reachable from the LAN"


def test_nacguard_publishes_its_http_and_grpc_ports(compose: dict[str, Any]) -> None:
    published = {str(p).rsplit(":", 1)[1] for p in compose["services"]["nacguard"]["ports"]}
    for field in ("port", "grpc_port"):
        assert str(Settings.model_fields[field].default) in published, field
