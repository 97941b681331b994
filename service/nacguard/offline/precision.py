"""Precision fidelity: how far mixed-precision NAC scores are from fp32 ones on the same
inputs (the check behind the ``precision`` setting's documented cost)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nacguard.nac.detection import auroc
from nacguard.nac.profile import NacProfile
from nacguard.nac.scoring import NacScorer

__all__ = ["FidelityReport", "compare_precision"]


@dataclass(frozen=True)
class FidelityReport:
    """How far mixed-precision NAC scores are from fp32 ones on the same inputs.

    Attributes:
        precision: the autocast dtype's name.
        correlation: Pearson correlation of all scores (InD and OOD together).
        max_abs_diff, mean_abs_diff: score differences.
        auroc_fp32, auroc_mixed: InD-vs-OOD AUROC per OOD set.
    """

    precision: str
    correlation: float
    max_abs_diff: float
    mean_abs_diff: float
    auroc_fp32: dict[str, float]
    auroc_mixed: dict[str, float]

    @property
    def max_auroc_delta(self) -> float:
        """Largest absolute AUROC change over the OOD sets."""
        return max(
            (abs(self.auroc_mixed[k] - self.auroc_fp32[k]) for k in self.auroc_fp32), default=0.0
        )

    def faithful(self, min_correlation: float = 0.999, max_auroc_delta: float = 0.005) -> bool:
        """The acceptance rule: correlation above, AUROC change below the bounds."""
        return self.correlation > min_correlation and self.max_auroc_delta <= max_auroc_delta

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "precision": self.precision,
            "correlation": self.correlation,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "max_auroc_delta": self.max_auroc_delta,
            "auroc_fp32": self.auroc_fp32,
            "auroc_mixed": self.auroc_mixed,
        }


def _scores(
    scorer: NacScorer, x: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    parts = [scorer(b.to(device)).nac.cpu() for b in x.split(batch_size)]
    return torch.cat(parts).numpy().astype(np.float64)


def compare_precision(
    model: nn.Module,
    profile: NacProfile,
    ind: torch.Tensor,
    oods: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    batch_size: int = 256,
) -> FidelityReport:
    """Score the same inputs in fp32 and under ``dtype`` autocast and compare.

    Args:
        model: the classifier (eval mode, on its device).
        profile: the fitted profile.
        ind: preprocessed held-out InD inputs [N, C, H, W] (never the counted images).
        oods: name -> preprocessed OOD inputs.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        batch_size: scoring batch size.
    """
    device = next(iter(model.parameters())).device
    ref = NacScorer(model, profile, device=device)
    mixed = NacScorer(model, profile, device=device, autocast_dtype=dtype)
    a_ind, b_ind = _scores(ref, ind, batch_size, device), _scores(mixed, ind, batch_size, device)
    a_all, b_all = [a_ind], [b_ind]
    auroc_a, auroc_b = {}, {}
    for name, x in oods.items():
        a, b = _scores(ref, x, batch_size, device), _scores(mixed, x, batch_size, device)
        a_all.append(a)
        b_all.append(b)
        auroc_a[name], auroc_b[name] = auroc(a_ind, a), auroc(b_ind, b)
    a_cat, b_cat = np.concatenate(a_all), np.concatenate(b_all)
    diff = np.abs(a_cat - b_cat)
    corr = float(np.corrcoef(a_cat, b_cat)[0, 1]) if a_cat.std() > 0 and b_cat.std() > 0 else 1.0
    return FidelityReport(
        precision=str(dtype).removeprefix("torch."),
        correlation=corr if math.isfinite(corr) else 0.0,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        auroc_fp32=auroc_a,
        auroc_mixed=auroc_b,
    )
