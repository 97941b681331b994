"""``nacguard serve`` on bundles of other model kinds answers what offline ``predict`` does."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from nacguard.bundle import load_bundle
from tests.e2e.server import start_server
from tests.fixtures.bundles import encoded_images
from tests.unit.bundle.kinds import build_kind_bundle


@pytest.mark.parametrize("kind", ["timm-vit", "onnx", "python"])
def test_served_scores_equal_offline_predict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    out, _ = build_kind_bundle(tmp_path, kind, "synthetic:blobs?n=60&size=32", 40, 20, 3.0, 20)
    # The python kind imports the operator's module: the server finds it on its PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    images = encoded_images(6, kind="shapes", seed=3, size=32)
    offline = load_bundle(out).predict([Image.open(io.BytesIO(d)) for d in images])
    server = start_server(out, tmp_path / "server.log")
    try:
        files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
        response = httpx.post(f"{server.url}/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
    finally:
        server.stop()
    assert len({round(p.nac_score, 6) for p in offline}) > 1, "scores should vary"
    for got, want in zip(served, offline, strict=True):
        assert got["label"] == want.label
        assert got["nac_score"] == pytest.approx(want.nac_score, abs=1e-6)
