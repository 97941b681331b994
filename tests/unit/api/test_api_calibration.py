"""/predict p-values, explain=true, the alpha and fused-detector settings, /v1/profile sanity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nacguard.bundle import load_bundle
from nacguard.nac.conformal import p_values, threshold_for_alpha
from tests.fixtures.api import PNG, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images

EXPLAIN_KEYS = {"layers", "least_covered_layer", "p_values"}


async def test_explain_fields_only_when_asked(make_api: ApiFactory, tiny_bundle: Path) -> None:
    images = encoded_images(6, kind="uniform", seed=40) + encoded_images(6, seed=41)
    names = [lp.name for lp in load_bundle(tiny_bundle).layers]
    async with make_api() as api:
        plain = (await api.client.post("/predict", files=multipart(images))).json()
        r = await api.client.post("/predict?explain=true", files=multipart(images))
        assert r.status_code == 200, r.text
        explained = r.json()["predictions"]
        again = (await api.client.post("/predict?explain=true", files=multipart(images))).json()
        assert again["predictions"] == explained  # from the result cache: the same fields
    for p in plain["predictions"]:
        assert not EXPLAIN_KEYS & set(p)
    assert len({p["least_covered_layer"] for p in explained} | {None}) >= 2
    for p, q in zip(plain["predictions"], explained, strict=True):
        assert q["nac_score"] == p["nac_score"] and q["p_value"] == p["p_value"]
        assert list(q["layers"]) == names
        mean = torch.tensor(list(q["layers"].values()), dtype=torch.float32).mean()
        assert float(mean) == q["nac_score"]
        assert q["least_covered_layer"] == min(names, key=q["layers"].__getitem__)
        assert set(q["p_values"]) == {"nac", "msp", "energy", "fused"}
        assert q["p_values"]["nac"] == q["p_value"]


async def test_p_value_is_the_conformal_rank(make_api: ApiFactory, tiny_bundle: Path) -> None:
    cal = load_bundle(tiny_bundle).calibration
    assert cal is not None
    images = encoded_images(8, kind="uniform", seed=42)
    async with make_api() as api:
        body = (await api.client.post("/predict", files=multipart(images))).json()
    got = [p["p_value"] for p in body["predictions"]]
    want = p_values(cal.scores, [p["nac_score"] for p in body["predictions"]])
    assert got == pytest.approx(want.tolist(), abs=0)
    assert len(set(got)) > 1


async def test_alpha_setting(make_api: ApiFactory, tiny_bundle: Path) -> None:
    cal = load_bundle(tiny_bundle).calibration
    assert cal is not None
    images = encoded_images(16, kind="uniform", seed=43)
    async with make_api(ood_alpha=0.2) as api:
        body = (await api.client.post("/predict", files=multipart(images))).json()
        profile = (await api.client.get("/v1/profile")).json()
    preds = body["predictions"]
    assert all(p["ood"] == (p["p_value"] < 0.2) for p in preds)
    assert {p["threshold"] for p in preds} == {threshold_for_alpha(cal.scores, 0.2)}
    assert 0 < sum(p["ood"] for p in preds) < len(preds)  # both outcomes occur
    assert profile["calibration"]["alpha"] == 0.2
    assert "sanity" in profile


async def test_fused_detector(make_api: ApiFactory) -> None:
    images = encoded_images(16, kind="uniform", seed=44)
    async with make_api(ood_alpha=0.2, ood_detector="fused") as api:
        r = await api.client.post("/predict?explain=true", files=multipart(images))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert all(p["threshold"] is None for p in preds)
    assert all(p["p_value"] == p["p_values"]["fused"] for p in preds)
    assert all(p["ood"] == (p["p_value"] < 0.2) for p in preds)


async def test_scoring_off_gives_null_p_value_and_layers(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=45)
    async with make_api(scoring=False) as api:
        r = await api.client.post("/predict?explain=true", content=image, headers=PNG)
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["nac_score"] is None and p["p_value"] is None and p["layers"] is None


async def test_explain_rejects_garbage(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=46)
    async with make_api() as api:
        r = await api.client.post("/predict?explain=maybe", content=image, headers=PNG)
    assert r.status_code == 422
    assert r.json()["error"]["code"]


def test_old_bundle_without_baseline_scores(tmp_path: Path) -> None:
    from nacguard.nac import LayerConfig
    from tests.fixtures.demo_bundles import make_demo_bundle

    # Written like a bundle of an earlier version: NAC calibration scores only.
    layers = [LayerConfig("avgpool", beta=1.0, saturation=20.0, n_edges=50)]
    bundle_dir = make_demo_bundle(tmp_path / "old", layers, "old")
    bundle = load_bundle(bundle_dir)
    assert bundle.calibration is not None and bundle.calibration.msp is None
    (p,) = bundle.predict_batch(torch.zeros(1, 1, 28, 28))
    assert set(p.p_values) == {"nac"} and not math.isnan(p.p_value)
    with pytest.raises(Exception, match="MSP and energy calibration scores"):
        load_bundle(bundle_dir, ood_detector="fused")
    assert np.isfinite(p.p_value)
