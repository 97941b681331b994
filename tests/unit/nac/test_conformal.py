"""Conformal p-values, the alpha threshold, calibrated fusion and the false-alarm table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nacguard.nac.conformal import (
    binomial_interval,
    false_alarms,
    fisher_statistic,
    fuse,
    min_p_statistic,
    p_value,
    p_values,
    self_p_values,
    threshold_for_alpha,
)


def _by_definition(cal: np.ndarray, s: float) -> float:
    return (1 + sum(1 for c in cal if c <= s)) / (len(cal) + 1)


def test_p_values_follow_the_definition_with_ties() -> None:
    cal = np.sort(np.array([0.1, 0.2, 0.2, 0.5, 0.9]))
    tests = [0.0, 0.1, 0.15, 0.2, 0.5, 0.95, math.nan]
    got = p_values(cal, tests)
    want = [_by_definition(cal, s) for s in tests[:-1]]
    assert got[:-1].tolist() == want
    assert math.isnan(got[-1])
    # ties count against the new score: 0.2 has three calibration scores at or below it
    assert got[3] == 4 / 6
    assert [p_value(cal.tolist(), s) for s in tests[:-1]] == want
    assert math.isnan(p_value(cal.tolist(), math.nan))


def test_p_values_are_monotone_in_the_score() -> None:
    rng = np.random.default_rng(0)
    cal = np.sort(rng.normal(size=300))
    s = np.sort(rng.normal(size=2000))
    p = p_values(cal, s)
    assert np.all(np.diff(p) >= 0)
    assert p.min() >= 1 / 301 and p.max() <= 1.0
    assert len(np.unique(p)) > 100  # they vary


@pytest.mark.parametrize("n", [5, 19, 99, 1000, 5000])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.3])
def test_threshold_for_alpha_is_the_p_value_rule(n: int, alpha: float) -> None:
    rng = np.random.default_rng(n)
    cal = np.sort(rng.integers(0, 50, size=n).astype(np.float64))  # with ties
    thr = threshold_for_alpha(cal, alpha)
    s = np.concatenate([cal, cal + 0.5, cal - 0.5, [-1e9, 1e9]])
    assert np.array_equal(s < thr, p_values(cal, s) < alpha)


def test_threshold_for_alpha_too_few_calibration_images() -> None:
    assert threshold_for_alpha(np.arange(10.0), 0.05) == -math.inf  # p >= 1/11 > 0.05
    with pytest.raises(ValueError):
        threshold_for_alpha(np.arange(10.0), 0.0)


def test_exchangeable_false_alarm_rate_is_at_most_alpha() -> None:
    # Over many calibration draws the flag rate of a fresh InD score is <= alpha.
    rng = np.random.default_rng(1)
    n, trials, alpha = 39, 20000, 0.1
    cal = np.sort(rng.normal(size=(trials, n)), axis=1)
    new = rng.normal(size=trials)
    flagged = [p_values(cal[t], new[t : t + 1])[0] < alpha for t in range(trials)]
    rate = float(np.mean(flagged))
    low, high = binomial_interval(int(np.sum(flagged)), trials)
    exact = math.floor(alpha * (n + 1) - 1e-9) / (n + 1)  # 3/40 of strict flags at 4/40 = 0.1
    assert low <= exact <= high
    assert rate <= alpha


def test_self_p_values_are_ranks() -> None:
    s = np.array([0.3, 0.1, 0.2, 0.2])
    assert self_p_values(s).tolist() == [4 / 5, 1 / 5, 3 / 5, 3 / 5]


def test_fusion_statistics() -> None:
    p = np.array([[0.5, 0.1], [0.01, 1.0]])
    assert np.allclose(fisher_statistic(p), [math.log(0.05), math.log(0.01)])
    assert min_p_statistic(p).tolist() == [0.1, 0.01]


@pytest.mark.parametrize("method", ["fisher", "min"])
def test_calibrated_fusion_is_valid_for_dependent_detectors(method: str) -> None:
    # Three strongly correlated detectors: uncalibrated Fisher would flag far more than alpha.
    rng = np.random.default_rng(2)

    def detectors(n: int) -> np.ndarray:
        z = rng.normal(size=(n, 1))
        return z + 0.1 * rng.normal(size=(n, 3))

    cal, new = detectors(2000), detectors(20000)
    cal_sorted = np.sort(cal, axis=0)
    cal_p = np.stack([self_p_values(cal[:, k]) for k in range(3)], axis=1)
    new_p = np.stack([p_values(cal_sorted[:, k], new[:, k]) for k in range(3)], axis=1)
    stats, fused = fuse(cal_p, new_p, method)
    assert np.all(np.diff(stats) >= 0)
    for alpha in (0.01, 0.05, 0.1):
        k = int(np.sum(fused < alpha))
        low, _ = binomial_interval(k, fused.size)
        assert low <= alpha  # not above alpha
        # and not uselessly conservative: the calibration set's own spread is about
        # sqrt(alpha (1 - alpha) / 2000), 0.005 at alpha 0.05
        assert k / fused.size >= 0.6 * alpha
    if method == "fisher":
        from scipy.stats import chi2

        naive = chi2.sf(-2 * fisher_statistic(new_p), df=6)
        assert np.mean(naive < 0.05) > 0.1  # the independence assumption is far off here


def test_fuse_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(np.ones((3, 2)), np.ones((1, 2)), "stouffer")


def test_false_alarm_table() -> None:
    p = np.array([0.005, 0.02, 0.04, 0.2, 0.5, 0.9, math.nan])
    rows = false_alarms(p, (0.01, 0.05))
    assert [r.flagged for r in rows] == [1, 3]
    assert rows[0].total == 6 and rows[0].rate == 1 / 6
    assert rows[0].low < 1 / 6 < rows[0].high
    d = rows[1].to_dict()
    assert d["ci95"][0] > 0.05
    assert (rows[0].expected_low, rows[0].expected_high) == (0, 1)  # Binom(6, 0.01)
    assert d["consistent"] is (rows[1].flagged <= rows[1].expected_high)


def test_expected_range_widens_for_the_calibration_draw() -> None:
    p = np.full(5000, 0.5)
    plain = false_alarms(p, (0.05,))[0]
    conformal = false_alarms(p, (0.05,), n_calibration=5000)[0]
    assert conformal.expected_low < plain.expected_low < 250 < plain.expected_high
    assert plain.expected_high < conformal.expected_high
    assert not conformal.consistent  # nothing flagged at all is not what alpha promised
