"""The operator page's routes in-process: static files with their security headers, the JSON the
page draws from, API keys, the review list/mark/export over the local review folder, and
``ui_enabled=False``. (The page itself runs in a real browser in tests/e2e/test_ui_browser.py.)"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

from PIL import Image

from nacguard.api.ui import CONTENT_SECURITY_POLICY, PUBLIC_PATHS
from tests.fixtures.api import Api, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images

KEY = "ui-test-key-0123456789"


async def test_page_and_assets_carry_a_strict_policy(api: Api) -> None:
    for path, kind in [
        ("/ui", "text/html"),
        ("/ui/static/app.js", "text/javascript"),
        ("/ui/static/app.css", "text/css"),
        ("/ui/static/icon.svg", "image/svg+xml"),
        ("/ui/config", "application/json"),
    ]:
        r = await api.client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(kind)
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    page = (await api.client.get("/ui")).text
    assert '<script src="/ui/static/app.js"' in page
    assert "<script>" not in page and "style=" not in page  # nothing inline for CSP to refuse
    script = (await api.client.get("/ui/static/app.js")).text
    assert "innerHTML" not in script.replace("never innerHTML", "")
    for bad in ["/ui/static/../app.py", "/ui/static/ui.py", "/ui/static/index.html"]:
        assert (await api.client.get(bad)).status_code == 404
    assert (await api.client.get("/ui/config")).json() == {"auth_required": False}


async def test_calibration_histogram_holds_every_calibration_score(api: Api) -> None:
    body = (await api.client.get("/v1/calibration")).json()
    bundle = api.service.bundle
    assert bundle is not None and bundle.calibration is not None
    hist = body["histogram"]
    assert sum(hist["counts"]) == hist["samples"] == bundle.calibration.scores.size
    assert len(hist["edges"]) == len(hist["counts"]) + 1
    assert hist["edges"][0] <= body["threshold"] <= hist["edges"][-1]
    bins = body["drift_bins"]
    assert len(bins["expected"]) == len(bins["edges"]) + 1
    assert abs(sum(bins["expected"]) - 1) < 1e-9
    assert bins["edges"][bins["ood_bins"] - 1] == body["threshold"]


async def test_stats_follow_traffic(api: Api) -> None:
    before = (await api.client.get("/v1/stats")).json()
    [model] = before["models"]
    assert model["requests"] == 0 and sum(before["drift_window"]["counts"]) == 0
    for image in encoded_images(3, kind="uniform", seed=3):
        assert (await api.client.post("/predict", files=multipart([image]))).status_code == 200
    assert (
        await api.client.post("/predict", content=b"junk", headers={"Content-Type": "image/png"})
    ).status_code == 400
    after = (await api.client.get("/v1/stats")).json()
    [model] = after["models"]
    assert model["requests"] == 4
    assert model["by_status"] == {"200": 3, "400": 1}
    assert model["latency_buckets"][-1] == [None, 4]
    assert model["images_scored"] == 3
    assert sum(after["drift_window"]["counts"]) == 3
    assert after["time"] >= before["time"]


async def test_review_list_mark_and_export_over_the_local_folder(
    make_api: ApiFactory, tmp_path: Path
) -> None:
    async with make_api(review_dir=tmp_path / "review") as api:
        images = encoded_images(12, kind="uniform", seed=11)
        predictions = []
        for image in images:
            r = await api.client.post("/predict", files=multipart([image]))
            predictions.append(r.json()["predictions"][0])
        flagged = sum(p["ood"] for p in predictions)
        assert flagged > 0, "the noise must flag some images for this test to mean anything"
        body = (await api.client.get("/v1/review")).json()
        assert body["enabled"] is True and body["backend"] == "local"
        items = body["items"]
        assert len(items) == flagged
        assert [i["time"] for i in items] == sorted((i["time"] for i in items), reverse=True)
        first = items[0]
        assert first["score"] < first["threshold"]
        # The thumbnail is a PNG this server drew, never the uploaded bytes.
        prefix = "data:image/png;base64,"
        assert first["thumbnail"].startswith(prefix)
        thumb = Image.open(io.BytesIO(base64.b64decode(first["thumbnail"][len(prefix) :])))
        assert thumb.format == "PNG" and max(thumb.size) <= 96

        r = await api.client.post(f"/v1/review/{first['id']}/mark", json={"mark": "ind"})
        assert r.status_code == 200 and r.json() == {"id": first["id"], "mark": "ind"}
        listed = (await api.client.get("/v1/review")).json()["items"]
        assert {i["id"]: i["mark"] for i in listed}[first["id"]] == "ind"

        bad = await api.client.post(f"/v1/review/{first['id']}/mark", json={"mark": "cat"})
        assert bad.status_code == 422
        missing = await api.client.post(
            "/v1/review/0000000000001-000000-x/mark", json={"mark": "ood"}
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert (await api.client.get("/v1/review?limit=0")).status_code == 422

        export = await api.client.get("/v1/review/export")
        assert export.status_code == 200
        assert export.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
            rows = json.loads(archive.read("index.json"))
            assert [(r["id"], r["mark"]) for r in rows] == [(first["id"], "ind")]
            assert archive.read(rows[0]["image_file"]) in images


async def test_review_off_says_so(api: Api) -> None:
    assert (await api.client.get("/v1/review")).json() == {
        "enabled": False,
        "backend": None,
        "items": [],
    }
    r = await api.client.post("/v1/review/1-1/mark", json={"mark": "ood"})
    assert r.status_code == 404
    assert (await api.client.get("/v1/review/export")).status_code == 404


async def test_with_keys_only_the_shell_is_public(make_api: ApiFactory) -> None:
    async with make_api(api_keys=[KEY]) as api:
        for path in PUBLIC_PATHS:
            assert (await api.client.get(path)).status_code == 200, path
        assert (await api.client.get("/ui/config")).json() == {"auth_required": True}
        for path in ["/v1/calibration", "/v1/stats", "/v1/review", "/v1/review/export"]:
            r = await api.client.get(path)
            assert r.status_code == 401, path
            ok = await api.client.get(path, headers={"X-API-Key": KEY})
            assert ok.status_code in (200, 404), path  # 404: review recording off
        mark = await api.client.post("/v1/review/1-1/mark", json={"mark": "ood"})
        assert mark.status_code == 401
        spec = (await api.client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
        assert "401" in spec["paths"]["/v1/stats"]["get"]["responses"]


async def test_ui_disabled_removes_every_route(make_api: ApiFactory) -> None:
    async with make_api(ui_enabled=False) as api:
        for path in [
            "/ui",
            "/ui/static/app.js",
            "/ui/config",
            "/v1/stats",
            "/v1/calibration",
            "/v1/review",
        ]:
            assert (await api.client.get(path)).status_code == 404, path
        assert (await api.client.get("/v1/profile")).status_code == 200
