"""POST /predict in-process: the three input forms, order, scores, top_k, headers, cache."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from pathlib import Path

import pytest
from PIL import Image

from nacguard.bundle import load_bundle
from tests.fixtures.api import PNG, Api, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images

PREDICTION_KEYS = {
    "label",
    "class_index",
    "confidence",
    "nac_score",
    "p_value",
    "ood",
    "threshold",
    "top_k",
}


def _expected(bundle_dir: Path, images: list[bytes]) -> list[dict]:
    """What the offline pipeline says about each image, one image per batch."""
    bundle = load_bundle(bundle_dir)
    out = []
    for data in images:
        (p,) = bundle.predict([Image.open(io.BytesIO(data))])
        out.append(
            {
                "label": p.label,
                "nac_score": p.nac_score,
                "ood": p.ood,
                "conf": p.confidence,
                "p_value": p.p_value,
            }
        )
    return out


def _assert_matches(predictions: list[dict], expected: list[dict]) -> None:
    assert len(predictions) == len(expected)
    for got, want in zip(predictions, expected, strict=True):
        assert set(got) == PREDICTION_KEYS
        assert got["label"] == want["label"]
        assert got["nac_score"] == pytest.approx(want["nac_score"], abs=1e-6)
        assert got["confidence"] == pytest.approx(want["conf"], abs=1e-6)
        assert got["ood"] == want["ood"]
        assert got["ood"] == (got["nac_score"] < got["threshold"])
        assert got["p_value"] == pytest.approx(want["p_value"], abs=1e-12)


async def test_raw_png_body(api: Api, tiny_bundle: Path) -> None:
    (image,) = encoded_images(1, seed=11)
    r = await api.client.post("/predict", content=image, headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fashion-cnn"
    assert body["profile"] == "tiny-fashion"
    _assert_matches(body["predictions"], _expected(tiny_bundle, [image]))
    # A single-image request is computed exactly as the offline pipeline computes it.
    (want,) = _expected(tiny_bundle, [image])
    assert body["predictions"][0]["nac_score"] == want["nac_score"]


@pytest.mark.parametrize(("fmt", "media_type"), [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
async def test_raw_other_formats(api: Api, tiny_bundle: Path, fmt: str, media_type: str) -> None:
    (image,) = encoded_images(1, seed=12, fmt=fmt)
    r = await api.client.post("/predict", content=image, headers={"Content-Type": media_type})
    assert r.status_code == 200, r.text
    _assert_matches(r.json()["predictions"], _expected(tiny_bundle, [image]))


async def test_octet_stream_body_is_sniffed(api: Api) -> None:
    (image,) = encoded_images(1, seed=13)
    r = await api.client.post(
        "/predict", content=image, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 200, r.text


async def test_multipart_keeps_request_order(api: Api, tiny_bundle: Path) -> None:
    images = encoded_images(3, seed=21) + encoded_images(3, kind="uniform", seed=22)
    r = await api.client.post("/predict", files=multipart(images))
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    _assert_matches(predictions, _expected(tiny_bundle, images))


async def test_json_base64_and_data_url(api: Api, tiny_bundle: Path) -> None:
    images = encoded_images(4, seed=31)
    encoded = [base64.b64encode(d).decode() for d in images]
    encoded[1] = "data:image/png;base64," + encoded[1]
    r = await api.client.post("/predict", json={"images": encoded})
    assert r.status_code == 200, r.text
    _assert_matches(r.json()["predictions"], _expected(tiny_bundle, images))


async def test_mixed_in_and_out_of_distribution_flags(api: Api) -> None:
    images = encoded_images(16, kind="uniform", seed=41)
    r = await api.client.post("/predict", files=multipart(images))
    flags = [p["ood"] for p in r.json()["predictions"]]
    # Uniform noise is far from the blobs the tiny profile was counted on: some are flagged,
    # and the flag is exactly "score below threshold" (checked per image above).
    assert any(flags)


async def test_top_k(api: Api) -> None:
    (image,) = encoded_images(1, seed=51)
    headers = PNG
    default = (await api.client.post("/predict", content=image, headers=headers)).json()
    assert len(default["predictions"][0]["top_k"]) == api.settings.top_k
    for k in (0, 1, 10):
        r = await api.client.post(f"/predict?top_k={k}", content=image, headers=headers)
        top = r.json()["predictions"][0]["top_k"]
        assert len(top) == k
        confidences = [t["confidence"] for t in top]
        assert confidences == sorted(confidences, reverse=True)
        if k:
            assert top[0]["label"] == r.json()["predictions"][0]["label"]


async def test_response_headers(api: Api) -> None:
    (image,) = encoded_images(1, seed=61)
    started = time.perf_counter()
    r = await api.client.post(
        "/predict",
        content=image,
        headers={"Content-Type": "image/png", "X-Request-ID": "client-id-1"},
    )
    round_trip_ms = (time.perf_counter() - started) * 1000
    assert r.headers["X-Request-ID"] == "client-id-1"
    queue_ms = float(r.headers["X-Queue-Time-Ms"])
    inference_ms = float(r.headers["X-Inference-Time-Ms"])
    # Both are parts of this request's time in the server, in milliseconds: together they fit in
    # the round trip the client saw (seconds, or a clock other than the request's, would not).
    assert inference_ms > 0
    assert queue_ms + inference_ms <= round_trip_ms
    assert r.headers["X-Batch-Sizes"] == "1"
    assert r.headers["X-Cache-Hits"] == "0"
    # An unusable client id is replaced, not echoed.
    r = await api.client.post(
        "/predict", content=image, headers={"Content-Type": "image/png", "X-Request-ID": "a b"}
    )
    assert r.headers["X-Request-ID"] not in {"a b", ""}


async def test_cache_hit_skips_compute(api: Api) -> None:
    images = encoded_images(2, seed=71)
    headers = PNG
    first = await api.client.post("/predict", content=images[0], headers=headers)
    again = await api.client.post("/predict", content=images[0], headers=headers)
    assert again.headers["X-Cache-Hits"] == "1"
    assert again.headers["X-Batch-Sizes"] == ""
    assert again.json() == first.json()
    mixed = await api.client.post("/predict", files=multipart(images))
    assert mixed.headers["X-Cache-Hits"] == "1"
    assert mixed.headers["X-Batch-Sizes"] == "1"
    assert mixed.json()["predictions"][0] == first.json()["predictions"][0]


async def test_cache_disabled(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=72)
    async with make_api(cache_enabled=False) as api:
        for _ in range(2):
            r = await api.client.post("/predict", content=image, headers=PNG)
            assert r.headers["X-Cache-Hits"] == "0"
            assert r.headers["X-Batch-Sizes"] == "1"


async def test_scoring_off_serves_plain_classification(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=81)
    async with make_api(scoring=False) as api:
        r = await api.client.post("/predict", content=image, headers=PNG)
    assert r.status_code == 200, r.text
    prediction = r.json()["predictions"][0]
    assert prediction["nac_score"] is None
    assert prediction["ood"] is False
    assert math.isfinite(prediction["confidence"])


async def test_review_dir_receives_flagged_images(make_api: ApiFactory, tmp_path: Path) -> None:
    images = encoded_images(16, kind="uniform", seed=91)
    async with make_api(review_dir=tmp_path / "review") as api:
        r = await api.client.post(
            "/predict",
            files=multipart(images),
            headers={"X-Request-ID": "review-req"},
        )
    answer = r.json()
    flagged = sum(p["ood"] for p in answer["predictions"])
    assert flagged > 0
    records = sorted((tmp_path / "review").glob("*.json"))
    assert len(records) == flagged
    assert all("review-req" in path.name for path in records)
    # Each record names the served model and version (the model repository's addressing).
    rows = [json.loads(path.read_text()) for path in records]
    assert {(row["model"], row["version"]) for row in rows} == {
        (answer["model"], answer["version"])
    }
    assert len(list((tmp_path / "review").glob("*.png"))) == flagged


async def test_channels_last_gives_the_same_scores(make_api: ApiFactory, tiny_bundle: Path) -> None:
    images = encoded_images(3, seed=82)
    async with make_api(channels_last=True) as api:
        r = await api.client.post("/predict", files=multipart(images))
    assert r.status_code == 200, r.text
    _assert_matches(r.json()["predictions"], _expected(tiny_bundle, images))
