"""Threshold calibration on held-out InD scores, and the OOD decision it defines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nacguard.nac.decision import Decision, OodRule

__all__ = ["Calibration", "class_thresholds", "threshold_at_tpr"]


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
    """The OOD threshold, the InD score distributions it was fitted on, and the decision.

    The one owner of the OOD flag: :meth:`decide` (and :meth:`is_ood`), through the
    :class:`~nacguard.nac.decision.OodRule` these fields define (built once, on creation).

    Attributes:
        tpr: target share of InD inputs that pass (score >= threshold).
        threshold: inputs scoring below it are flagged OOD (the TPR threshold).
        scores: sorted held-out InD scores (never the images that were counted).
        source: where the held-out images came from.
        msp, energy: sorted MSP / energy scores of the same images; None in bundles built
            before they were stored (then no baseline p-values and no fused detector).
        fused: sorted Fisher statistics of the same images
            (:func:`~nacguard.nac.conformal.fused_calibration`), or None.
        class_thresholds: per-class calibration: a threshold per predicted class, NaN where
            the class uses the global one; None for global calibration.
        class_samples: calibration images per predicted class (with ``class_thresholds``).
        alpha: flag at ``p < alpha`` instead of the TPR threshold (None: the threshold).
        detector: "nac" or "fused": whose p-value decides.
    """

    tpr: float
    threshold: float
    scores: np.ndarray
    source: str = ""
    msp: np.ndarray | None = field(default=None, repr=False)
    energy: np.ndarray | None = field(default=None, repr=False)
    fused: np.ndarray | None = field(default=None, repr=False)
    class_thresholds: tuple[float, ...] | None = None
    class_samples: tuple[int, ...] | None = None
    alpha: float | None = None
    detector: str = "nac"
    _rule: OodRule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rule = OodRule(
            self.scores,
            self.threshold,
            alpha=self.alpha,
            detector=self.detector,
            msp=self.msp,
            energy=self.energy,
            fused=self.fused,
            class_thresholds=self.class_thresholds,
        )
        object.__setattr__(self, "_rule", rule)

    @property
    def rule(self) -> OodRule:
        """The decision rule these scores and settings define."""
        return self._rule

    @property
    def decision_threshold(self) -> float:
        """The NAC threshold that flags (the alpha-equivalent one under ``alpha``; NaN under
        the fused detector)."""
        return self._rule.threshold if self.detector == "nac" else math.nan

    def decide(self, nac: float, msp: float, energy: float, class_index: int = -1) -> Decision:
        """p-values and OOD flag of one image (a NaN score, as with scoring off, is never
        flagged)."""
        return self._rule.decide(nac, msp, energy, class_index)

    def is_ood(self, score: float, class_index: int = -1) -> bool:
        """Whether an input with NAC ``score`` (predicted as ``class_index``) is flagged OOD by
        the NAC detector."""
        return bool(score < self._rule.threshold_for(class_index))

    @property
    def expected_ood_rate(self) -> float:
        """Share of InD inputs flagged OOD, as measured on the calibration scores (alpha,
        under the fused detector)."""
        if self.detector == "fused":
            return float(self._rule.alpha or 0.0)
        return float(np.mean(self.scores < self._rule.threshold))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: threshold, TPR, sample count, score quantiles, decision mode."""
        qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
        out: dict[str, Any] = {
            "tpr": self.tpr,
            "threshold": self.threshold,
            "samples": int(self.scores.size),
            "expected_ood_rate": self.expected_ood_rate,
            "source": self.source,
            "score_quantiles": {str(q): float(np.quantile(self.scores, q)) for q in qs},
            "alpha": self.alpha,
            "detector": self.detector,
            "baseline_p_values": self.msp is not None and self.energy is not None,
            "mode": "per-class" if self.class_thresholds else "global",
        }
        if self.class_thresholds:
            out["class_thresholds"] = [None if t != t else t for t in self.class_thresholds]
            out["class_samples"] = list(self.class_samples or ())
        return out


def class_thresholds(
    scores: np.ndarray,
    predicted: np.ndarray,
    n_classes: int,
    tpr: float = 0.95,
    min_samples: int = 200,
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """One TPR threshold per predicted class, where enough held-out images predict it.

    A class predicted for fewer than ``min_samples`` held-out images gets NaN (meaning: use the
    global threshold): a 95% quantile of a few dozen scores moves too much from one sample to
    the next to be worth a class of its own.

    Returns:
        (thresholds, samples) per class index.
    """
    s = np.asarray(scores, dtype=np.float64)
    pred = np.asarray(predicted)
    thresholds, counts = [], []
    for c in range(n_classes):
        mine = s[pred == c]
        counts.append(int(mine.size))
        thresholds.append(threshold_at_tpr(mine, tpr) if mine.size >= min_samples else math.nan)
    return tuple(thresholds), tuple(counts)
