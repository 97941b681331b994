"""Threshold calibration on held-out InD scores."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["threshold_at_tpr"]


def threshold_at_tpr(ind_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Largest threshold such that at least ``tpr`` of the InD scores are >= it.

    An input is flagged OOD when its score is below the threshold, so on the calibration
    data the true positive rate (InD kept) is at least ``tpr``.

    Args:
        ind_scores: held-out InD scores (not the images the profile was counted on).
        tpr: target share of InD inputs that pass, in (0, 1].
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError("tpr must be in (0, 1]")
    s = np.sort(np.asarray(ind_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no calibration scores")
    k = math.floor((1.0 - tpr) * s.size + 1e-9)
    return float(s[min(k, s.size - 1)])
