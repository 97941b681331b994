"""Scoring a batch against two profiles of one model from a single forward pass.

A shadow profile (the model repository's ``role="shadow"``) built on the same weights as the
primary, monitoring the same layers with the same betas, needs no forward of its own: the
primary's forward yields the layer states once, and each profile looks them up in its own
coverage tables (:meth:`~nacguard.nac.NacScorer.score_states`). The primary's numbers are
computed exactly as :meth:`Bundle.predict_batch` computes them.
"""

from __future__ import annotations

import torch

from nacguard.accel import plan_chunks
from nacguard.bundle.runtime import Bundle
from nacguard.bundle.types import Prediction

__all__ = ["predict_pair", "shares_states"]


def shares_states(primary: Bundle, shadow: Bundle) -> bool:
    """Whether ``shadow`` can score ``primary``'s layer states: the same model object (equal
    weights share one module), the same monitored layers and betas, the same input."""
    return (
        shadow.model is primary.model
        and primary.scorer.betas == shadow.scorer.betas
        and primary.preprocess.to_dict() == shadow.preprocess.to_dict()
        and primary.device == shadow.device
    )


def predict_pair(
    primary: Bundle, shadow: Bundle, x: torch.Tensor
) -> tuple[list[Prediction], list[Prediction]]:
    """The primary's and the shadow's predictions of a preprocessed batch, from one forward.

    Call only when :func:`shares_states` holds. Batch buckets pad and cut as the primary's
    :meth:`~Bundle.predict_batch` does; both tables cross to the host in one copy.
    """
    parts = []
    width = 0
    for chunk in plan_chunks(int(x.shape[0]), primary.batch_buckets):
        xs = primary._input(x[chunk.start : chunk.stop], chunk.size)
        states = primary.scorer.states(xs)
        ours = primary.result_table(primary.scorer.score_states(states))
        theirs = shadow.result_table(shadow.scorer.score_states(states))
        width = int(ours.shape[1])
        with torch.inference_mode():
            parts.append(torch.cat([ours, theirs], dim=1)[: chunk.rows])
    if not parts:
        return [], []
    rows = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu().tolist()
    return (
        primary.predictions([row[:width] for row in rows]),
        shadow.predictions([row[width:] for row in rows]),
    )
