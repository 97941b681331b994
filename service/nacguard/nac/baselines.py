"""Baseline OOD scores from the same logits (higher = more in-distribution)."""

from __future__ import annotations

import torch

__all__ = ["energy", "msp"]


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability, [B] float32."""
    return torch.softmax(logits.float(), dim=1).amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)``, [B] float32."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)
