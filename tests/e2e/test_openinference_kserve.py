"""The Open Inference Protocol's REST side through the ``kserve`` package's own request and
response types (``kserve.protocol.infer_type``), against the real ``nacguard serve`` process:
requests built with ``InferRequest``/``InferInput`` and serialised by ``to_rest()``, replies
parsed by ``InferResponse.from_rest``/``from_bytes``, in JSON and in the binary tensor data
extension, for BYTES images and UINT8 pixels. The scores equal ``/predict``'s.

The kserve side runs in a process of its own (:mod:`tests.e2e.kserve_client`): its protobuf
module and tritonclient's cannot be imported by one process.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import TINY_BUNDLE_NAME, encoded_images

MODEL = TINY_BUNDLE_NAME
FIELDS = ["label", "class_index", "confidence", "nac_score", "p_value", "ood"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("oip-kserve") / "server.log"
    proc = start_server(tiny_bundle, log, cache_enabled=False, max_images_per_request=8)
    yield proc
    proc.stop()


def _predict(server: ServerProcess, data: bytes) -> dict[str, Any]:
    r = httpx.post(
        f"{server.url}/predict", content=data, headers={"Content-Type": "image/png"}, timeout=30
    )
    assert r.status_code == 200, r.text
    prediction: dict[str, Any] = r.json()["predictions"][0]
    return prediction


def _same(reply: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert reply["status"] == 200, reply
    assert reply["model_name"] == MODEL
    out = reply["outputs"]
    assert list(out) == FIELDS
    assert out["label"] == [p["label"] for p in expected]
    assert out["class_index"] == [p["class_index"] for p in expected]
    for name in ("nac_score", "confidence"):
        np.testing.assert_allclose(
            out[name], [p[name] for p in expected], rtol=1e-5, atol=1e-6, err_msg=name
        )
    assert out["ood"] == [p["ood"] for p in expected]
    assert out["p_value"] == [p["p_value"] for p in expected]  # FP64, the same rule


def test_kserve_requests_and_responses_match_predict(server: ServerProcess) -> None:
    images: list[bytes] = []
    for i, fmt in enumerate(["PNG", "JPEG"]):
        for kind in ("blobs", "uniform"):
            images += encoded_images(1, kind=kind, seed=70 + i, fmt=fmt)
    expected = [_predict(server, d) for d in images]
    # Equal scores would prove nothing: the images must score differently.
    assert len({round(p["nac_score"], 4) for p in expected}) >= 3, expected

    # The PNGs' pixels (lossless: the same images), with what /predict says of them.
    arrays = [np.asarray(Image.open(io.BytesIO(d)).convert("L"), np.uint8) for d in images[:2]]
    pixels = np.stack(arrays)[..., None]
    pngs = []
    for array in arrays:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    expected_pixels = [_predict(server, d) for d in pngs]

    job = {
        "url": server.url,
        "model": MODEL,
        "images": [base64.b64encode(d).decode() for d in images],
        "pixels": base64.b64encode(pixels.tobytes()).decode(),
        "shape": list(pixels.shape),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.kserve_client"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    replies = json.loads(proc.stdout)

    assert replies["bytes-json"]["id"] == "kserve-json"
    assert replies["bytes-binary"]["id"] == "kserve-binary"
    for way in ("bytes-json", "bytes-binary"):
        _same(replies[way], expected)
    for way in ("pixels-json", "pixels-binary"):
        _same(replies[way], expected_pixels)
    # Binary outputs were asked for with the binary requests only, and came back so.
    assert {w: r["binary"] for w, r in replies.items()} == {
        "bytes-json": False,
        "bytes-binary": True,
        "pixels-json": False,
        "pixels-binary": True,
    }
