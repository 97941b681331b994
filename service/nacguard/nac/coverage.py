"""Histogram counts, coverage tables and the per-layer NAC-UE lookup.

Bins are located with one ``torch.bucketize`` per layer instead of the reference's
B x (M-1) x N comparison tensor; counts are built with ``bincount`` and lookups with ``gather``.
All three agree exactly with the literal definition (same half-open intervals).
"""

from __future__ import annotations

import torch

__all__ = ["bin_positions", "count_states", "coverage_table", "layer_scores", "padded_table"]


def bin_positions(states: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Position of each state among the edges: ``i`` such that ``edges[i-1] <= s < edges[i]``.

    Position ``i`` in 1..M-1 means interval ``k = i - 1`` ([e_k, e_k+1)); 0 (below the first edge)
    and M (at or above the last edge, NaN included) mean "in no interval".

    Args:
        states: [B, N] states in [0, 1].
        edges: [M] increasing edges.

    Returns:
        int64 tensor [B, N] with values in 0..M.
    """
    return torch.bucketize(states.contiguous(), edges, right=True)


def count_states(states: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Histogram of states per neuron.

    Args:
        states: [B, N] states.
        edges: [M] edges.

    Returns:
        int64 counts [M-1, N]; states in no interval are not counted. Counts of two batches add.
    """
    m = edges.numel()
    n = states.shape[1]
    pos = bin_positions(states, edges)
    flat = pos * n + torch.arange(n, device=states.device)
    counts = torch.bincount(flat.reshape(-1), minlength=(m + 1) * n).view(m + 1, n)
    return counts[1:m].clone()


def coverage_table(counts: torch.Tensor, saturation: float) -> torch.Tensor:
    """``phi[k, n] = min(counts[k, n] / O, 1)`` as float32."""
    return torch.clamp(counts.to(torch.float32) / saturation, max=1.0)


def padded_table(phi: torch.Tensor) -> torch.Tensor:
    """Coverage table with a zero row before and after, indexed directly by bin positions."""
    zero = torch.zeros(1, phi.shape[1], dtype=phi.dtype, device=phi.device)
    return torch.cat([zero, phi, zero]).contiguous()


def layer_scores(states: torch.Tensor, edges: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-sample NAC-UE of one layer: the mean over neurons of the looked-up coverage.

    Args:
        states: [B, N] states.
        edges: [M] edges.
        table: [M+1, N] padded coverage table (see ``padded_table``).

    Returns:
        float32 [B].
    """
    pos = bin_positions(states, edges)
    return torch.gather(table, 0, pos).mean(dim=1)
