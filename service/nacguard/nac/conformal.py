"""Conformal p-values of OOD scores, their calibrated fusion, and false-alarm checks.

Every score here is "higher = more in-distribution" (NAC, MSP, energy). Given ``n`` held-out InD
calibration scores, the conformal p-value of a new score ``s`` is

    p(s) = (1 + #{calibration scores <= s}) / (n + 1)

If the new image and the calibration images are exchangeable (drawn the same way from the same
distribution, none of them chosen after looking at the scores), ``P(p <= alpha) <= alpha`` for
every alpha: flagging at ``p < alpha`` raises a false alarm on at most an alpha share of InD
inputs, on average over calibration sets. Ties count against the new image, so the guarantee
holds for discrete scores too.

Fusion: the per-detector p-values of one image are combined into one statistic (Fisher's
``sum log p``, or the minimum p), and that statistic is itself calibrated: it is computed on the
calibration images as well (see :func:`self_p_values`) and the new image's fused p-value is the
conformal p-value of its statistic among theirs. The detectors' p-values are strongly dependent
(all read the same logits or activations), which breaks Fisher's chi-square law; the calibrated
version does not need independence. No I/O, no torch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import betabinom, binom, binomtest

__all__ = [
    "FUSIONS",
    "FalseAlarm",
    "binomial_interval",
    "false_alarms",
    "fisher_statistic",
    "fuse",
    "fused_calibration",
    "min_p_statistic",
    "p_value",
    "p_values",
    "self_p_values",
    "threshold_for_alpha",
]


def p_values(calibration: np.ndarray, scores: np.ndarray | Sequence[float]) -> np.ndarray:
    """Conformal p-values of ``scores`` against sorted calibration scores (vectorised).

    Args:
        calibration: held-out InD scores, sorted ascending.
        scores: the scores to test (higher = more InD). NaN gives NaN.

    Returns:
        float64 array in ``[1/(n+1), 1]``, same shape as ``scores``.
    """
    cal = np.asarray(calibration, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if cal.size == 0:
        raise ValueError("no calibration scores")
    p = (1.0 + np.searchsorted(cal, s, side="right")) / (cal.size + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def p_value(calibration: Sequence[float], score: float) -> float:
    """Conformal p-value of one score against a sorted list (the per-image serving path).

    ``bisect`` on a Python list: for one image this costs far less than a numpy round trip.
    """
    if score != score:  # NaN: scoring off
        return math.nan
    return (1.0 + bisect.bisect_right(calibration, score)) / (len(calibration) + 1.0)


def threshold_for_alpha(calibration: np.ndarray, alpha: float) -> float:
    """The score threshold equivalent to flagging at ``p < alpha``.

    ``score < threshold`` holds exactly when ``p_value(score) < alpha``, so an alpha setting can
    reuse the threshold rule. ``-inf`` when no score can reach ``p < alpha`` (alpha at or below
    ``1 / (n + 1)``: too few calibration images for so small an alpha).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    cal = np.asarray(calibration, dtype=np.float64)
    n = cal.size
    if n == 0:
        raise ValueError("no calibration scores")
    # p < alpha  <=>  c = #{cal <= s} < alpha (n + 1) - 1  <=>  c <= m  <=>  s < cal[m]
    m = math.ceil(alpha * (n + 1) - 1 - 1e-9) - 1
    if m < 0:
        return -math.inf
    return float(cal[min(m, n - 1)]) if m < n else math.inf


def self_p_values(scores: np.ndarray) -> np.ndarray:
    """p-values of the calibration images themselves, for calibrating a fused statistic.

    ``#{j: s_j <= s_i} / (n + 1)`` (the image's rank, itself included). A new image's p-value is
    its rank in the calibration set plus itself; a calibration image's exact counterpart would
    add 1 when the new image scores at or below it. Leaving that term out makes the calibration
    statistics lower or equal, so the new image's fused p-value can only grow: conservative,
    still valid.
    """
    s = np.asarray(scores, dtype=np.float64)
    return np.searchsorted(np.sort(s), s, side="right") / (s.size + 1.0)


def fisher_statistic(p: np.ndarray) -> np.ndarray:
    """Fisher's combination as a score: ``sum_k log p_k`` over the last axis (higher = InD).

    That is ``-T / 2`` for Fisher's ``T = -2 sum log p``; under independence T is chi-square with
    2K degrees of freedom, which these detectors do not satisfy, hence :func:`fuse`.
    """
    return np.sum(np.log(np.asarray(p, dtype=np.float64)), axis=-1)


def min_p_statistic(p: np.ndarray) -> np.ndarray:
    """The smallest p-value over the last axis (Bonferroni would multiply it by K)."""
    return np.min(np.asarray(p, dtype=np.float64), axis=-1)


FUSIONS = {"fisher": fisher_statistic, "min": min_p_statistic}


def fuse(
    calibration_p: np.ndarray, p: np.ndarray, method: str = "fisher"
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated fusion of per-detector p-values.

    Args:
        calibration_p: [n, K] the calibration images' own p-values (:func:`self_p_values` per
            detector, the same images for every column).
        p: [..., K] the p-values to fuse.
        method: "fisher" or "min".

    Returns:
        (sorted calibration statistics [n], fused p-values [...]): the statistic of ``p`` and its
        conformal p-value among the calibration statistics.
    """
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}; use one of {sorted(FUSIONS)}")
    stat = FUSIONS[method]
    cal_stats = np.sort(stat(calibration_p))
    return cal_stats, p_values(cal_stats, stat(p))


def fused_calibration(columns: Sequence[np.ndarray], method: str = "fisher") -> np.ndarray:
    """Sorted fused statistics of the calibration images, from their per-detector scores.

    Args:
        columns: per detector, the calibration images' scores, aligned (same image order).
        method: "fisher" or "min".
    """
    cal_p = np.stack([self_p_values(np.asarray(c)) for c in columns], axis=-1)
    return np.sort(FUSIONS[method](cal_p))


@dataclass(frozen=True)
class FalseAlarm:
    """The observed false-alarm rate at one alpha, against what exchangeability predicts.

    Attributes:
        alpha: nominal rate.
        flagged: InD images with ``p < alpha``.
        total: InD images tested.
        low, high: exact (Clopper-Pearson) 95% interval of the observed rate.
        expected_low, expected_high: central 95% range of the flagged count if the tested images
            are exchangeable with the calibration images. With ``n`` calibration images this is
            the beta-binomial law ``BetaBinom(total, m + 1, n - m)`` (``m + 1`` of the ``n + 1``
            ranks are flagged), wider than the plain binomial because the calibration set is a
            sample too; without ``n``, the binomial ``Binom(total, alpha)``.
    """

    alpha: float
    flagged: int
    total: int
    low: float
    high: float
    expected_low: int
    expected_high: int

    @property
    def rate(self) -> float:
        """``flagged / total``."""
        return self.flagged / self.total

    @property
    def consistent(self) -> bool:
        """The flagged count lies in the range exchangeability predicts."""
        return self.expected_low <= self.flagged <= self.expected_high

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "alpha": self.alpha,
            "flagged": self.flagged,
            "total": self.total,
            "rate": self.rate,
            "ci95": [self.low, self.high],
            "expected95": [self.expected_low / self.total, self.expected_high / self.total],
            "consistent": self.consistent,
        }


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion ``k / n``."""
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _expected_range(alpha: float, total: int, n_calibration: int | None) -> tuple[int, int]:
    if n_calibration is None:
        lo, hi = binom.ppf([0.025, 0.975], total, alpha)
    else:
        m = math.ceil(alpha * (n_calibration + 1) - 1 - 1e-9) - 1  # see threshold_for_alpha
        if m < 0:
            return 0, 0
        m = min(m, n_calibration - 1)
        lo, hi = betabinom.ppf([0.025, 0.975], total, m + 1, n_calibration - m)
    return int(lo), int(hi)


def false_alarms(
    ind_p: np.ndarray,
    alphas: Sequence[float] = (0.01, 0.05, 0.1),
    *,
    n_calibration: int | None = None,
) -> list[FalseAlarm]:
    """Observed share of InD images flagged at ``p < alpha``, per alpha (a reliability table).

    Args:
        ind_p: p-values of InD images that did not calibrate them.
        alphas: nominal rates.
        n_calibration: how many calibration images the p-values came from (widens the expected
            range for the calibration draw); None = the plain binomial range.
    """
    p = np.asarray(ind_p, dtype=np.float64)
    p = p[~np.isnan(p)]
    if p.size == 0:
        raise ValueError("no p-values")
    out = []
    for a in alphas:
        k = int(np.sum(p < a))
        low, high = binomial_interval(k, p.size)
        e_lo, e_hi = _expected_range(float(a), int(p.size), n_calibration)
        out.append(FalseAlarm(float(a), k, int(p.size), low, high, e_lo, e_hi))
    return out
