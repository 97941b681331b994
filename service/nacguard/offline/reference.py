"""The reference-style computation, kept as the baseline our benchmarks compare against.

It computes the same numbers as :class:`~nacguard.nac.scoring.NacScorer` the way the authors'
code does: one forward pass keeping the whole graph (parameter gradients included when the
parameters require grad), one ``autograd.grad`` call per monitored layer, and a lookup through a
B x (M-1) x N interval-membership tensor. Not used by the service.
"""

from __future__ import annotations

import torch
from torch import nn

from nacguard.nac.profile import NacProfile
from nacguard.nac.states import pool_states, resolve_modules, uniform_loss

__all__ = ["reference_scores"]


def reference_scores(model: nn.Module, profile: NacProfile, x: torch.Tensor) -> torch.Tensor:
    """NAC-UE scores [B] computed reference-style (slow; for benchmarks)."""
    modules = resolve_modules(model, [lp.name for lp in profile.layers])
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            if not out.requires_grad:
                out.requires_grad_(True)
            outputs[name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = model(x)
            loss = uniform_loss(logits).sum()
            per_layer = []
            for lp in profile.layers:
                z = outputs[lp.name]
                (g,) = torch.autograd.grad(loss, z, retain_graph=True)
                states = pool_states(z.detach(), g, lp.config.beta)
                lo = lp.edges[:-1].to(states.device).view(1, -1, 1)
                hi = lp.edges[1:].to(states.device).view(1, -1, 1)
                member = (states.unsqueeze(1) >= lo) & (states.unsqueeze(1) < hi)
                phi = lp.coverage().to(states.device).unsqueeze(0)
                per_layer.append((member * phi).sum(dim=1).mean(dim=1))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(per_layer, dim=1).mean(dim=1).detach()
