"""What a bundle answers: one :class:`Prediction` per image, and a :class:`WarmupReport`.

The calibration (threshold and OOD decision) is :class:`nacguard.nac.calibration.Calibration`.
The wire shape of a prediction belongs to the adapters (``api/schemas.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Prediction", "WarmupReport"]


@dataclass(frozen=True)
class Prediction:
    """One image's answer: class, confidence, NAC score and OOD flag (plus baselines)."""

    class_index: int
    label: str
    confidence: float
    nac_score: float
    ood: bool
    threshold: float
    msp: float
    energy: float
    probabilities: list[float] = field(repr=False)
    classes: Sequence[str] = field(repr=False, compare=False)

    def top_k(self, k: int) -> list[tuple[str, float]]:
        """The k most probable classes, most probable first."""
        p = self.probabilities
        # The order of a stable argsort of -p (ties keep class order, NaN last), in plain Python:
        # for a handful of classes numpy's array round trip costs more than the sort.
        order = sorted(range(len(p)), key=lambda i: (p[i] != p[i], -p[i]))[:k]
        return [(self.classes[i], float(p[i])) for i in order]

    def to_dict(self, top_k: int = 0) -> dict[str, Any]:
        """JSON-able form (the API's prediction object)."""
        return {
            "label": self.label,
            "class_index": self.class_index,
            "confidence": self.confidence,
            "nac_score": self.nac_score,
            "ood": self.ood,
            "threshold": self.threshold,
            "top_k": [{"label": lab, "confidence": c} for lab, c in self.top_k(top_k)],
        }


@dataclass(frozen=True)
class WarmupReport:
    """What :meth:`Bundle.warmup` ran.

    Attributes:
        sizes: batch sizes run (each bucket in use, smallest first).
        seconds: wall time of the whole warm-up.
        compiled: whether every compiled path still runs compiled afterwards (False also when
            compilation is off).
    """

    sizes: tuple[int, ...]
    seconds: float
    compiled: bool
