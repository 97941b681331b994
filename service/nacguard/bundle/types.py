"""What a bundle answers: one :class:`Prediction` per image, and a :class:`WarmupReport`.

The calibration (threshold and OOD decision) is :class:`nacguard.nac.calibration.Calibration`.
The wire shape of a prediction belongs to the adapters (``api/schemas.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nacguard.nac.explain import UncoveredNeuron, least_covered_layer

__all__ = ["Prediction", "WarmupReport"]


@dataclass(frozen=True)
class Prediction:
    """One image's answer: class, confidence, NAC score, p-value and OOD flag (plus baselines).

    ``p_value`` is the deciding detector's conformal p-value (NaN when not scored or without
    calibration); ``p_values`` holds every detector's. ``layer_scores`` are the per-layer NAC
    scores in profile order (their mean is ``nac_score``), ``layer_names`` their layers;
    ``uncovered`` the least covered neurons when asked for (:meth:`Bundle.explain_batch`).
    """

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
    p_value: float = math.nan
    p_values: dict[str, float] = field(default_factory=dict, repr=False)
    layer_scores: tuple[float, ...] = field(default=(), repr=False)
    layer_names: Sequence[str] = field(default=(), repr=False, compare=False)
    uncovered: tuple[UncoveredNeuron, ...] = field(default=(), repr=False)

    def top_k(self, k: int) -> list[tuple[str, float]]:
        """The k most probable classes, most probable first."""
        p = self.probabilities
        # The order of a stable argsort of -p (ties keep class order, NaN last), in plain Python:
        # for a handful of classes numpy's array round trip costs more than the sort.
        order = sorted(range(len(p)), key=lambda i: (p[i] != p[i], -p[i]))[:k]
        return [(self.classes[i], float(p[i])) for i in order]

    @property
    def layers(self) -> dict[str, float]:
        """Per-layer NAC scores by layer name (empty when not scored)."""
        return dict(zip(self.layer_names, self.layer_scores, strict=False))

    @property
    def least_covered_layer(self) -> str | None:
        """The layer with the lowest per-layer score."""
        if not self.layer_scores or self.layer_scores[0] != self.layer_scores[0]:
            return None
        return least_covered_layer(self.layer_names, self.layer_scores)

    def to_dict(self, top_k: int = 0, explain: bool = False) -> dict[str, Any]:
        """JSON-able form (the API's prediction object); ``explain`` adds ``layers``,
        ``least_covered_layer``, ``p_values`` and, when computed, ``uncovered_neurons``."""
        p = self.p_value
        out = {
            "label": self.label,
            "class_index": self.class_index,
            "confidence": self.confidence,
            "nac_score": self.nac_score,
            "p_value": None if p != p else p,
            "ood": self.ood,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "top_k": [{"label": lab, "confidence": c} for lab, c in self.top_k(top_k)],
        }
        if explain:
            scored = self.nac_score == self.nac_score  # NaN (scoring off) is not JSON
            out["layers"] = (self.layers or None) if scored else None
            out["least_covered_layer"] = self.least_covered_layer
            out["p_values"] = {k: v for k, v in self.p_values.items() if v == v} or None
            if self.uncovered:
                out["uncovered_neurons"] = [n.to_dict() for n in self.uncovered]
        return out


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
