"""Bundles round-trip, check their integrity, and predict what the NAC core computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nacguard.bundle import load_bundle
from nacguard.errors import BundleError
from nacguard.nac import LayerConfig
from tests.fixtures.demo_bundles import CLASSES, make_demo_bundle, random_images

LAYERS = [LayerConfig("block3", 0.05, 5.0, 20), LayerConfig("avgpool", 20.0, 5.0, 20)]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_bundle(tmp_path_factory.mktemp("bundle"), LAYERS, "tiny")


def test_round_trip_predicts_like_the_scorer(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    images = random_images(5, 3)
    preds = bundle.predict(images)
    direct = bundle.scorer(bundle.preprocess.batch(images))
    assert [p.class_index for p in preds] == direct.logits.argmax(1).tolist()
    np.testing.assert_allclose([p.nac_score for p in preds], direct.nac.numpy(), atol=1e-7)
    for p in preds:
        assert p.ood == (p.nac_score < bundle.threshold)
        assert p.label == CLASSES[p.class_index]
        assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)
        top = p.top_k(3)
        assert top[0] == (p.label, pytest.approx(p.confidence))
        assert [c for _, c in top] == sorted((c for _, c in top), reverse=True)
    assert [lp.name for lp in bundle.layers] == ["block3", "avgpool"]
    assert bundle.calibration is not None and bundle.calibration.scores.size == 40


def test_plain_classification_matches_scored_prediction(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    x = bundle.preprocess.batch(random_images(4, 5))
    plain = bundle.predict_batch(x, scoring=False)
    scored = bundle.predict_batch(x)
    assert [p.class_index for p in plain] == [p.class_index for p in scored]
    assert all(np.isnan(p.nac_score) and not p.ood for p in plain)


def test_tampered_weights_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    copy.mkdir()
    for f in bundle_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)


def test_schema_version_and_missing_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a profile bundle"):
        load_bundle(tmp_path)
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["schema_version"] = 99
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="schema version"):
        load_bundle(tmp_path)


def test_describe_lists_layers_and_calibration(bundle_dir: Path) -> None:
    info = load_bundle(bundle_dir).describe()
    assert [layer["name"] for layer in info["layers"]] == ["block3", "avgpool"]
    assert info["layers"][1]["neurons"] == 16
    assert info["calibration"]["samples"] == 40
    assert info["threshold"] == pytest.approx(info["calibration"]["threshold"])
