"""Threshold calibration on held-out InD scores, and the OOD decision it defines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "threshold_at_tpr"]


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


@dataclass(frozen=True)
class Calibration:
    """The OOD threshold and the InD score distribution it was fitted on.

    The one owner of the OOD flag: :meth:`is_ood`.

    Attributes:
        tpr: target share of InD inputs that pass (score >= threshold).
        threshold: inputs scoring below it are flagged OOD.
        scores: sorted held-out InD scores (never the images that were counted).
        source: where the held-out images came from.
    """

    tpr: float
    threshold: float
    scores: np.ndarray
    source: str = ""

    def is_ood(self, score: float) -> bool:
        """Whether an input with NAC ``score`` is flagged OOD (below the threshold; a NaN
        score, as with scoring off, is never flagged)."""
        return bool(score < self.threshold)

    @property
    def expected_ood_rate(self) -> float:
        """Share of InD inputs flagged OOD, as measured on the calibration scores."""
        return float(np.mean(self.scores < self.threshold))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: threshold, TPR, sample count and score quantiles."""
        qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
        return {
            "tpr": self.tpr,
            "threshold": self.threshold,
            "samples": int(self.scores.size),
            "expected_ood_rate": self.expected_ood_rate,
            "source": self.source,
            "score_quantiles": {str(q): float(np.quantile(self.scores, q)) for q in qs},
        }
