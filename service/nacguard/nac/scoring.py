"""NAC-UE scoring of batches: the per-request computation of the service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nacguard.nac.baselines import energy, msp
from nacguard.nac.coverage import layer_scores, padded_table
from nacguard.nac.profile import NacProfile
from nacguard.nac.states import ForwardStates, StateExtractor

log = logging.getLogger(__name__)

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

    Under autocast a batch whose logits or states are not finite (an fp16 overflow) is scored
    again in fp32, with one warning per scorer, so an overflow never yields garbage scores.

    Args:
        model: the classifier (eval mode, on ``device``).
        profile: the fitted profile.
        device: the device the model lives on; tables are moved there once.
        autocast_dtype: optional autocast dtype for the forward (states stay fp32).
        states_fn: optional replacement for the state computation (e.g. a compiled one); it
            must compute what ``self.extractor`` computes. Default: the extractor itself.
    """

    def __init__(
        self,
        model: nn.Module,
        profile: NacProfile,
        *,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        states_fn: Callable[[torch.Tensor], ForwardStates] | None = None,
    ) -> None:
        self.profile = profile.to(device)
        self.model = model
        self.betas = {lp.name: lp.config.beta for lp in profile.layers}
        self.extractor = StateExtractor(model, self.betas, autocast_dtype=autocast_dtype)
        self.states_fn: Callable[[torch.Tensor], ForwardStates] = states_fn or self.extractor
        self._fp32: StateExtractor | None = None
        self._warned_overflow = False
        #: per layer (name, edges, padded coverage table), in profile order
        self.tables = [
            (lp.name, lp.edges, padded_table(lp.coverage())) for lp in self.profile.layers
        ]

    def _states(self, x: torch.Tensor) -> ForwardStates:
        result = self.states_fn(x)
        if self.extractor.autocast_dtype is None:
            return result
        checks = [torch.isfinite(result.logits).all()]
        checks += [torch.isfinite(s).all() for s in result.states.values()]
        if bool(torch.stack(checks).all()):
            return result
        if not self._warned_overflow:
            self._warned_overflow = True
            log.warning(
                "non-finite logits or NAC states under %s autocast (overflow); scoring such "
                "batches in fp32",
                self.extractor.autocast_dtype,
            )
        if self._fp32 is None:
            self._fp32 = StateExtractor(self.model, self.betas)
        return self._fp32(x)

    def __call__(self, x: torch.Tensor) -> ScoreBatch:
        """Score a preprocessed batch ``x`` already on the device."""
        return self.score_states(self.states(x))

    def states(self, x: torch.Tensor) -> ForwardStates:
        """One forward of ``x`` (on the device): logits and the monitored layers' states."""
        return self._states(x)

    def score_states(self, result: ForwardStates) -> ScoreBatch:
        """Score states computed by a forward (this scorer's, or another scorer's on the same
        model with the same monitored layers and betas): the coverage-table lookups only."""
        with torch.inference_mode():
            per_layer = torch.stack(
                [
                    layer_scores(result.states[name], edges, table)
                    for name, edges, table in self.tables
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
