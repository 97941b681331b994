"""The Grafana dashboard and the rules refer only to metrics that exist, and the dashboard is
well-formed provisioning input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from tests.fixtures.promql import (
    DASHBOARD_FILE,
    REPO,
    RULES_FILE,
    all_expressions,
    dashboard_expressions,
    metric_names,
    recording_rule_names,
)

from nacguard.monitoring import DriftReference, Metrics


def sample_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can export, whether or not it has a value yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def known_names() -> set[str]:
    metrics = Metrics(
        model="m",
        profile="p",
        drift_reference=DriftReference(np.linspace(0.0, 1.0, 200), 0.05),
        expected_ood_rate=0.05,
    )
    return sample_names(metrics) | recording_rule_names()


def test_every_referenced_metric_exists(known_names: set[str]) -> None:
    unknown = {
        (e.source, name)
        for e in all_expressions()
        for name in metric_names(e.expr)
        if name not in known_names
    }
    assert unknown == set()


def test_name_check_catches_a_typo(known_names: set[str]) -> None:
    names = metric_names('sum(rate(nacguard_images_scord_total{model=~"m"}[5m]))')
    assert names == {"nacguard_images_scord_total"}
    assert not names <= known_names


def test_every_expression_references_a_metric() -> None:
    for e in all_expressions():
        # `up` is Prometheus' own; every other expression must name a nacguard series.
        assert metric_names(e.expr) or e.expr.startswith("up{"), e.source


def test_recording_rules_are_used_or_alerted_on() -> None:
    """A recording rule nothing reads is dead weight."""
    used = set()
    for e in all_expressions():
        used |= metric_names(e.expr)
    # Rules recorded only for ad-hoc queries and the end-to-end test are listed here.
    ad_hoc = {
        "nacguard:http_requests:rate5m",
        "nacguard:rejections:rate5m",
        "nacguard:http_request_duration_seconds:p50_5m",
        "nacguard:http_request_duration_seconds:p90_5m",
        "nacguard:queue_wait_seconds:p99_5m",
        "nacguard:inference_duration_seconds:p99_5m",
        "nacguard:batch_size_images:mean_5m",
        "nacguard:images_scored:rate5m",
        "nacguard:images_ood:rate5m",
        "nacguard:predictions:rate5m",
    }
    assert recording_rule_names() - used - ad_hoc == set()


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD_FILE.read_text())
    assert dash["uid"] == "nacguard"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "model" in variables
    assert variables["model"]["datasource"]["uid"] == "prometheus"
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            # Every nacguard query is filtered by the $model variable.
            assert 'model=~"$model"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_covers_the_required_views() -> None:
    dash = json.loads(DASHBOARD_FILE.read_text())
    types = {p["type"] for p in dash["panels"]}
    assert {"timeseries", "heatmap", "gauge", "stat"} <= types
    used = set()
    for e in dashboard_expressions():
        used |= metric_names(e.expr)
    required = {
        "nacguard_http_requests_total",
        "nacguard_http_request_duration_seconds_bucket",
        "nacguard_queue_wait_seconds_bucket",
        "nacguard_inference_duration_seconds_bucket",
        "nacguard_batch_size_images_bucket",
        "nacguard_queue_images",
        "nacguard_images_ood_total",
        "nacguard_expected_ood_rate",
        "nacguard_nac_score_bucket",
        "nacguard_nac_score_reference_cdf",
        "nacguard_drift_psi",
        "nacguard_drift_ks",
        "nacguard_predictions_total",
        "nacguard_rejections_total",
        "nacguard_process_resident_memory_bytes",
        "nacguard_device_memory_allocated_bytes",
    }
    assert required - used == set()
    heatmaps = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert heatmaps[0]["targets"][0]["format"] == "heatmap"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = REPO / "docker" / "grafana" / "provisioning"
    datasources = yaml.safe_load((grafana / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus"
    assert source["type"] == "prometheus"
    providers = yaml.safe_load((grafana / "dashboards" / "nacguard.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert RULES_FILE.exists()
