"""A slow, literal transcription of the NAC method (shared/design/nac-method.md), for tests.

Written for clarity, not speed: numpy edges, one autograd call per layer with parameter gradients
left on, explicit loops for counting and lookup. The fast path in nacguard.nac must agree with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def literal_edges(m: int) -> np.ndarray:
    h = m // 2
    a = np.linspace(1.0, math.sqrt(1000.0), h)
    left = np.log(a) / np.log(1000.0)
    right = (1.0 - left)[::-1]
    edges = np.concatenate([left[:-1], right])
    edges[-1] += 0.01
    return np.append(edges, 1.2).astype(np.float32)


def literal_states(
    model: nn.Module, x: torch.Tensor, betas: dict[str, float]
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Logits and per-layer states [B, N], one gradient call per layer."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
        for name in betas
    ]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        xg = x.clone().requires_grad_(True)
        logits = model(xg)
        num_classes = logits.shape[1]
        log_p = torch.log_softmax(logits, dim=1)
        loss_per_sample = -log_p.sum(dim=1) / num_classes
        total = loss_per_sample.sum()
        states = {}
        for name, beta in betas.items():
            z = outputs[name]
            (g,) = torch.autograd.grad(total, z, retain_graph=True)
            z, g = z.detach(), g.detach()
            if z.dim() == 4:
                zs, gs = z.sum(dim=3).sum(dim=2), g.sum(dim=3).sum(dim=2)
            elif z.dim() == 3:  # ViT tokens [B, T, D]: summed over all tokens (method, sec. 6)
                zs, gs = z.sum(dim=1), g.sum(dim=1)
            else:
                zs, gs = z.reshape(z.shape[0], -1), g.reshape(g.shape[0], -1)
            states[name] = torch.sigmoid(beta * (zs * gs)).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), states


def literal_counts(states: np.ndarray, edges: np.ndarray) -> np.ndarray:
    b, n = states.shape
    counts = np.zeros((len(edges) - 1, n), dtype=np.int64)
    for i in range(b):
        for j in range(n):
            v = states[i, j]
            for k in range(len(edges) - 1):
                if edges[k] <= v < edges[k + 1]:
                    counts[k, j] += 1
                    break
    return counts


def literal_layer_score(states: np.ndarray, edges: np.ndarray, counts: np.ndarray, o: float):
    b, n = states.shape
    scores = np.zeros(b, dtype=np.float64)
    for i in range(b):
        total = 0.0
        for j in range(n):
            v = states[i, j]
            for k in range(len(edges) - 1):
                if edges[k] <= v < edges[k + 1]:
                    total += min(counts[k, j] / o, 1.0)
                    break
        scores[i] = total / n
    return scores
