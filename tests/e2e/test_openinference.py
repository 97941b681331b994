"""The Open Inference Protocol (KServe v2) against the real ``nacguard serve`` process, through
clients nobody here wrote: ``tritonclient.http``, ``tritonclient.grpc`` and the standard gRPC
health client. One server (API keys on, result cache off so every answer is computed) serves
the module; the drain test has its own.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, free_port, start_server
from tests.fixtures.bundles import TINY_BUNDLE_NAME, encoded_images

KEY = "oip-test-key-0123456789"
MAX_IMAGES = 8
MODEL = TINY_BUNDLE_NAME


# Header dicts are made fresh per call: tritonclient.http writes Inference-Header-Content-Length
# into the dict it is given, which would leak into the next request.
def _auth() -> dict[str, str]:
    return {"x-api-key": KEY}


def _bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("oip") / "server.log"
    proc = start_server(
        tiny_bundle,
        log,
        grpc_port=free_port(),
        api_keys=json.dumps([KEY]),
        cache_enabled=False,
        max_images_per_request=MAX_IMAGES,
        max_body_bytes=256 * 1024,
    )
    yield proc
    proc.stop()


def _grpc_port(proc: ServerProcess) -> int:
    for line in proc.logs().splitlines():
        if "gRPC (Open Inference Protocol)" in line:
            return int(json.loads(line)["message"].rsplit(" ", 1)[1])
    raise AssertionError("the server logged no gRPC port")


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def rpc(server: ServerProcess) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{_grpc_port(server)}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Distinct images in three formats: in-distribution-looking blobs and uniform noise."""
    out = {}
    for i, fmt in enumerate(["PNG", "JPEG", "WEBP"]):
        for kind in ("blobs", "uniform"):
            out[f"{kind}-{fmt.lower()}"] = encoded_images(1, kind=kind, seed=40 + i, fmt=fmt)[0]
    return out


def _predict(server: ServerProcess, data: bytes) -> dict[str, float]:
    # /predict decodes by content, whatever image type is declared.
    r = httpx.post(
        f"{server.url}/predict",
        content=data,
        headers={"Content-Type": "image/png", **_auth()},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def _bytes_input(module: object, images: list[bytes], *, binary: bool = True) -> object:
    tensor = module.InferInput("image", [len(images)], "BYTES")  # type: ignore[attr-defined]
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    else:  # JSON: BYTES elements are base64 text
        b64 = [base64.b64encode(d) for d in images]
        tensor.set_data_from_numpy(np.array(b64, dtype=np.object_), binary_data=False)
    return tensor


def _same(result: object, expected: list[dict[str, float]]) -> None:
    # Binary BYTES come back as bytes, JSON ones as str.
    labels = [x if isinstance(x, str) else x.decode() for x in result.as_numpy("label")]  # type: ignore[attr-defined]
    assert labels == [p["label"] for p in expected]
    np.testing.assert_array_equal(
        result.as_numpy("class_index"),  # type: ignore[attr-defined]
        [p["class_index"] for p in expected],
    )
    np.testing.assert_allclose(
        result.as_numpy("nac_score"),  # type: ignore[attr-defined]
        [p["nac_score"] for p in expected],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        result.as_numpy("confidence"),  # type: ignore[attr-defined]
        [p["confidence"] for p in expected],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        result.as_numpy("ood"),  # type: ignore[attr-defined]
        [p["ood"] for p in expected],
    )
    # FP64 and computed by the same rule: the very p-values /predict answers
    assert result.as_numpy("p_value").tolist() == [p["p_value"] for p in expected]  # type: ignore[attr-defined]


def test_health_and_metadata(
    server: ServerProcess, http: thttp.InferenceServerClient, rpc: tgrpc.InferenceServerClient
) -> None:
    # Health needs no key (auth_exempt_paths); metadata does.
    assert http.is_server_live() and http.is_server_ready()
    assert rpc.is_server_live() and rpc.is_server_ready()
    assert http.is_model_ready(MODEL, headers=_auth())
    assert rpc.is_model_ready(MODEL, headers=_bearer())
    assert "binary_tensor_data" in http.get_server_metadata(headers=_auth())["extensions"]
    assert rpc.get_server_metadata(headers=_auth()).name == "nacguard"
    meta = http.get_model_metadata(MODEL, headers=_auth())
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {
        ("image", "BYTES"),
        ("pixels", "UINT8"),
    }
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, 10])
    assert outputs["ood"] == ("BOOL", [-1])
    gmeta = rpc.get_model_metadata(MODEL, "1", headers=_auth(), as_json=True)
    assert [t["name"] for t in gmeta["outputs"]] == [t["name"] for t in meta["outputs"]]

    with grpc.insecure_channel(f"127.0.0.1:{_grpc_port(server)}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="other"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_scores_vary_and_every_protocol_matches_predict(
    server: ServerProcess,
    http: thttp.InferenceServerClient,
    rpc: tgrpc.InferenceServerClient,
    images: dict[str, bytes],
) -> None:
    data = list(images.values())
    expected = [_predict(server, d) for d in data]
    scores = [p["nac_score"] for p in expected]
    # A comparison on equal values would prove nothing: the images must score differently.
    assert len({round(s, 4) for s in scores}) >= 3, scores
    assert len({round(p["confidence"], 5) for p in expected}) == len(data), expected

    binary = http.infer(MODEL, [_bytes_input(thttp, data)], headers=_auth())
    _same(binary, expected)
    as_json = http.infer(
        MODEL,
        [_bytes_input(thttp, data, binary=False)],
        outputs=[
            thttp.InferRequestedOutput(n, binary_data=False)
            for n in ("label", "class_index", "confidence", "nac_score", "p_value", "ood")
        ],
        headers=_auth(),
    )
    _same(as_json, expected)
    assert all("data" in o for o in as_json.get_response()["outputs"])
    _same(rpc.infer(MODEL, [_bytes_input(tgrpc, data)], headers=_bearer()), expected)
    # One image per call as well: batch-mates must not change a score.
    for d, p in zip(data, expected, strict=True):
        _same(rpc.infer(MODEL, [_bytes_input(tgrpc, [d])], headers=_auth()), [p])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pixels_are_preprocessed_as_the_image_would_be(
    server: ServerProcess,
    http: thttp.InferenceServerClient,
    rpc: tgrpc.InferenceServerClient,
    images: dict[str, bytes],
    mode: str,
) -> None:
    pngs, arrays = [], []
    for name in ("blobs-png", "uniform-png"):
        image = Image.open(io.BytesIO(images[name])).convert(mode)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append(buf.getvalue())
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[..., None] if array.ndim == 2 else array)
    expected = [_predict(server, d) for d in pngs]
    batch = np.stack(arrays)
    for module, client, headers in ((thttp, http, _auth), (tgrpc, rpc, _bearer)):
        tensor = module.InferInput("pixels", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        _same(client.infer(MODEL, [tensor], headers=headers()), expected)
    tensor = thttp.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=False)
    _same(http.infer(MODEL, [tensor], headers=_auth()), expected)


def test_requested_outputs_binary_flags_and_id(
    http: thttp.InferenceServerClient, rpc: tgrpc.InferenceServerClient, images: dict[str, bytes]
) -> None:
    data = [images["blobs-png"], images["uniform-webp"]]
    outputs = [
        thttp.InferRequestedOutput("probabilities", binary_data=True),
        thttp.InferRequestedOutput("ood", binary_data=False),
    ]
    result = http.infer(
        MODEL, [_bytes_input(thttp, data)], outputs=outputs, request_id="req-7", headers=_auth()
    )
    response = result.get_response()
    assert response["id"] == "req-7"
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "ood"]
    probs, ood = response["outputs"]
    assert probs["parameters"]["binary_data_size"] == 2 * 10 * 4 and "data" not in probs
    assert isinstance(ood["data"], list) and "parameters" not in ood
    p = result.as_numpy("probabilities")
    assert p.shape == (2, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert result.as_numpy("label") is None

    gresult = rpc.infer(
        MODEL,
        [_bytes_input(tgrpc, data)],
        outputs=[tgrpc.InferRequestedOutput("class_index")],
        request_id="req-8",
        headers=_auth(),
    )
    gresponse = gresult.get_response()
    assert gresponse.id == "req-8" and [o.name for o in gresponse.outputs] == ["class_index"]
    np.testing.assert_array_equal(gresult.as_numpy("class_index"), p.argmax(axis=1))


def _http_status(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()  # type: ignore[operator]
    return str(err.value.status()), err.value.message()


def test_http_errors_and_their_status_codes(
    server: ServerProcess, http: thttp.InferenceServerClient, images: dict[str, bytes]
) -> None:
    png = images["blobs-png"]
    good = _bytes_input(thttp, [png])
    assert _http_status(lambda: http.infer(MODEL, [good]))[0] == "401"
    assert _http_status(lambda: http.infer("other", [good], headers=_auth()))[0] == "404"
    assert (
        _http_status(lambda: http.infer(MODEL, [good], model_version="2", headers=_auth()))[0]
        == "404"
    )
    wrong = thttp.InferInput("image", [1], "UINT8")
    wrong.set_data_from_numpy(np.zeros(1, np.uint8))
    status, message = _http_status(lambda: http.infer(MODEL, [wrong], headers=_auth()))
    assert status == "400" and "BYTES" in message
    junk = _bytes_input(thttp, [b"not an image at all"])
    assert _http_status(lambda: http.infer(MODEL, [junk], headers=_auth()))[0] == "400"
    many = _bytes_input(thttp, [png] * (MAX_IMAGES + 1))
    assert _http_status(lambda: http.infer(MODEL, [many], headers=_auth()))[0] == "413"
    unknown_output = [thttp.InferRequestedOutput("logits")]
    status, message = _http_status(
        lambda: http.infer(MODEL, [good], outputs=unknown_output, headers=_auth())
    )
    assert status == "400" and "logits" in message
    # 1 microsecond: the deadline has passed before the batch runs.
    assert _http_status(lambda: http.infer(MODEL, [good], timeout=1, headers=_auth()))[0] == "504"

    # The protocol's error body is {"error": "<message>"}, also for errors before routing.
    for path, headers in (
        (f"/v2/models/{MODEL}/infer", {}),
        ("/v2/models/other", _auth()),
        (f"/v2/models/{MODEL}/infer", _auth()),
    ):
        r = httpx.post(f"{server.url}{path}", content=b"{", headers=headers, timeout=10)
        assert r.status_code in (400, 401, 404, 405), r.text
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def _grpc_code(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as err:
        call()  # type: ignore[operator]
    return str(err.value.status()), err.value.message()


def test_grpc_errors_and_their_status_codes(
    rpc: tgrpc.InferenceServerClient, images: dict[str, bytes]
) -> None:
    good = _bytes_input(tgrpc, [images["blobs-png"]])
    assert _grpc_code(lambda: rpc.infer(MODEL, [good]))[0] == "StatusCode.UNAUTHENTICATED"
    wrong_key = {"x-api-key": "nope"}
    assert _grpc_code(lambda: rpc.infer(MODEL, [good], headers=wrong_key))[0] == (
        "StatusCode.UNAUTHENTICATED"
    )
    assert _grpc_code(lambda: rpc.get_model_metadata("other", headers=_auth()))[0] == (
        "StatusCode.NOT_FOUND"
    )
    wrong = tgrpc.InferInput("pixels", [1, 2, 2], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 2, 2), np.uint8))
    code, message = _grpc_code(lambda: rpc.infer(MODEL, [wrong], headers=_auth()))
    assert code == "StatusCode.INVALID_ARGUMENT" and "[B, H, W, C]" in message
    junk = _bytes_input(tgrpc, [b"\x89PNG\r\n\x1a\n broken"])
    assert _grpc_code(lambda: rpc.infer(MODEL, [junk], headers=_auth()))[0] == (
        "StatusCode.INVALID_ARGUMENT"
    )
    many = _bytes_input(tgrpc, [images["blobs-png"]] * (MAX_IMAGES + 1))
    assert _grpc_code(lambda: rpc.infer(MODEL, [many], headers=_auth()))[0] == (
        "StatusCode.INVALID_ARGUMENT"
    )
    assert _grpc_code(lambda: rpc.infer(MODEL, [good], timeout=1, headers=_auth()))[0] == (
        "StatusCode.DEADLINE_EXCEEDED"
    )


def test_routes_and_rpcs_are_counted(
    server: ServerProcess, rpc: tgrpc.InferenceServerClient
) -> None:
    rpc.is_server_live()
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'endpoint="/v2/models/{model_name}/infer"' in text
    grpc = [line for line in text.splitlines() if 'method="GRPC"' in line]
    assert any(
        line.startswith("nacguard_http_requests_total{")
        and 'endpoint="/inference.GRPCInferenceService/ModelInfer"' in line
        and 'status="400"' in line
        for line in grpc
    ), grpc
    assert any(
        'endpoint="/inference.GRPCInferenceService/ServerLive"' in line and 'status="200"' in line
        for line in grpc
    ), grpc
    spec = httpx.get(f"{server.url}/openapi.json", headers=_auth(), timeout=10).json()
    assert "/v2/models/{model_name}/infer" in spec["paths"]


def test_sigterm_drains_grpc_calls_in_flight(
    tiny_bundle: Path, tmp_path: Path, images: dict[str, bytes]
) -> None:
    # Batches wait up to 2 s for 64 images: the first calls sit in the queue when SIGTERM comes.
    proc = start_server(
        tiny_bundle,
        tmp_path / "drain.log",
        grpc_port=free_port(),
        max_batch_size=64,
        max_wait_ms=2000,
        batch_wait="fixed",
        cache_enabled=False,
    )
    try:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{_grpc_port(proc)}")
        data = [images["blobs-png"]] * 4

        def call() -> str:
            try:
                result = client.infer(MODEL, [_bytes_input(tgrpc, data)], client_timeout=30)
            except InferenceServerException as exc:
                return str(exc.status())
            assert result.as_numpy("label") is not None
            return "OK"

        with ThreadPoolExecutor(4) as pool:
            first = [pool.submit(call) for _ in range(4)]
            deadline = time.monotonic() + 10
            while httpx.get(f"{proc.url}/healthz").json()["predict_requests_in_progress"] < 4:
                assert time.monotonic() < deadline, "the calls never reached the service"
            proc.signal(signal.SIGTERM)
            later = [pool.submit(call) for _ in range(4)]
            accepted = [f.result() for f in first]
            refused = [f.result() for f in later]
        assert proc.wait(30) == 0
        # Accepted calls were answered; later ones refused (UNAVAILABLE: draining, then gone).
        assert accepted == ["OK"] * 4
        assert set(refused) == {"StatusCode.UNAVAILABLE"}, refused
        client.close()
    finally:
        proc.stop()
