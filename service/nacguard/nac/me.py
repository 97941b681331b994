"""NAC-ME: coverage on InD data as a model-robustness estimate (the paper's second use)."""

from __future__ import annotations

import torch

from nacguard.nac.coverage import coverage_table
from nacguard.nac.profile import NacProfile

__all__ = ["nac_me"]


def nac_me(profile: NacProfile) -> float:
    """``mean_n [ sum_k min(counts[k, n] / O, 1) / M ]``, averaged over the profile's layers.

    The profile must be built with uniform edges on correctly classified InD samples only
    (``ProfileBuilder(..., uniform=True, correct_only=True)``). Note the division by M (the
    number of edges), not by the M - 1 intervals, as in the reference.
    """
    values = []
    for layer in profile.layers:
        phi = coverage_table(layer.counts, layer.config.saturation)
        values.append((phi.sum(dim=0) / layer.config.n_edges).mean())
    return float(torch.stack(values).mean())
