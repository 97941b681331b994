"""Metrics: families, labels, histogram buckets from the drift reference, exposition."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from nacguard.monitoring import REJECT_REASONS, DriftReference, Metrics, drift_report

FAMILIES = {
    "nacguard_http_requests": "counter",
    "nacguard_http_request_duration_seconds": "histogram",
    "nacguard_rejections": "counter",
    "nacguard_queue_wait_seconds": "histogram",
    "nacguard_inference_duration_seconds": "histogram",
    "nacguard_batch_size_images": "histogram",
    "nacguard_queue_images": "gauge",
    "nacguard_queue_capacity_images": "gauge",
    "nacguard_in_flight_images": "gauge",
    "nacguard_images_scored": "counter",
    "nacguard_images_ood": "counter",
    "nacguard_predictions": "counter",
    "nacguard_nac_score": "histogram",
    "nacguard_nac_score_reference_cdf": "gauge",
    "nacguard_ood_threshold": "gauge",
    "nacguard_expected_ood_rate": "gauge",
    "nacguard_model_info": "gauge",
    "nacguard_cache_lookups": "counter",
    "nacguard_redis_errors": "counter",
    "nacguard_redis_up": "gauge",
    "nacguard_review_appends": "counter",
    "nacguard_drift_ood_rate": "gauge",
    "nacguard_drift_psi": "gauge",
    "nacguard_drift_ks": "gauge",
    "nacguard_drift_samples": "gauge",
    "nacguard_drift_window_seconds": "gauge",
    "nacguard_drift_psi_threshold": "gauge",
    "nacguard_drift_ks_threshold": "gauge",
    "nacguard_drift_drifting": "gauge",
    "nacguard_process_resident_memory_bytes": "gauge",
    "nacguard_device_memory_allocated_bytes": "gauge",
    "nacguard_device_memory_reserved_bytes": "gauge",
    "nacguard_device_memory_total_bytes": "gauge",
}


@dataclass(frozen=True)
class Batch:
    device: str
    size: int
    queue_wait_s: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    policy_wait_s: float = 0.0


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(0).beta(8.0, 3.0, size=2000)


@pytest.fixture
def metrics(calibration: np.ndarray) -> Metrics:
    return Metrics(
        model="demo",
        profile="fmnist-v1",
        drift_reference=DriftReference(calibration, float(np.quantile(calibration, 0.05))),
        expected_ood_rate=0.05,
        max_queue_images=1024,
        info={"nacguard_version": "0.1.0", "device": "cpu"},
    )


def families(metrics: Metrics) -> dict[str, object]:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(metrics: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    body, _ = metrics.render()
    return [
        (dict(s.labels), s.value)
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if s.name == name
    ]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = [v for lab, v in samples(metrics, name) if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_render_has_every_family_with_its_type(metrics: Metrics) -> None:
    _, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    fams = families(metrics)
    for name, kind in FAMILIES.items():
        assert name in fams, name
        assert fams[name].type == kind, name  # type: ignore[attr-defined]
    # Everything is prefixed and carries the constant labels.
    for fam in fams.values():
        assert fam.name.startswith("nacguard_")  # type: ignore[attr-defined]
        for s in fam.samples:  # type: ignore[attr-defined]
            assert s.labels["model"] == "demo" and s.labels["profile"] == "fmnist-v1"


def test_score_histogram_buckets_are_the_reference_edges(
    metrics: Metrics, calibration: np.ndarray
) -> None:
    ref = metrics.drift_reference
    edges = ref.finite_edges
    assert ref.threshold in edges
    metrics.observe_predictions(["a"] * 3, [0.1, ref.threshold, 0.99], [True, False, False])
    buckets = samples(metrics, "nacguard_nac_score_bucket")
    assert [lab["le"] for lab, _ in buckets] == [floatToGoString(e) for e in edges] + ["+Inf"]
    assert value(metrics, "nacguard_nac_score_bucket", le="+Inf") == 3
    assert value(metrics, "nacguard_nac_score_count") == 3
    # The reference CDF has the same bounds, so PromQL can match them bucket by bucket.
    cdf = samples(metrics, "nacguard_nac_score_reference_cdf")
    assert [lab["le"] for lab, _ in cdf] == [lab["le"] for lab, _ in buckets]
    shares = [v for _, v in cdf]
    assert shares == sorted(shares) and shares[-1] == 1.0
    for edge, share in zip(edges, shares, strict=False):
        assert share == pytest.approx(np.mean(calibration <= edge))
    # Equal-share bins: each bucket holds ~1/20 of the reference.
    assert np.all(np.diff([0.0, *shares]) > 0.02)


def test_metrics_accept_a_shared_drift_reference(calibration: np.ndarray) -> None:
    ref = DriftReference(calibration, 0.5, n_bins=10)
    m = Metrics(
        model="m",
        profile="p",
        drift_reference=ref,
        expected_ood_rate=0.05,
    )
    assert m.drift_reference is ref
    # The buckets exist at 0 before the first score: rate() reads 0, not no-data.
    assert [v for _, v in samples(m, "nacguard_nac_score_bucket")] == [0.0] * ref.n_bins
    m.observe_predictions(["x"], [0.7], [False])
    assert len(samples(m, "nacguard_nac_score_bucket")) == ref.n_bins


def test_constant_gauges(metrics: Metrics) -> None:
    assert value(metrics, "nacguard_expected_ood_rate") == 0.05
    assert value(metrics, "nacguard_ood_threshold") == metrics.drift_reference.threshold
    assert value(metrics, "nacguard_queue_capacity_images") == 1024
    (labels, one) = samples(metrics, "nacguard_model_info")[0]
    assert (
        one == 1
        and labels["nacguard_version"] == "0.1.0"
        and labels["version"] == "1"
        and labels["device"] == "cpu"
    )


def test_invalid_info_label_is_refused(calibration: np.ndarray) -> None:
    with pytest.raises(ValueError, match="info label"):
        Metrics(
            model="m",
            profile="p",
            drift_reference=DriftReference(calibration, 0.5),
            expected_ood_rate=0.05,
            info={"bad-name": "x"},
        )


def test_predictions(metrics: Metrics) -> None:
    metrics.observe_predictions(
        ["shirt", "bag", "shirt", "bag"], [0.9, 0.2, math.nan, 0.8], [False, True, False, False]
    )
    assert value(metrics, "nacguard_images_scored_total") == 4
    assert value(metrics, "nacguard_images_ood_total") == 1
    assert value(metrics, "nacguard_predictions_total", **{"class": "shirt"}) == 2
    assert value(metrics, "nacguard_predictions_total", **{"class": "bag"}) == 2
    # The NaN score (scoring off) is counted as scored but kept out of the histogram.
    assert value(metrics, "nacguard_nac_score_count") == 3
    with pytest.raises(ValueError):
        metrics.observe_predictions(["a"], [0.5, 0.6], [False])


def test_class_series_are_capped(calibration: np.ndarray) -> None:
    def make(**kw: object) -> Metrics:
        return Metrics(
            model="m",
            profile="p",
            drift_reference=DriftReference(calibration, 0.5),
            expected_ood_rate=0.05,
            **kw,  # type: ignore[arg-type]
        )

    known = make(classes=["a", "b", "c"])
    # Declared classes exist at 0 before any prediction, so their rate reads 0, not no-data.
    assert {lab["class"] for lab, _ in samples(known, "nacguard_predictions_total")} == {
        "a",
        "b",
        "c",
    }
    known.observe_predictions(["zz"], [0.9], [False])
    assert value(known, "nacguard_predictions_total", **{"class": "other"}) == 1

    capped = make(max_class_series=2)
    capped.observe_predictions(["a", "b", "c", "d", "a"], [0.9] * 5, [False] * 5)
    counts = {lab["class"]: v for lab, v in samples(capped, "nacguard_predictions_total")}
    assert counts == {"a": 2, "b": 1, "other": 2}

    many = make(classes=[f"c{i}" for i in range(1000)], max_class_series=100)
    assert samples(many, "nacguard_predictions_total") == []


def test_rejections(metrics: Metrics) -> None:
    reasons = {lab["reason"]: v for lab, v in samples(metrics, "nacguard_rejections_total")}
    assert reasons == dict.fromkeys(REJECT_REASONS, 0.0)
    metrics.reject("queue_full")
    metrics.reject("queue_full")
    metrics.reject("made_up")
    assert value(metrics, "nacguard_rejections_total", reason="queue_full") == 2
    assert value(metrics, "nacguard_rejections_total", reason="other") == 1


def test_requests(metrics: Metrics) -> None:
    metrics.observe_request("/predict", "POST", 200, 0.03)
    metrics.observe_request("/predict", "POST", 429, 0.001)
    assert value(metrics, "nacguard_http_requests_total", endpoint="/predict", status="429") == 1
    assert value(metrics, "nacguard_http_request_duration_seconds_count", method="POST") == 2
    assert value(
        metrics, "nacguard_http_request_duration_seconds_bucket", le="0.001"
    ) == pytest.approx(1)
    assert value(metrics, "nacguard_http_request_duration_seconds_sum") == pytest.approx(0.031)


def test_batches_and_queue(metrics: Metrics) -> None:
    metrics.observe_batch(Batch("cpu", 3, [0.001, 0.002, 0.004], 0.02))
    metrics.observe_batch(Batch("cpu", 1, [0.0005], 0.01))
    assert value(metrics, "nacguard_batch_size_images_count", device="cpu") == 2
    assert value(metrics, "nacguard_batch_size_images_sum", device="cpu") == 4
    assert value(metrics, "nacguard_batch_size_images_bucket", device="cpu", le="2.0") == 1
    assert value(metrics, "nacguard_queue_wait_seconds_count", device="cpu") == 4
    assert value(metrics, "nacguard_inference_duration_seconds_sum") == pytest.approx(0.03)
    # Per image, latency = its queue wait + its batch's compute.
    assert value(metrics, "nacguard_image_latency_seconds_sum") == pytest.approx(0.0775)
    assert value(metrics, "nacguard_image_latency_seconds_bucket", le="0.01") == 0
    assert value(metrics, "nacguard_image_latency_seconds_bucket", le="0.025") == 4
    # Neither batch was held for mates.
    assert value(metrics, "nacguard_batch_wait_seconds_bucket", le="0.0") == 2
    metrics.observe_batch(Batch("cpu", 2, [0.003, 0.001], 0.01, policy_wait_s=0.0015))
    assert value(metrics, "nacguard_batch_wait_seconds_bucket", le="0.0") == 2
    assert value(metrics, "nacguard_batch_wait_seconds_bucket", le="0.002") == 3
    assert value(metrics, "nacguard_batch_wait_seconds_sum") == pytest.approx(0.0015)
    metrics.set_queue_depth(17)
    metrics.set_in_flight(40)
    assert value(metrics, "nacguard_queue_images") == 17
    assert value(metrics, "nacguard_in_flight_images") == 40


def test_shared_state_metrics(metrics: Metrics) -> None:
    # Without Redis there is no redis_up series to alert on.
    assert samples(metrics, "nacguard_redis_up") == []
    metrics.set_redis_up(False)
    assert value(metrics, "nacguard_redis_up") == 0
    metrics.set_redis_up(True)
    assert value(metrics, "nacguard_redis_up") == 1
    metrics.cache_lookup(True)
    metrics.cache_lookup(False)
    metrics.cache_lookup(False)
    assert value(metrics, "nacguard_cache_lookups_total", result="hit") == 1
    assert value(metrics, "nacguard_cache_lookups_total", result="miss") == 2
    metrics.redis_error("cache_get")
    assert value(metrics, "nacguard_redis_errors_total", operation="cache_get") == 1
    metrics.review_appended()
    assert value(metrics, "nacguard_review_appends_total") == 1


def test_drift_gauges(metrics: Metrics) -> None:
    ref = metrics.drift_reference
    shifted = np.random.default_rng(1).beta(8.0, 3.0, 300) - 0.15
    rep = drift_report(ref, ref.bin_counts(shifted), window_s=300.0, scope="fleet")
    metrics.set_drift(rep)
    assert value(metrics, "nacguard_drift_psi", scope="fleet") == pytest.approx(rep.psi)
    assert value(metrics, "nacguard_drift_ks", scope="fleet") == pytest.approx(rep.ks)
    assert value(metrics, "nacguard_drift_ood_rate", scope="fleet") == pytest.approx(rep.ood_rate)
    assert value(metrics, "nacguard_drift_samples", scope="fleet") == 300
    assert value(metrics, "nacguard_drift_window_seconds", scope="fleet") == 300
    assert value(metrics, "nacguard_drift_psi_threshold", scope="fleet") == 0.25
    assert value(metrics, "nacguard_drift_ks_threshold", scope="fleet") == 0.2
    assert value(metrics, "nacguard_drift_drifting", scope="fleet") == 1

    # Redis lost: the local report replaces the fleet series; too few samples read NaN.
    few = drift_report(ref, ref.bin_counts(shifted[:10]), window_s=300.0, scope="local")
    metrics.set_drift(few)
    assert {lab["scope"] for lab, _ in samples(metrics, "nacguard_drift_psi")} == {"local"}
    assert math.isnan(value(metrics, "nacguard_drift_psi", scope="local"))
    assert math.isnan(value(metrics, "nacguard_drift_ks", scope="local"))
    assert value(metrics, "nacguard_drift_drifting", scope="local") == 0
    assert value(metrics, "nacguard_drift_samples", scope="local") == 10


def test_process_and_device_memory(metrics: Metrics) -> None:
    assert value(metrics, "nacguard_process_resident_memory_bytes") > 1e6
    if not torch.cuda.is_initialized():
        # A scrape never initialises CUDA: no device series until the model put tensors there.
        assert samples(metrics, "nacguard_device_memory_allocated_bytes") == []


@pytest.mark.gpu
def test_device_memory_on_cuda(metrics: Metrics) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    held = torch.empty(16 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    allocated = value(metrics, "nacguard_device_memory_allocated_bytes", device="cuda:0")
    assert allocated >= held.numel()
    assert value(metrics, "nacguard_device_memory_reserved_bytes", device="cuda:0") >= allocated
    total = value(metrics, "nacguard_device_memory_total_bytes", device="cuda:0")
    assert total > allocated
    del held


def test_registries_are_independent(calibration: np.ndarray) -> None:
    a, b = (
        Metrics(
            model=name,
            profile="p",
            drift_reference=DriftReference(calibration, 0.5),
            expected_ood_rate=0.05,
        )
        for name in ("a", "b")
    )
    a.observe_predictions(["x"], [0.9], [False])
    assert value(a, "nacguard_images_scored_total") == 1
    assert value(b, "nacguard_images_scored_total") == 0


def test_openmetrics_on_request(metrics: Metrics) -> None:
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    _, plain_type = metrics.render("text/plain")
    assert plain_type.startswith("text/plain")


def test_layer_score_histograms(calibration: np.ndarray) -> None:
    metrics = Metrics(
        model="demo",
        profile="p",
        drift_reference=DriftReference(calibration, 0.5),
        expected_ood_rate=0.05,
        layers=["block3", "avgpool"],
    )
    metrics.observe_layer_scores([(0.95, 0.5), (0.99, math.nan), ()])
    fams = families(metrics)
    samples = fams["nacguard_layer_nac_score"].samples  # type: ignore[attr-defined]
    counts = {
        s.labels["layer"]: s.value for s in samples if s.name == "nacguard_layer_nac_score_count"
    }
    assert counts == {"block3": 2.0, "avgpool": 1.0}
    below = {
        s.labels["layer"]: s.value
        for s in samples
        if s.name == "nacguard_layer_nac_score_bucket" and s.labels["le"] == "0.6"
    }
    assert below == {"block3": 0.0, "avgpool": 1.0}
