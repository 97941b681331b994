"""NAC-UE scoring of batches: the per-request computation of the service."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nacguard.nac.baselines import energy, msp
from nacguard.nac.coverage import layer_scores, padded_table
from nacguard.nac.profile import NacProfile
from nacguard.nac.states import StateExtractor

__all__ = ["NacScorer", "ScoreBatch"]


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of one batch, all float32 on the model's device.

    Attributes:
        logits: [B, C].
        probs: softmax of the logits, [B, C].
        nac: NAC-UE score, [B] (higher = more in-distribution).
        layer_nac: per-layer NAC-UE, [B, L] in profile order.
        msp: maximum softmax probability, [B].
        energy: negative free energy (logsumexp of logits), [B].
    """

    logits: torch.Tensor
    probs: torch.Tensor
    nac: torch.Tensor
    layer_nac: torch.Tensor
    msp: torch.Tensor
    energy: torch.Tensor


class NacScorer:
    """Scores batches against a fitted profile.

    Args:
        model: the classifier (eval mode, on ``device``).
        profile: the fitted profile.
        device: the device the model lives on; tables are moved there once.
        autocast_dtype: optional autocast dtype for the forward (states stay fp32).
    """

    def __init__(
        self,
        model: nn.Module,
        profile: NacProfile,
        *,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.profile = profile.to(device)
        self.extractor = StateExtractor(
            model, {lp.name: lp.config.beta for lp in profile.layers}, autocast_dtype=autocast_dtype
        )
        self._tables = [
            (lp.name, lp.edges, padded_table(lp.coverage())) for lp in self.profile.layers
        ]

    def __call__(self, x: torch.Tensor) -> ScoreBatch:
        """Score a preprocessed batch ``x`` already on the device."""
        result = self.extractor(x)
        with torch.inference_mode():
            per_layer = torch.stack(
                [
                    layer_scores(result.states[name], edges, table)
                    for name, edges, table in self._tables
                ],
                dim=1,
            )
            logits = result.logits.float()
            return ScoreBatch(
                logits=logits,
                probs=torch.softmax(logits, dim=1),
                nac=per_layer.mean(dim=1),
                layer_nac=per_layer,
                msp=msp(logits),
                energy=energy(logits),
            )
