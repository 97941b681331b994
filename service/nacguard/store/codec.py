"""The result cache's value format: a computed :class:`~nacguard.bundle.types.Prediction` as a
small JSON-able dict, and back.

The class, the p-values, the OOD flag and the threshold are not stored: they are re-derived by
the served bundle when a value is read, so a cached answer is flagged exactly as a computed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from nacguard.bundle.types import Prediction

__all__ = ["CACHE_VERSION", "decode_prediction", "encode_prediction"]

log = logging.getLogger("nacguard.store")

#: Bumped when the value format changes; other versions read as misses (2: per-layer scores).
CACHE_VERSION = 2

#: Rebuilds a prediction from its computed numbers (``Bundle.prediction``): probabilities, NAC,
#: MSP, energy, per-layer scores. The class, p-values and OOD flag are derived there.
Rebuild = Callable[[list[float], float, float, float, Sequence[float]], Prediction]


def encode_prediction(p: Prediction) -> dict[str, Any]:
    """The cache value of a computed prediction."""
    return {
        "v": CACHE_VERSION,
        "nac_score": p.nac_score,
        "msp": p.msp,
        "energy": p.energy,
        "probabilities": p.probabilities,
        "layers": list(p.layer_scores),
    }


def decode_prediction(value: dict[str, Any], n_classes: int, rebuild: Rebuild) -> Prediction | None:
    """Rebuild a cached prediction; ``None`` (a miss) for anything unexpected.

    Args:
        value: what the cache returned.
        n_classes: the served model's class count.
        rebuild: the served bundle's :meth:`~nacguard.bundle.Bundle.prediction`, so the class,
            p-values, threshold and flag are those of a fresh computation.
    """
    try:
        if value.get("v") != CACHE_VERSION:
            return None
        probabilities = [float(x) for x in value["probabilities"]]
        if len(probabilities) != n_classes:
            return None
        return rebuild(
            probabilities,
            float(value["nac_score"]),
            float(value["msp"]),
            float(value["energy"]),
            [float(x) for x in value["layers"]],
        )
    except (KeyError, TypeError, ValueError, IndexError):
        log.warning("unreadable cache entry ignored")
        return None
