"""DriftReference bins and the drift statistics computed from bin counts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nacguard.monitoring.drift import (
    PSI_EPSILON,
    DriftReference,
    DriftReport,
    drift_report,
    ks_statistic,
    psi,
)
from nacguard.nac.calibration import threshold_at_tpr


def exact_ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic: sup |F_a - F_b| over all points of both samples."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    fa = np.searchsorted(a, points, side="right") / a.size
    fb = np.searchsorted(b, points, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    # NAC-UE-like: bounded, skewed scores of 4000 held-out InD images.
    return np.random.default_rng(0).beta(8.0, 3.0, size=4000)


@pytest.fixture(scope="module")
def reference(calibration: np.ndarray) -> DriftReference:
    return DriftReference(calibration, threshold_at_tpr(calibration, 0.95))


def report(reference: DriftReference, scores: np.ndarray, **kw: Any) -> DriftReport:
    args: dict[str, Any] = {"window_s": 300.0, "min_samples": 200} | kw
    return drift_report(reference, reference.bin_counts(scores), **args)


# --- the bins -------------------------------------------------------------------------------
def test_edges_are_reference_quantiles_with_the_threshold(reference: DriftReference) -> None:
    edges = reference.edges
    assert edges[0] == -math.inf and edges[-1] == math.inf
    assert np.all(np.diff(edges) > 0)
    assert reference.threshold in edges
    assert edges[reference.ood_bins] == reference.threshold
    assert reference.n_bins == edges.size - 1 == 20
    assert reference.expected.sum() == pytest.approx(1.0)
    # Equal shares, except where the threshold split a bin: never under half a bin.
    assert np.all(reference.expected >= 0.5 / 20 - 1e-3)
    assert np.all(reference.expected <= 1.5 / 20 + 1e-3)


def test_threshold_calibrated_at_tpr_gives_the_expected_ood_share(
    calibration: np.ndarray, reference: DriftReference
) -> None:
    assert reference.reference_ood_rate == pytest.approx(0.05, abs=1 / calibration.size)
    assert reference.reference_ood_rate == pytest.approx(
        float(np.mean(calibration < reference.threshold))
    )


def test_threshold_far_out_in_an_outer_bin_becomes_an_extra_edge(
    calibration: np.ndarray,
) -> None:
    threshold = float(np.quantile(calibration, 0.01))  # 4% below the first (5%) edge
    ref = DriftReference(calibration, threshold)
    assert ref.n_bins == 21
    assert ref.reference_ood_rate == pytest.approx(0.01, abs=1e-3)


@pytest.mark.parametrize(("tpr_share", "replaced"), [(0.06, 0.05), (0.075, 0.05), (0.09, 0.10)])
def test_threshold_near_a_quantile_replaces_it(
    calibration: np.ndarray, tpr_share: float, replaced: float
) -> None:
    threshold = float(np.quantile(calibration, tpr_share))
    ref = DriftReference(calibration, threshold)
    assert ref.n_bins == 20
    assert float(np.quantile(calibration, replaced)) not in ref.edges
    assert ref.expected.min() >= 0.025 - 1e-3  # no sliver bin beside the threshold
    assert ref.reference_ood_rate == pytest.approx(tpr_share, abs=1e-3)


def test_ties_in_the_reference_leave_no_empty_bin() -> None:
    # Coarse scores: only 7 distinct values, so most quantiles coincide.
    scores = np.random.default_rng(1).integers(0, 7, size=1000) / 6.0
    ref = DriftReference(scores, threshold=1 / 6)
    assert ref.threshold in ref.edges
    assert np.all(ref.expected > 0)
    assert ref.reference_ood_rate == pytest.approx(float(np.mean(scores < 1 / 6)))


def test_threshold_outside_the_reference_is_kept() -> None:
    ref = DriftReference(np.linspace(0.5, 1.0, 100), threshold=0.1)
    assert ref.edges[1] == 0.1
    assert ref.reference_ood_rate == 0.0
    rep = drift_report(ref, ref.bin_counts(np.full(300, 0.05)), window_s=60.0, min_samples=10)
    assert rep.ood_rate == 1.0
    assert rep.psi is not None and math.isfinite(rep.psi) and rep.drifting


def test_bins_are_left_closed_like_the_ood_rule() -> None:
    ref = DriftReference((np.arange(100) + 0.5) / 100, threshold=0.25, n_bins=4)
    np.testing.assert_array_equal(ref.edges, [-math.inf, 0.25, 0.5, 0.7475, math.inf])
    counts = ref.bin_counts([0.25, np.nextafter(0.25, 0.0), -math.inf, math.inf, 0.5, math.nan])
    # 0.25 is not OOD (score < threshold is), so it opens bin 1; NaN is not counted.
    np.testing.assert_array_equal(counts, [2, 1, 1, 1])
    assert counts.dtype == np.int64


def test_fingerprint_identifies_the_bins(calibration: np.ndarray) -> None:
    a = DriftReference(calibration, 0.5)
    assert a.fingerprint == DriftReference(calibration.copy(), 0.5).fingerprint
    assert a.fingerprint != DriftReference(calibration, 0.55).fingerprint


@pytest.mark.parametrize(
    ("scores", "threshold", "n_bins"),
    [([], 0.5, 20), ([np.nan], 0.5, 20), ([0.1, 0.2], math.nan, 20), ([0.1, 0.2], 0.5, 1)],
)
def test_invalid_reference_is_refused(scores: list[float], threshold: float, n_bins: int) -> None:
    with pytest.raises(ValueError):
        DriftReference(np.asarray(scores), threshold, n_bins=n_bins)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=200))
def test_counts_match_scores_and_ood_flags(scores: list[float]) -> None:
    ref = DriftReference(np.linspace(0.0, 1.0, 101), threshold=0.3)
    counts = ref.bin_counts(scores)
    arr = np.asarray(scores, dtype=np.float64)
    assert counts.sum() == np.count_nonzero(~np.isnan(arr))
    assert counts[: ref.ood_bins].sum() == np.count_nonzero(arr < 0.3)


def test_counts_add_up_across_replicas(reference: DriftReference) -> None:
    scores = np.random.default_rng(2).beta(8.0, 3.0, size=500)
    np.testing.assert_array_equal(
        reference.bin_counts(scores[:200]) + reference.bin_counts(scores[200:]),
        reference.bin_counts(scores),
    )


# --- statistics on constructed counts ----------------------------------------------------------
@pytest.fixture
def quarters() -> DriftReference:
    ref = DriftReference((np.arange(100) + 0.5) / 100, threshold=0.25, n_bins=4)
    np.testing.assert_allclose(ref.expected, [0.25] * 4)
    return ref


def test_statistics_are_exact_on_constructed_counts(quarters: DriftReference) -> None:
    rep = drift_report(quarters, np.array([10, 20, 30, 40]), window_s=60.0, min_samples=100)
    q, p = np.array([0.1, 0.2, 0.3, 0.4]), 0.25
    assert rep.samples == 100
    assert rep.ood_rate == pytest.approx(0.1)
    assert rep.psi == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    assert rep.ks == pytest.approx(0.2)  # cumulative 0.1/0.3/0.6 against 0.25/0.5/0.75
    # PSI 0.228 and KS 0.2 are not above the default thresholds 0.25 and 0.2 ...
    assert not rep.drifting
    # ... but either one above its own threshold is drift.
    counts = np.array([10, 20, 30, 40])
    assert drift_report(
        quarters, counts, window_s=60.0, min_samples=100, ks_threshold=0.15
    ).drifting
    assert drift_report(
        quarters, counts, window_s=60.0, min_samples=100, psi_threshold=0.2
    ).drifting


def test_empty_bins_cost_a_finite_psi(quarters: DriftReference) -> None:
    rep = drift_report(quarters, np.array([0, 50, 50, 0]), window_s=60.0, min_samples=1)
    eps = PSI_EPSILON
    expected = 2 * (eps - 0.25) * math.log(eps / 0.25) + 2 * 0.25 * math.log(2.0)
    assert rep.psi == pytest.approx(expected)
    assert rep.ks == pytest.approx(0.25)
    assert rep.ood_rate == 0.0


def test_identical_distribution_gives_zero(quarters: DriftReference) -> None:
    rep = drift_report(quarters, np.array([5, 5, 5, 5]), window_s=60.0, min_samples=1)
    assert rep.psi == pytest.approx(0.0, abs=1e-12)
    assert rep.ks == pytest.approx(0.0, abs=1e-12)
    assert not rep.drifting


def test_psi_and_ks_functions() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert psi(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(
        0.4 * math.log(1.8) - 0.4 * math.log(0.2)
    )
    assert ks_statistic(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(0.4)
    assert ks_statistic(np.array([1.0]), np.array([1.0])) == 0.0


# --- binned KS against the exact two-sample statistic -----------------------------------------
@pytest.mark.parametrize("n_bins", [20, 50])
@pytest.mark.parametrize("shift", [0.0, 0.03, 0.1, -0.05])
def test_binned_ks_is_close_to_the_exact_ks(
    calibration: np.ndarray, n_bins: int, shift: float
) -> None:
    ref = DriftReference(calibration, threshold_at_tpr(calibration, 0.95), n_bins=n_bins)
    window = np.random.default_rng(3).beta(8.0, 3.0, size=400) + shift
    rep = drift_report(ref, ref.bin_counts(window), window_s=60.0, min_samples=1)
    exact = exact_ks(calibration, window)
    assert rep.ks is not None
    # Never above the exact value, below it by at most one bin's reference share.
    assert rep.ks <= exact + 1e-12
    assert exact - rep.ks <= float(ref.expected.max()) + 1e-12


def test_exact_ks_helper_agrees_with_scipy(calibration: np.ndarray) -> None:
    window = np.random.default_rng(4).beta(7.0, 3.0, size=300)
    assert exact_ks(calibration, window) == pytest.approx(
        stats.ks_2samp(calibration, window).statistic
    )


# --- behaviour on realistic windows -----------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_ind_windows_stay_under_the_thresholds(reference: DriftReference, seed: int) -> None:
    window = np.random.default_rng(100 + seed).beta(8.0, 3.0, size=300)
    rep = report(reference, window)
    assert rep.psi is not None and rep.psi < 0.25
    assert rep.ks is not None and rep.ks < 0.2
    assert rep.ood_rate is not None and abs(rep.ood_rate - 0.05) < 0.05
    assert not rep.drifting


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda rng: rng.beta(8.0, 3.0, size=300) - 0.12, id="shifted-down"),
        pytest.param(lambda rng: rng.beta(4.0, 3.0, size=300), id="wider-lower"),
        pytest.param(
            lambda rng: np.concatenate([rng.beta(8.0, 3.0, 180), rng.beta(2.0, 5.0, 120)]),
            id="40%-ood-mixture",
        ),
    ],
)
def test_shifted_windows_cross_the_thresholds(
    reference: DriftReference, make: Callable[[np.random.Generator], np.ndarray]
) -> None:
    rep = report(reference, make(np.random.default_rng(7)))
    assert rep.drifting
    assert rep.psi is not None and rep.psi > 0.25
    assert rep.ks is not None and rep.ks > 0.2
    assert rep.ood_rate is not None and rep.ood_rate > 2 * rep.expected_ood_rate


def test_too_few_samples_report_nothing(reference: DriftReference) -> None:
    window = np.random.default_rng(8).beta(2.0, 5.0, size=50)  # very OOD, but only 50
    rep = report(reference, window, scope="fleet", expected_ood_rate=0.05)
    assert rep.samples == 50
    assert rep.ood_rate is None and rep.psi is None and rep.ks is None
    assert not rep.drifting
    empty = report(reference, np.array([]), min_samples=0)
    assert empty.samples == 0 and empty.psi is None


def test_report_to_dict_is_json(reference: DriftReference) -> None:
    rep = report(reference, np.random.default_rng(9).beta(8.0, 3.0, 300), scope="fleet")
    body = json.loads(json.dumps(rep.to_dict()))
    assert body["scope"] == "fleet"
    assert body["window_s"] == 300.0
    assert body["samples"] == 300
    assert body["min_samples"] == 200
    assert body["enough_samples"] is True
    assert body["psi_threshold"] == 0.25 and body["ks_threshold"] == 0.2
    assert body["expected_ood_rate"] == pytest.approx(0.05, abs=1e-3)
    assert set(body) >= {"ood_rate", "psi", "ks", "drifting"}


def test_counts_must_fit_the_reference(reference: DriftReference) -> None:
    with pytest.raises(ValueError, match="bins"):
        drift_report(reference, np.ones(reference.n_bins + 1), window_s=1.0)
    counts = np.ones(reference.n_bins)
    counts[0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        drift_report(reference, counts, window_s=1.0)
    with pytest.raises(ValueError, match="scope"):
        drift_report(reference, np.ones(reference.n_bins), window_s=1.0, scope="global")
