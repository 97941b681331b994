"""A real Prometheus scrapes a real Metrics exposition and evaluates every rule and dashboard
expression: the exposition parses, labels match across series (the reference CDF's ``le`` against
the score histogram's), and the values Prometheus computes are the ones the data implies."""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nacguard.monitoring import DriftReference, Metrics, drift_report
from nacguard.monitoring.exposition import render
from tests.fixtures.promql import PrometheusServer, all_expressions

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]

MODEL = "demo"


@dataclass(frozen=True)
class Batch:
    device: str
    size: int
    queue_wait_s: list[float]
    compute_s: float
    policy_wait_s: float = 0.0


def _metrics(calibration: np.ndarray, share: float, **labels: str) -> Metrics:
    return Metrics(
        model=MODEL,
        profile="p1",
        drift_reference=DriftReference(calibration, float(np.quantile(calibration, share))),
        expected_ood_rate=share,
        max_queue_images=100,
        layers=["block3", "avgpool"],
        **labels,
    )


@pytest.fixture
def exporter() -> Iterator[tuple[Metrics, Metrics, str, np.ndarray]]:
    """The primary's metrics, and a shadow's (version 2, another threshold) beside them, as
    a server with a shadow profile exports them."""
    calibration = np.random.default_rng(0).beta(8.0, 3.0, size=2000)
    metrics = _metrics(calibration, 0.05)
    shadow = _metrics(calibration, 0.2, version="2", role="shadow")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = render(
                [metrics.registry, shadow.registry], self.headers.get("Accept")
            )
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield metrics, shadow, f"127.0.0.1:{server.server_address[1]}", calibration
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def feed(metrics: Metrics, scores: np.ndarray) -> None:
    """One round of traffic: every metric the dashboard reads gets a value."""
    threshold = metrics.drift_reference.threshold
    labels = ["shirt" if s > 0.7 else "bag" for s in scores]
    metrics.observe_predictions(labels, list(scores), [bool(s < threshold) for s in scores])
    metrics.observe_layer_scores([(float(s), min(1.0, float(s) + 0.05)) for s in scores])
    for _ in range(10):
        metrics.observe_request("/predict", "POST", 200, 0.02)
        metrics.observe_batch(Batch("cpu", 8, [0.001] * 8, 0.01))
    metrics.observe_request("/predict", "POST", 500, 0.5)
    metrics.observe_request("/predict", "POST", 429, 0.001)
    metrics.reject("queue_full")
    metrics.cache_lookup(True)
    metrics.cache_lookup(False)
    metrics.redis_error("cache_get")
    metrics.review_appended()
    metrics.set_queue_depth(5)
    metrics.set_in_flight(12)


def test_prometheus_evaluates_every_expression(
    exporter: tuple[Metrics, Metrics, str, np.ndarray], tmp_path: Path
) -> None:
    metrics, shadow, target, calibration = exporter
    ref = metrics.drift_reference
    # Drifted traffic: scores shifted down. Before the first scrape ten times as much as after,
    # so every counter starts far from zero and rate() extrapolates all series alike (the
    # ratios below are then exact).
    rng = np.random.default_rng(1)
    later = rng.beta(8.0, 3.0, size=300) - 0.1
    feed(metrics, np.tile(later, 10))
    metrics.set_redis_up(True)
    report = drift_report(ref, ref.bin_counts(later), window_s=300.0, scope="local")
    assert report.drifting
    metrics.set_drift(report)

    shadow_flags = [bool(s < shadow.drift_reference.threshold) for s in later]
    shadow.observe_predictions(
        ["bag"] * len(later) * 10, list(np.tile(later, 10)), shadow_flags * 10
    )

    with PrometheusServer(tmp_path, targets=[target]) as prom:
        prom.wait_for("nacguard_images_scored_total")
        feed(metrics, later)
        shadow.observe_predictions(["bag"] * len(later), list(later), shadow_flags)
        scored = len(later) * 11
        prom.wait_for(f'nacguard_images_scored_total{{role="primary"}} == {scored}')
        prom.wait_for(f'nacguard_images_scored_total{{role="shadow"}} == {scored}')

        # The "primary vs shadow flag rate" panel: one series per role, each its own share.
        panel = next(
            e.expr
            for e in all_expressions(model=MODEL, rate_interval="1m", range_="5m")
            if "Primary vs shadow flag rate" in e.source
        )
        expected_shadow = float(np.mean(shadow_flags))
        assert expected_shadow != pytest.approx(float(np.mean(later < ref.threshold)))
        rates = {}
        deadline = time.monotonic() + 20
        while len(rates) < 2 and time.monotonic() < deadline:
            rates = {r["metric"]["role"]: float(r["value"][1]) for r in prom.query(panel)}
            time.sleep(0.2)  # the next scrape is at most a second away
        assert rates["shadow"] == pytest.approx(expected_shadow, abs=1e-9)
        assert rates["primary"] == pytest.approx(float(np.mean(later < ref.threshold)), abs=1e-9)

        # The score histogram against the reference CDF, computed by Prometheus, equals what
        # the data says: the second round's CDF minus the calibration CDF at each bound.
        edges = ref.finite_edges
        expected_ks = max(
            abs(float(np.mean(later <= e)) - float(np.mean(calibration <= e))) for e in edges
        )
        expected_ood = float(np.mean(later < ref.threshold))
        ks = _wait_value(prom, "nacguard:nac_score_ks:5m", expected_ks)
        assert ks == pytest.approx(expected_ks, abs=1e-9)
        # The service's own binned KS (left-closed bins) agrees on these tie-free scores.
        assert report.ks == pytest.approx(expected_ks, abs=1e-9)
        ood = _wait_value(prom, "nacguard:ood_rate:ratio_5m", expected_ood)
        assert ood == pytest.approx(expected_ood, abs=1e-9)
        assert ood == pytest.approx(report.ood_rate, abs=1e-9)

        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_initialized()
        for e in all_expressions(model=MODEL, rate_interval="1m", range_="5m"):
            if e.kind == "alert":
                prom.query(e.expr)  # must evaluate; firing is the promtool tests' business
                continue
            if "nacguard_device_memory" in e.expr and not cuda:
                assert prom.query(e.expr) == [], e.source  # CPU-only: no device series
                continue
            assert prom.wait_for(e.expr, timeout=15), e.source

        # The drift alerts' conditions hold for this drifted exporter (before their `for`).
        alerts = {e.source: e.expr for e in all_expressions() if e.kind == "alert"}
        assert prom.query(alerts["rule:NacguardDriftKSHigh"])
        assert prom.query(alerts["rule:NacguardDriftPSIHigh"])
        assert prom.query(alerts["rule:NacguardTargetDown"]) == []


def _wait_value(prom: PrometheusServer, expr: str, expected: float, timeout: float = 20) -> float:
    """Poll a single-series expression until it reads ``expected`` (or time runs out)."""
    deadline = time.monotonic() + timeout
    last = math.nan
    while time.monotonic() < deadline:
        result = prom.query(expr)
        if result:
            last = float(result[0]["value"][1])
            if math.isclose(last, expected, abs_tol=1e-9):
                return last
        time.sleep(0.2)  # the next rule evaluation is at most a second away
    return last
