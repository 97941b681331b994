"""A real Prometheus scrapes a real ``nacguard serve`` (the demo profile) while InD and OOD images
are posted to it, and evaluates every rule and dashboard expression through its HTTP API.

Two tests, each with its own server and its own Prometheus, so the phases cannot mix:

* InD only (in-process store): the drift gauges stay under their thresholds, the drift and
  OOD-rate alert expressions stay empty although every input they read has data.
* Mostly OOD (with a real Redis, so the drift scope is ``fleet`` and the Redis series exist): the
  drift gauges cross their thresholds, the OOD-rate and drift alert expressions become true, and
  every expression of the rules and the dashboard evaluates and returns data, except the few
  listed below with the reason why.

Synchronisation is by polling Prometheus with a deadline (``PrometheusServer.wait_for``) for the
values the responses imply; nothing sleeps to wait for a scrape.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nacguard.offline.datasets import load_source
from tests.e2e.server import ServerProcess, start_server
from tests.fixtures import promql
from tests.fixtures.redis_server import RedisServer

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed"),
]

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "profiles" / "fashion-mnist"

#: Few enough samples that a few hundred images give drift statistics; PSI's no-drift noise
#: floor at 300-400 samples is about 0.05-0.07, far under the 0.25 threshold.
DRIFT_MIN_SAMPLES = 100
#: Images per multipart request and concurrent requests: batches of several requests' images.
PER_REQUEST = 8
CONCURRENCY = 4
#: Per-poll deadline for Prometheus to show a value (scrape and rule evaluation are every 1 s).
WAIT_S = 30.0

#: Alerts that a healthy run must not fire, and why they cannot here. Their expression is still
#: evaluated (it must not error) and must return nothing; the quantity they compare with their
#: threshold (the expression without its final ``> N`` / ``== N``) must return data.
QUIET_ALERTS: dict[str, str] = {
    "NacguardTargetDown": "the target is up",
    "NacguardHighErrorRate": "one deliberate 504 among about 40 requests is under 5%",
    "NacguardQueueSaturated": "at most 32 images are queued against a bound of 1024",
    "NacguardRejectionsHigh": "one deliberate deadline rejection among about 40 /predict requests",
    "NacguardRedisDown": "Redis runs throughout",
}
#: Alerts evaluated like QUIET_ALERTS, but whether they fire is not asserted (timing).
TIMING_ALERTS: dict[str, str] = {
    "NacguardLatencyP99High": "p99 over 1 s depends on how busy the shared machine is",
}
#: Metrics whose series legitimately do not exist in this run: expressions reading them must
#: evaluate and return nothing.
NO_SERIES: dict[str, str] = {
    "nacguard_redis_errors_total": "no Redis call fails in a healthy run, and a series appears "
    "with its operation's first failure (failures: tests/integration/store)",
}
DEVICE_MEMORY = (
    "nacguard_device_memory_allocated_bytes",
    "nacguard_device_memory_reserved_bytes",
    "nacguard_device_memory_total_bytes",
)

_COMPARISON = re.compile(r"^(?P<lhs>.+?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.S)


def _device() -> str:
    """``cuda`` where a GPU is visible (then the device memory panels must have data), else cpu."""
    import torch  # only to ask; the server process does the work

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- images and load -----------------------------------------------------------------------------


def _pngs(specs: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """PNG bodies for ``(spec, limit, seed)`` sources, without duplicate images: a repeated image
    would be a cache hit, neither scored nor counted in the drift window."""
    out: list[bytes] = []
    seen: set[bytes] = set()
    for spec, limit, seed in specs:
        try:
            source = load_source(spec, limit=limit, seed=seed)
        except FileNotFoundError as exc:
            pytest.skip(f"dataset missing: {exc}")
        for i in range(len(source)):
            image = source.images[i]
            digest = hashlib.sha256(image.tobytes()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
    return out


async def _post_all(url: str, images: Sequence[bytes]) -> list[dict[str, Any]]:
    """POST every image once (multipart, PER_REQUEST per request, CONCURRENCY requests at a time);
    return the predictions in image order. Every request must answer 200."""
    chunks = [images[i : i + PER_REQUEST] for i in range(0, len(images), PER_REQUEST)]
    answers: list[list[dict[str, Any]]] = [[] for _ in chunks]
    pending = iter(range(len(chunks)))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in pending:  # the workers share one iterator: each chunk is sent once
            files = [("images", (f"{j}.png", d, "image/png")) for j, d in enumerate(chunks[index])]
            response = await client.post("/predict", files=files)
            assert response.status_code == 200, response.text
            answers[index] = response.json()["predictions"]

    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return [p for answer in answers for p in answer]


# --- reading Prometheus --------------------------------------------------------------------------


def _value(prom: Any, expr: str) -> float:
    """The single value of ``expr`` (which must return exactly one series)."""
    result = prom.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def _wait(prom: Any, expr: str) -> list[dict[str, Any]]:
    """``prom.wait_for(expr)``; on time-out, fail showing what the series it reads hold."""
    try:
        result: list[dict[str, Any]] = prom.wait_for(expr, timeout=WAIT_S)
    except TimeoutError:
        held = {name: prom.query(name) for name in sorted(promql.metric_names(expr))}
        pytest.fail(f"no result for {expr!r} within {WAIT_S} s; the series hold {held}")
    return result


def _wait_equal(prom: Any, expr: str, expected: float) -> None:
    """Poll until the single-series ``expr`` reads ``expected`` (to 1e-9)."""
    _wait(prom, f"abs(({expr}) - {expected!r}) < 1e-9")


@dataclass(frozen=True)
class Phase:
    """One load phase as the client saw it, once Prometheus shows all of it.

    Attributes:
        model: the ``model`` label (the served model's name).
        scores: NAC score of every posted image.
        flagged: images answered ``ood: true``.
        classes: images per predicted class.
        drift: ``GET /v1/drift`` after the load.
    """

    model: str
    scores: list[float]
    flagged: int
    classes: dict[str, int]
    drift: dict[str, Any]


def _run_phase(prom: Any, server: ServerProcess, images: Sequence[bytes]) -> Phase:
    """Post ``images`` and wait until Prometheus has scraped all of it and evaluated the rules.

    A scrape before the load makes every counter start from a sample at 0, so the rates over the
    load are exact ratios (rate() extrapolates a series that starts at 0 no further back).
    """
    _wait(prom, "nacguard_images_scored_total == 0")
    predictions = asyncio.run(_post_all(server.url, images))
    assert len(predictions) == len(images)
    scores = [float(p["nac_score"]) for p in predictions]
    flagged = sum(1 for p in predictions if p["ood"])
    n = len(predictions)
    _wait(prom, f"nacguard_images_scored_total == {n}")
    _wait(prom, f"nacguard_images_ood_total == {flagged}")
    _wait(prom, f"nacguard_drift_samples == {n}")
    # The recording rules have evaluated the final samples once they give the responses' share.
    _wait_equal(prom, "nacguard:ood_rate:ratio_5m", flagged / n)
    drift = httpx.get(f"{server.url}/v1/drift", timeout=10).json()
    model = str(prom.query("nacguard_model_info")[0]["metric"]["model"])
    return Phase(model, scores, flagged, dict(Counter(p["label"] for p in predictions)), drift)


def _check_phase_consistency(prom: Any, phase: Phase) -> dict[str, float]:
    """What Prometheus holds equals what the client saw and what the service reports; returns
    the drift gauges as Prometheus stores them."""
    # Predictions by class, summed over the class series.
    by_class = {
        r["metric"]["class"]: round(float(r["value"][1]))
        for r in prom.query("sum by (class) (nacguard_predictions_total)")
    }
    assert {k: v for k, v in by_class.items() if v} == phase.classes
    # The drift gauges as scraped equal GET /v1/drift (same window, no traffic since).
    gauges = {
        name: _value(prom, f"nacguard_drift_{name}")
        for name in ("psi", "ks", "ood_rate", "samples", "drifting")
    }
    drift = phase.drift
    assert drift["enough_samples"] and drift["samples"] == len(phase.scores)
    assert gauges["samples"] == drift["samples"]
    for name in ("psi", "ks", "ood_rate"):
        assert gauges[name] == pytest.approx(drift[name], rel=1e-12), name
    assert gauges["drifting"] == float(drift["drifting"])
    # Prometheus' own KS from the score histogram equals the one the posted scores imply: each
    # bucket's share of scores <= le against the exported reference CDF at that le.
    n = len(phase.scores)
    expected_ks = max(
        abs(sum(1 for s in phase.scores if s <= le) / n - ref)
        for le, ref in (
            (float(r["metric"]["le"]), float(r["value"][1]))
            for r in prom.query("nacguard_nac_score_reference_cdf")
        )
    )
    _wait_equal(prom, "nacguard:nac_score_ks:5m", expected_ks)
    gauges["prometheus_ks"] = expected_ks
    return gauges


def _alerts() -> dict[str, str]:
    """Alert name -> its expression, from the rules file."""
    return {
        e.source.removeprefix("rule:"): e.expr
        for e in promql.all_expressions()
        if e.kind == "alert"
    }


def _check_every_expression(prom: Any, model: str, device: str) -> None:
    """Every rule and dashboard expression evaluates, and returns data unless listed above."""
    no_series = dict(NO_SERIES)
    if device == "cpu":
        no_series.update(dict.fromkeys(DEVICE_MEMORY, "no CUDA memory series on CPU (by design)"))
    used: set[str] = set()
    for e in promql.all_expressions(model=model):
        name = e.source.removeprefix("rule:")
        if name in QUIET_ALERTS or name in TIMING_ALERTS:
            used.add(name)
            result = prom.query(e.expr)  # evaluates without error
            if name in QUIET_ALERTS:
                assert result == [], f"{name} fires: {result}"
            match = _COMPARISON.match(e.expr)
            assert match, f"{name}: no final comparison with a constant to strip: {e.expr}"
            _wait(prom, match["lhs"])
            continue
        missing = promql.metric_names(e.expr) & no_series.keys()
        if missing:
            used |= missing
            assert prom.query(e.expr) == [], f"{e.source} has data for {missing}"
            continue
        _wait(prom, e.expr)
    # An exception that no expression needs any more is stale: remove it.
    assert used == QUIET_ALERTS.keys() | TIMING_ALERTS.keys() | no_series.keys()


# --- the tests -----------------------------------------------------------------------------------


def test_ind_traffic_stays_under_the_drift_thresholds(tmp_path: Path) -> None:
    images = _pngs([("fashion-mnist:test", 400, 0)])
    server = start_server(
        PROFILE,
        tmp_path / "serve.log",
        drift_min_samples=DRIFT_MIN_SAMPLES,
        log_level="warning",
        device=_device(),
    )
    try:
        (tmp_path / "prometheus").mkdir()
        target = server.url.removeprefix("http://")
        with promql.PrometheusServer(tmp_path / "prometheus", [target]) as prom:
            phase = _run_phase(prom, server, images)
            gauges = _check_phase_consistency(prom, phase)
            assert phase.drift["scope"] == "local"  # no Redis: this process's window

            # Under every threshold, with enough samples that the statistics are defined (an
            # alert comparing NaN would be empty for the wrong reason).
            assert gauges["psi"] < _value(prom, "nacguard_drift_psi_threshold")
            assert gauges["ks"] < _value(prom, "nacguard_drift_ks_threshold")
            assert gauges["prometheus_ks"] < _value(prom, "nacguard_drift_ks_threshold")
            assert gauges["drifting"] == 0
            expected = _value(prom, "nacguard:expected_ood_rate")
            ood_rate = _value(prom, "nacguard:ood_rate:ratio_5m")
            assert ood_rate < 2 * expected + 0.01
            # The OOD-rate alert's volume condition holds: its silence is the rate's doing.
            assert prom.query("nacguard:images_scored:increase5m >= 200")

            alerts = _alerts()
            for name in ("NacguardOODRateHigh", "NacguardDriftPSIHigh", "NacguardDriftKSHigh"):
                assert prom.query(alerts[name]) == [], name
            for e in promql.all_expressions(model=phase.model):
                prom.query(e.expr)  # every expression evaluates without error
    finally:
        server.stop()


@pytest.mark.redis
def test_ood_traffic_crosses_the_thresholds_and_every_expression_has_data(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Mostly OOD (4 x 60 generated images of four kinds) with a fifth of InD images.
    ood_kinds = ("gaussian", "checkerboard", "stripes", "shapes")
    images = _pngs(
        [(f"synthetic:{kind}?n=60&seed=7", 60, 0) for kind in ood_kinds]
        + [("fashion-mnist:test", 60, 1)]
    )
    device = _device()
    server = start_server(
        PROFILE,
        tmp_path / "serve.log",
        drift_min_samples=DRIFT_MIN_SAMPLES,
        log_level="warning",
        device=device,
        redis_url=redis_server.url,
        # The default 50 ms bounds a Redis call in wall time on the server's event loop; on a
        # small shared machine a busy loop alone can exceed it, Redis is then marked down and
        # the fleet window misses those scores (the store tests cover that degradation).
        redis_timeout_s=2.0,
    )
    try:
        (tmp_path / "prometheus").mkdir()
        target = server.url.removeprefix("http://")
        with promql.PrometheusServer(tmp_path / "prometheus", [target]) as prom:
            # One real 5xx: a client deadline that passes before its image is queued (504,
            # rejection reason `deadline`). Without any 5xx the 5xx-ratio expressions have no
            # numerator series and return nothing.
            late = httpx.post(
                f"{server.url}/predict",
                content=_pngs([("synthetic:blobs?n=1&seed=99", 1, 0)])[0],
                headers={"Content-Type": "image/png", "X-Timeout-Ms": "0.001"},
                timeout=10,
            )
            assert late.status_code == 504, late.text
            phase = _run_phase(prom, server, images)
            _wait(prom, 'nacguard_rejections_total{reason="deadline"} == 1')
            _wait(prom, 'nacguard_http_requests_total{status="504"} == 1')

            gauges = _check_phase_consistency(prom, phase)
            assert phase.drift["scope"] == "fleet"  # the window is in Redis
            assert phase.flagged > len(images) // 2

            # Over the thresholds, and the alert expressions (not their `for:` state) are true.
            assert gauges["psi"] > _value(prom, "nacguard_drift_psi_threshold")
            assert gauges["ks"] > _value(prom, "nacguard_drift_ks_threshold")
            assert gauges["prometheus_ks"] > _value(prom, "nacguard_drift_ks_threshold")
            assert gauges["drifting"] == 1
            alerts = _alerts()
            for name in ("NacguardOODRateHigh", "NacguardDriftPSIHigh", "NacguardDriftKSHigh"):
                _wait(prom, alerts[name])

            _check_every_expression(prom, phase.model, device)
    finally:
        server.stop()
