"""Explanations of one NAC score: per-layer scores and the least covered neurons.

The NAC-UE score is the plain mean of the per-layer scores (:mod:`nacguard.nac.scoring`), so the
per-layer scores are the score's exact decomposition; the layer with the lowest one saw the
least familiar activations. Below a layer, each neuron's looked-up coverage ``phi[bin, n]`` says
how often InD images put that neuron's state in the same bin (0 = never, or outside every bin).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nacguard.nac.coverage import bin_positions

__all__ = ["UncoveredNeuron", "least_covered_layer", "uncovered_neurons"]


@dataclass(frozen=True)
class UncoveredNeuron:
    """A neuron whose state fell in a rarely (or never) covered bin.

    Attributes:
        layer: the monitored layer's name.
        index: the neuron (channel) index in that layer.
        bin: the interval ``k`` its state fell in (``[e_k, e_k+1)``), or -1 for none.
        coverage: ``phi[bin, index]`` in [0, 1] (0 outside every interval).
    """

    layer: str
    index: int
    bin: int
    coverage: float

    def to_dict(self) -> dict[str, str | int | float]:
        """JSON-able form."""
        return {
            "layer": self.layer,
            "index": self.index,
            "bin": self.bin,
            "coverage": self.coverage,
        }


def least_covered_layer(names: Sequence[str], scores: Sequence[float]) -> str:
    """The layer with the lowest per-layer score (the first one on ties)."""
    if not names:
        raise ValueError("no layers")
    return names[min(range(len(names)), key=lambda i: scores[i])]


def uncovered_neurons(
    states: dict[str, torch.Tensor],
    tables: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    top: int,
) -> list[list[UncoveredNeuron]]:
    """The ``top`` least covered neurons of every image of a batch, least covered first.

    Args:
        states: per layer name, the states [B, N].
        tables: per layer, (name, edges [M], padded coverage table [M+1, N]) in profile order
            (what :class:`~nacguard.nac.scoring.NacScorer` holds).
        top: how many neurons per image (over all layers).

    Returns:
        One list per image. Ties in coverage keep profile order, then neuron order.
    """
    covs, bins, owners, index = [], [], [], []
    for li, (name, edges, table) in enumerate(tables):
        pos = bin_positions(states[name], edges)
        covs.append(torch.gather(table, 0, pos))
        inside = (pos > 0) & (pos < edges.numel())
        bins.append(torch.where(inside, pos - 1, torch.full_like(pos, -1)))
        n = pos.shape[1]
        owners.append(torch.full((n,), li, dtype=torch.int64))
        index.append(torch.arange(n))
    cov = torch.cat(covs, dim=1).float().cpu()
    bin_ = torch.cat(bins, dim=1).cpu()
    owner = torch.cat(owners)
    idx = torch.cat(index)
    k = min(top, cov.shape[1])
    order = torch.sort(cov, dim=1, stable=True).indices[:, :k]
    names = [t[0] for t in tables]
    out = []
    for row in range(cov.shape[0]):
        picks = order[row].tolist()
        out.append(
            [
                UncoveredNeuron(
                    layer=names[int(owner[j])],
                    index=int(idx[j]),
                    bin=int(bin_[row, j]),
                    coverage=float(cov[row, j]),
                )
                for j in picks
            ]
        )
    return out
