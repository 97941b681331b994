"""The OOD decision for one image: its p-values and its flag, from the calibration scores.

One owner of the rule. An image is flagged when

* ``alpha`` is None (the default): its NAC score is below the TPR-calibrated threshold (the
  threshold of its predicted class under per-class calibration, where there is one);
* ``alpha`` is set: its p-value is below alpha. For the NAC detector that is the same as a score
  threshold (:func:`~nacguard.nac.conformal.threshold_for_alpha`), so ``threshold`` then holds
  that equivalent; for the fused detector the p-value itself decides.

No I/O; the per-image path is plain Python (``bisect`` on lists), cheaper than numpy for one
image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nacguard.nac.conformal import p_value, threshold_for_alpha

__all__ = ["DETECTORS", "Decision", "OodRule"]

#: Detectors a decision can rest on: NAC alone, or the calibrated Fisher fusion of NAC, MSP and
#: energy p-values.
DETECTORS = ("nac", "fused")


@dataclass(frozen=True)
class Decision:
    """One image's verdict.

    Attributes:
        ood: flagged.
        threshold: the NAC threshold that applied (NaN under the fused detector).
        p_value: the deciding detector's p-value (NaN when scores are missing).
        p_values: every available detector's p-value (``nac``, ``msp``, ``energy``, ``fused``).
    """

    ood: bool
    threshold: float
    p_value: float
    p_values: dict[str, float]


class OodRule:
    """Turns scores into p-values and an OOD flag.

    Args:
        nac: sorted NAC calibration scores.
        threshold: the TPR-calibrated NAC threshold.
        alpha: flag at ``p < alpha`` instead of the threshold (None = threshold).
        detector: "nac" or "fused" (needs ``msp``, ``energy`` and ``fused``; alpha defaults to
            the threshold's share of flagged calibration images).
        msp, energy: sorted MSP / energy calibration scores (same images), or None.
        fused: sorted Fisher statistics of the calibration images, or None.
        class_thresholds: per predicted class a threshold, NaN where the class falls back to the
            global one (used without alpha only).
    """

    def __init__(
        self,
        nac: np.ndarray,
        threshold: float,
        *,
        alpha: float | None = None,
        detector: str = "nac",
        msp: np.ndarray | None = None,
        energy: np.ndarray | None = None,
        fused: np.ndarray | None = None,
        class_thresholds: Sequence[float] | None = None,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; use one of {list(DETECTORS)}")
        baselines = msp is not None and energy is not None
        if detector == "fused" and not (baselines and fused is not None):
            raise ValueError(
                "the fused detector needs MSP and energy calibration scores in the bundle; "
                "rebuild the profile with this version"
            )
        self._nac = [float(v) for v in nac]
        self._msp = [float(v) for v in msp] if baselines and msp is not None else None
        self._energy = [float(v) for v in energy] if baselines and energy is not None else None
        self._fused = [float(v) for v in fused] if fused is not None and baselines else None
        self.detector = detector
        self.alpha = alpha
        if detector == "fused" and alpha is None:
            alpha = float(np.mean(np.asarray(nac) < threshold)) or 0.05
            self.alpha = alpha
        self.threshold = (
            threshold_for_alpha(np.asarray(nac), alpha)
            if alpha is not None and detector == "nac"
            else float(threshold)
        )
        self._class = (
            None
            if alpha is not None or not class_thresholds
            else [float(t) if t == t else self.threshold for t in class_thresholds]
        )

    @property
    def has_baselines(self) -> bool:
        """Whether MSP and energy p-values are available."""
        return self._msp is not None

    def threshold_for(self, class_index: int) -> float:
        """The NAC threshold that applies to an image predicted as ``class_index``."""
        if self._class is not None and 0 <= class_index < len(self._class):
            return self._class[class_index]
        return self.threshold

    def decide(self, nac: float, msp: float, energy: float, class_index: int) -> Decision:
        """p-values and flag of one image from its three scores and predicted class."""
        p_nac = p_value(self._nac, nac)
        ps = {"nac": p_nac}
        if self._msp is not None and self._energy is not None:
            ps["msp"] = p_value(self._msp, msp)
            ps["energy"] = p_value(self._energy, energy)
            if self._fused is not None:
                stat = math.log(p_nac) + math.log(ps["msp"]) + math.log(ps["energy"])
                ps["fused"] = p_value(self._fused, stat)
        if self.detector == "fused":
            p = ps["fused"]
            assert self.alpha is not None
            return Decision(bool(p < self.alpha), math.nan, p, ps)
        threshold = self.threshold_for(class_index)
        return Decision(bool(nac < threshold), threshold, p_nac, ps)
