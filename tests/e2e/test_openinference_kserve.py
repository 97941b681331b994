"""The Open Inference Protocol's REST side through the ``kserve`` package's own request and
response types (``kserve.protocol.infer_type``), against the real ``nacguard serve`` process:
requests built with ``InferRequest``/``InferInput`` and serialised by ``to_rest()``, replies
parsed by ``InferResponse.from_rest``/``from_bytes``, in JSON and in the binary tensor data
extension, for BYTES images and UINT8 pixels. The scores equal ``/predict``'s.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput
from PIL import Image

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import TINY_BUNDLE_NAME, encoded_images

MODEL = TINY_BUNDLE_NAME
FIELDS = ("label", "class_index", "confidence", "nac_score", "ood")


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("oip-kserve") / "server.log"
    proc = start_server(tiny_bundle, log, cache_enabled=False, max_images_per_request=8)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Distinct PNG and JPEG images, in-distribution-looking blobs and uniform noise."""
    out: list[bytes] = []
    for i, fmt in enumerate(["PNG", "JPEG"]):
        for kind in ("blobs", "uniform"):
            out += encoded_images(1, kind=kind, seed=70 + i, fmt=fmt)
    return out


def _predict(server: ServerProcess, data: bytes) -> dict[str, Any]:
    r = httpx.post(
        f"{server.url}/predict", content=data, headers={"Content-Type": "image/png"}, timeout=30
    )
    assert r.status_code == 200, r.text
    prediction: dict[str, Any] = r.json()["predictions"][0]
    return prediction


def _send(server: ServerProcess, request: InferRequest) -> tuple[InferResponse, bool]:
    """POST what ``to_rest()`` makes; parse the reply with kserve's own ``InferResponse``.

    Returns the reply and whether it came in the binary tensor data extension.
    """
    body, json_length = request.to_rest()
    url = f"{server.url}/v2/models/{MODEL}/infer"
    if json_length is None:
        r = httpx.post(url, json=body, timeout=30)
    else:
        assert isinstance(body, bytes)
        r = httpx.post(
            url,
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(json_length),
            },
            timeout=30,
        )
    assert r.status_code == 200, r.text
    header = r.headers.get("inference-header-content-length")
    if header is None:
        return InferResponse.from_rest(r.json()), False
    return InferResponse.from_bytes(r.content, int(header)), True


def _binary_outputs() -> list[RequestedOutput]:
    return [RequestedOutput(n, parameters={"binary_data": True}) for n in FIELDS]


def _same(response: InferResponse, expected: list[dict[str, Any]]) -> None:
    assert response.model_name == MODEL
    out = {o.name: o.as_numpy() for o in response.outputs}
    assert list(out) == list(FIELDS)
    labels = [x if isinstance(x, str) else x.decode() for x in out["label"]]
    assert labels == [p["label"] for p in expected]
    np.testing.assert_array_equal(out["class_index"], [p["class_index"] for p in expected])
    for name in ("nac_score", "confidence"):
        np.testing.assert_allclose(
            out[name], [p[name] for p in expected], rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(out["ood"], [p["ood"] for p in expected])


def test_kserve_bytes_request_json_and_binary_match_predict(
    server: ServerProcess, images: list[bytes]
) -> None:
    expected = [_predict(server, d) for d in images]
    # Equal scores would prove nothing: the images must score differently.
    assert len({round(p["nac_score"], 4) for p in expected}) >= 3, expected

    # JSON: the protocol carries BYTES elements as base64 text.
    tensor = InferInput(
        "image",
        [len(images)],
        "BYTES",
        data=[base64.b64encode(d).decode() for d in images],
    )
    reply, binary = _send(server, InferRequest(MODEL, [tensor], request_id="kserve-json"))
    assert reply.id == "kserve-json" and not binary
    _same(reply, expected)

    # Binary tensor data extension, both ways.
    tensor = InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    request = InferRequest(
        MODEL, [tensor], request_id="kserve-binary", request_outputs=_binary_outputs()
    )
    reply, binary = _send(server, request)
    assert reply.id == "kserve-binary" and binary
    _same(reply, expected)


def test_kserve_pixels_request_matches_predict(server: ServerProcess, images: list[bytes]) -> None:
    pngs, arrays = [], []
    for data in images[:2]:  # the PNGs: lossless, so pixels and file are the same image
        image = Image.open(io.BytesIO(data)).convert("L")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        arrays.append(np.asarray(image, dtype=np.uint8)[..., None])
    batch = np.stack(arrays)
    expected = [_predict(server, d) for d in pngs]
    assert expected[0]["nac_score"] != pytest.approx(expected[1]["nac_score"], abs=1e-4)

    for binary in (False, True):
        tensor = InferInput("pixels", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = _binary_outputs() if binary else None
        reply, binary_reply = _send(server, InferRequest(MODEL, [tensor], request_outputs=outputs))
        assert binary_reply == binary
        _same(reply, expected)
