"""Bin edges of the state histogram."""

from __future__ import annotations

import math

import torch

__all__ = ["nac_edges", "uniform_edges"]


def nac_edges(m: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The authors' non-uniform edges (narrowest around 0.5), M of them.

    With h = M/2: ``left = log_1000(linspace(1, sqrt(1000), h))`` runs 0..0.5,
    ``right = reverse(1 - left)`` runs 0.5..1; edges = left[:-1] ++ right, the last edge raised
    by 0.01 so that a saturated state of exactly 1.0 is counted, then a final edge 1.2. The last
    interval [1.01, 1.2) is always empty; it is kept so bin indices match the reference.

    Args:
        m: number of edges, even and >= 4.
        device: where to put the tensor.

    Returns:
        float32 tensor of shape [m], strictly increasing.
    """
    if m < 4 or m % 2:
        raise ValueError("NAC edges need an even M >= 4")
    h = m // 2
    a = torch.linspace(1.0, math.sqrt(1000.0), h, dtype=torch.float64)
    left = torch.log(a) / math.log(1000.0)
    right = torch.flip(1.0 - left, dims=[0])
    edges = torch.cat([left[:-1], right])
    edges[-1] += 0.01
    edges = torch.cat([edges, torch.tensor([1.2], dtype=torch.float64)])
    return edges.to(dtype=torch.float32, device=device)


def uniform_edges(m: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform edges ``linspace(0, 1, M)`` (used by NAC-ME).

    A state of exactly 1.0 falls in no interval and is not counted, as in the reference.
    """
    if m < 2:
        raise ValueError("uniform edges need M >= 2")
    return torch.linspace(0.0, 1.0, m, dtype=torch.float32, device=device)
