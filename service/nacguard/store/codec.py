"""The result cache's value format: a computed :class:`~nacguard.bundle.types.Prediction` as a
small JSON-able dict, and back.

The OOD flag and the threshold are not stored: they are re-derived from the served
calibration when a value is read, so a cached answer is flagged exactly as a computed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from nacguard.bundle.types import Prediction

__all__ = ["CACHE_VERSION", "decode_prediction", "encode_prediction"]

log = logging.getLogger("nacguard.store")

#: Bumped when the value format changes; other versions read as misses.
CACHE_VERSION = 1


def encode_prediction(p: Prediction) -> dict[str, Any]:
    """The cache value of a computed prediction."""
    return {
        "v": CACHE_VERSION,
        "class_index": p.class_index,
        "confidence": p.confidence,
        "nac_score": p.nac_score,
        "msp": p.msp,
        "energy": p.energy,
        "probabilities": p.probabilities,
    }


def decode_prediction(
    value: dict[str, Any],
    classes: Sequence[str],
    threshold: float,
    is_ood: Callable[[float], bool],
) -> Prediction | None:
    """Rebuild a cached prediction; ``None`` (a miss) for anything unexpected.

    Args:
        value: what the cache returned.
        classes: the served class labels.
        threshold: the served OOD threshold (reported with the prediction).
        is_ood: the served OOD decision (``Bundle.is_ood``).
    """
    try:
        if value.get("v") != CACHE_VERSION:
            return None
        index = int(value["class_index"])
        score = float(value["nac_score"])
        probabilities = [float(x) for x in value["probabilities"]]
        if len(probabilities) != len(classes):
            return None
        return Prediction(
            class_index=index,
            label=classes[index],
            confidence=float(value["confidence"]),
            nac_score=score,
            ood=is_ood(score),
            threshold=threshold,
            msp=float(value["msp"]),
            energy=float(value["energy"]),
            probabilities=probabilities,
            classes=classes,
        )
    except (KeyError, TypeError, ValueError, IndexError):
        log.warning("unreadable cache entry ignored")
        return None
