"""Detection metrics with InD as the positive class and higher scores meaning InD."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from nacguard.nac.calibration import threshold_at_tpr

__all__ = ["DetectionMetrics", "aupr_in", "auroc", "detection_metrics", "fpr_at_tpr", "roc_curve"]


@dataclass(frozen=True)
class DetectionMetrics:
    """AUROC, FPR at 95% TPR, and AUPR (InD positive), as fractions in [0, 1]."""

    auroc: float
    fpr95: float
    aupr: float

    def to_dict(self) -> dict[str, float]:
        """JSON-able form."""
        return {"auroc": self.auroc, "fpr95": self.fpr95, "aupr": self.aupr}


def auroc(ind: np.ndarray, ood: np.ndarray) -> float:
    """Probability that a random InD score exceeds a random OOD score (ties count half)."""
    ind, ood = np.asarray(ind, np.float64), np.asarray(ood, np.float64)
    ranks = rankdata(np.concatenate([ind, ood]))
    u = ranks[: ind.size].sum() - ind.size * (ind.size + 1) / 2.0
    return float(u / (ind.size * ood.size))


def fpr_at_tpr(ind: np.ndarray, ood: np.ndarray, tpr: float = 0.95) -> float:
    """Share of OOD scores at or above the threshold that keeps ``tpr`` of InD."""
    thr = threshold_at_tpr(ind, tpr)
    return float(np.mean(np.asarray(ood) >= thr))


def aupr_in(ind: np.ndarray, ood: np.ndarray) -> float:
    """Average precision with InD as positive (step-wise, as in OpenOOD's AUPR-In)."""
    scores = np.concatenate([ind, ood]).astype(np.float64)
    labels = np.concatenate([np.ones(len(ind)), np.zeros(len(ood))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # Evaluate only at the last position of each run of tied scores.
    last = np.r_[np.diff(scores) != 0, True]
    tp = np.cumsum(labels)[last]
    fp = np.cumsum(1 - labels)[last]
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(ind: np.ndarray, ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points for plotting, thresholds from high to low."""
    scores = np.concatenate([ind, ood]).astype(np.float64)
    labels = np.concatenate([np.ones(len(ind)), np.zeros(len(ood))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.diff(scores) != 0, True]
    tpr = np.r_[0.0, np.cumsum(labels)[last] / max(labels.sum(), 1)]
    fpr = np.r_[0.0, np.cumsum(1 - labels)[last] / max((1 - labels).sum(), 1)]
    return fpr, tpr


def detection_metrics(ind: np.ndarray, ood: np.ndarray) -> DetectionMetrics:
    """AUROC, FPR95 and AUPR-In of one score on one InD/OOD pair."""
    return DetectionMetrics(auroc(ind, ood), fpr_at_tpr(ind, ood, 0.95), aupr_in(ind, ood))
