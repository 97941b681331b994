"""The result cache's value format: a prediction survives the round trip through JSON, its OOD
flag is re-derived from the served calibration, and anything unexpected reads as a miss."""

from __future__ import annotations

import json

import numpy as np

from nacguard.bundle import Prediction
from nacguard.nac import Calibration
from nacguard.store.codec import CACHE_VERSION, decode_prediction, encode_prediction

CLASSES = ["cat", "dog", "fox"]


def _prediction(score: float, threshold: float) -> Prediction:
    probs = [0.1, 0.7, 0.2]
    return Prediction(
        class_index=1,
        label="dog",
        confidence=0.7,
        nac_score=score,
        ood=score < threshold,
        threshold=threshold,
        msp=0.7,
        energy=-1.5,
        probabilities=probs,
        classes=CLASSES,
    )


def test_round_trip_through_json() -> None:
    cal = Calibration(tpr=0.95, threshold=0.5, scores=np.linspace(0.0, 1.0, 21))
    for score in (0.2, 0.8):
        p = _prediction(score, cal.threshold)
        value = json.loads(json.dumps(encode_prediction(p)))
        assert decode_prediction(value, CLASSES, cal.threshold, cal.is_ood) == p


def test_the_flag_follows_the_served_calibration() -> None:
    value = encode_prediction(_prediction(0.4, threshold=0.3))  # computed: not OOD at 0.3
    stricter = Calibration(tpr=0.99, threshold=0.45, scores=np.linspace(0.0, 1.0, 21))
    got = decode_prediction(value, CLASSES, stricter.threshold, stricter.is_ood)
    assert got is not None and got.ood and got.threshold == 0.45


def test_unexpected_values_are_misses() -> None:
    good = encode_prediction(_prediction(0.6, 0.5))
    is_ood = Calibration(tpr=0.95, threshold=0.5, scores=np.zeros(3)).is_ood
    assert decode_prediction(good, CLASSES, 0.5, is_ood) is not None
    for bad in (
        {**good, "v": CACHE_VERSION + 1},
        {k: v for k, v in good.items() if k != "nac_score"},
        {**good, "probabilities": [0.5, 0.5]},  # another model's class count
        {**good, "class_index": 7},
        {**good, "confidence": "high"},
    ):
        assert decode_prediction(bad, CLASSES, 0.5, is_ood) is None
