"""The result cache's value format: a prediction survives the round trip through JSON, its class,
p-values and OOD flag are re-derived by the served bundle, and anything unexpected is a miss."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

from nacguard.bundle import load_bundle
from nacguard.imaging.preprocess import PRESETS
from nacguard.store.codec import CACHE_VERSION, decode_prediction, encode_prediction


def _batch(n: int) -> torch.Tensor:
    """Half images like the tiny bundle's InD (blobs), half noise."""
    from tests.fixtures.bundles import encoded_images

    data = encoded_images(n - n // 2, seed=70) + encoded_images(n // 2, kind="uniform", seed=71)
    return torch.stack(
        [PRESETS["fashion-mnist"].batch([Image.open(io.BytesIO(d))])[0] for d in data]
    )


def test_round_trip_through_json(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    for p in bundle.predict_batch(_batch(6)):
        value = json.loads(json.dumps(encode_prediction(p)))
        assert decode_prediction(value, len(bundle.classes), bundle.prediction) == p


def test_the_flag_follows_the_served_calibration(tiny_bundle: Path) -> None:
    computed = load_bundle(tiny_bundle).predict_batch(_batch(16))
    strict = load_bundle(tiny_bundle, ood_alpha=0.5)  # flags half of InD
    got = [
        decode_prediction(encode_prediction(p), len(strict.classes), strict.prediction)
        for p in computed
    ]
    assert all(g is not None for g in got)
    assert [g.ood for g in got if g] == [p.p_value < 0.5 for p in computed]
    assert {g.threshold for g in got if g} == {strict.threshold}
    assert [g.ood for g in got if g] != [p.ood for p in computed]  # the setting mattered


def test_unexpected_values_are_misses(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    (p,) = bundle.predict_batch(_batch(1))
    good = encode_prediction(p)
    n = len(bundle.classes)
    assert decode_prediction(good, n, bundle.prediction) is not None
    for bad in (
        {**good, "v": CACHE_VERSION + 1},
        {k: v for k, v in good.items() if k != "nac_score"},
        {k: v for k, v in good.items() if k != "layers"},  # a version-1 value
        {**good, "probabilities": [0.5, 0.5]},  # another model's class count
        {**good, "msp": "high"},
    ):
        assert decode_prediction(bad, n, bundle.prediction) is None
