"""A fuzz corpus of Open Inference Protocol requests against the real ``nacguard serve``.

REST bodies (JSON and binary tensor data) and gRPC ``ModelInferRequest`` messages (built with
tritonclient's own copy of the protocol's messages): wrong datatypes, shapes and names, missing
inputs, lying binary lengths (length prefixes, ``binary_data_size``,
``Inference-Header-Content-Length``), non-image bytes, oversized bodies, images and pixel
arrays, malformed JSON and parameters, unknown models and outputs, plus seeded random bytes in
every position. Every REST answer must be a 200 (only for valid requests) or a 4xx with exactly
``{"error": "<message>"}``; every gRPC answer OK or a client-error status code. Never a 5xx or
INTERNAL/UNKNOWN, and afterwards the server still answers both protocols.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.server import ServerProcess, free_port, start_server
from tests.fixtures.bundles import TINY_BUNDLE_NAME, encoded_images

pytestmark = pytest.mark.slow

MAX_BODY = 256 * 1024
MAX_IMAGES = 8
MAX_PIXELS = 1_000_000
MODEL = TINY_BUNDLE_NAME
INFER = f"/v2/models/{MODEL}/infer"
GRPC_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a message over max_body_bytes, refused by gRPC itself
}


@dataclass
class Rest:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    ok: bool = False
    path: str = INFER
    method: str = "POST"


def _le(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _binary(inputs: list[dict[str, Any]], tail: bytes, **extra: Any) -> tuple[bytes, str]:
    head = json.dumps({"inputs": inputs, **extra}).encode()
    return head + tail, str(len(head))


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def rest_corpus(seed: int = 0) -> list[Rest]:
    rng = random.Random(seed)
    png, jpeg = encoded_images(1, seed=1)[0], encoded_images(1, seed=2, fmt="JPEG")[0]
    b64 = base64.b64encode(png).decode()
    out: list[Rest] = []

    def image(shape: list[int], data: Any, datatype: str = "BYTES", name: str = "image") -> bytes:
        return _json(
            {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}
        )

    def binary(
        name: str, inputs: list[dict[str, Any]], tail: bytes, ok: bool = False, **kw: Any
    ) -> None:
        body, size = _binary(inputs, tail, **kw)
        out.append(Rest(name, body, {"Inference-Header-Content-Length": size}, ok=ok))

    # Valid requests.
    out.append(Rest("valid json", image([1], [b64]), ok=True))
    out.append(Rest("valid json nested", image([2], [[b64], [b64]]), ok=True))
    tail = _le([png, jpeg])
    spec = {"name": "image", "shape": [2], "datatype": "BYTES"}
    binary("valid binary", [{**spec, "parameters": {"binary_data_size": len(tail)}}], tail, ok=True)
    pixels = np.zeros((1, 4, 4, 3), np.uint8).tobytes()
    pspec = {"name": "pixels", "shape": [1, 4, 4, 3], "datatype": "UINT8"}
    binary("valid pixels", [{**pspec, "parameters": {"binary_data_size": 48}}], pixels, ok=True)
    out.append(
        Rest("valid pixels json", image([1, 2, 2, 1], [0, 255, 7, 9], "UINT8", "pixels"), ok=True)
    )
    # Wrong datatypes, shapes, names; missing inputs.
    for dt in ("FP32", "UINT8", "INT64", "STRING", "", "bytes"):
        out.append(Rest(f"datatype image {dt!r}", image([1], [b64], dt)))
    for dt in ("BYTES", "INT32", "FP16"):
        out.append(Rest(f"datatype pixels {dt}", image([1, 1, 1, 1], [1], dt, "pixels")))
    for shape in ([], [1, 1], [2], [0], [-1], [10**12], [1, 2, 3]):
        out.append(Rest(f"shape image {shape}", image(shape, [b64])))
    for shape in ([1, 2, 2], [1, 2, 2, 2], [1, 0, 2, 1], [1, -2, -2, 1], [1, 2, 2, 1, 1]):
        out.append(Rest(f"shape pixels {shape}", image(shape, [1, 2, 3, 4], "UINT8", "pixels")))
    out.append(Rest("pixels out of range", image([1, 1, 2, 1], [3, 256], "UINT8", "pixels")))
    out.append(Rest("pixels not ints", image([1, 1, 2, 1], ["a", None], "UINT8", "pixels")))
    for name in ("images", "", "IMAGE", "pixel"):
        out.append(Rest(f"name {name!r}", image([1], [b64], name=name)))
    out.append(Rest("missing inputs", _json({"inputs": []})))
    out.append(Rest("no inputs key", _json({"id": "x"})))
    out.append(
        Rest("two inputs", _json({"inputs": [json.loads(image([1], [b64]))["inputs"][0]] * 2}))
    )
    out.append(
        Rest("no data", _json({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}))
    )
    out.append(Rest("data not list", image([1], b64)))
    out.append(Rest("data numbers", image([1], [123])))
    out.append(Rest("bad base64", image([1], ["!!!not base64"])))
    out.append(Rest("empty body", b""))
    out.append(Rest("json array", b"[]"))
    out.append(Rest("json broken", b'{"inputs": [{"name": "ima'))
    out.append(Rest("json not utf-8", b'{"inputs": "\xff\xfe"}'))
    # Lying binary lengths.
    good = _le([png])
    one = {"name": "image", "shape": [1], "datatype": "BYTES"}
    binary(
        "binary size too large", [{**one, "parameters": {"binary_data_size": len(good) + 9}}], good
    )
    binary(
        "binary size too small", [{**one, "parameters": {"binary_data_size": len(good) - 9}}], good
    )
    binary("binary size negative", [{**one, "parameters": {"binary_data_size": -1}}], good)
    binary("binary size text", [{**one, "parameters": {"binary_data_size": "12"}}], good)
    binary(
        "element length lies",
        [{**one, "parameters": {"binary_data_size": len(good)}}],
        struct.pack("<I", len(png) + 5) + png,
    )
    binary(
        "element length short",
        [{**one, "parameters": {"binary_data_size": len(good)}}],
        struct.pack("<I", 3) + png,
    )
    binary("truncated prefix", [{**one, "parameters": {"binary_data_size": 2}}], b"\x01\x00")
    binary("pixels size lies", [{**pspec, "parameters": {"binary_data_size": 40}}], pixels[:40])
    binary(
        "unclaimed tail", [{**one, "parameters": {"binary_data_size": len(good)}}], good + b"extra"
    )
    body, _ = _binary([{**one, "parameters": {"binary_data_size": len(good)}}], good)
    for header in (str(len(body) + 10), "-3", "abc", "0", "1"):
        out.append(
            Rest(f"header length {header}", body, {"Inference-Header-Content-Length": header})
        )
    # Non-image bytes.
    for name, data in (
        ("random", rng.randbytes(300)),
        ("text", b"hello, not an image"),
        ("empty image", b""),
        ("png signature only", png[:8]),
    ):
        out.append(Rest(f"nonimage {name}", image([1], [base64.b64encode(data).decode()])))
    # Oversized.
    out.append(Rest("oversized body", image([1], ["A" * (MAX_BODY + 10)])))
    out.append(Rest("too many images", image([MAX_IMAGES + 1], [b64] * (MAX_IMAGES + 1))))
    out.append(Rest("too many pixels", image([1, 2000, 1000, 1], [0], "UINT8", "pixels")))
    binary("oversized declared binary", [{**one, "parameters": {"binary_data_size": 10**12}}], good)
    # Outputs, parameters, models, methods.
    base = json.loads(image([1], [b64]))
    out.append(Rest("unknown output", _json({**base, "outputs": [{"name": "logits"}]})))
    out.append(Rest("output twice", _json({**base, "outputs": [{"name": "ood"}, {"name": "ood"}]})))
    out.append(
        Rest(
            "binary_data not bool",
            _json({**base, "outputs": [{"name": "ood", "parameters": {"binary_data": "yes"}}]}),
        )
    )
    out.append(Rest("timeout bogus", _json({**base, "parameters": {"timeout": "soon"}})))
    out.append(Rest("outputs ok", _json({**base, "outputs": [{"name": "probabilities"}]}), ok=True))
    out.append(Rest("unknown model", image([1], [b64]), path="/v2/models/nope/infer"))
    out.append(
        Rest("unknown version", image([1], [b64]), path=f"/v2/models/{MODEL}/versions/9/infer")
    )
    out.append(Rest("wrong method", b"", method="PUT"))
    # Seeded random bytes in every position.
    for i in range(40):
        blob = rng.randbytes(rng.randint(0, 200))
        where = i % 4
        if where == 0:
            out.append(Rest(f"random body {i}", blob))
        elif where == 1:
            binary(
                f"random tail {i}", [{**one, "parameters": {"binary_data_size": len(blob)}}], blob
            )
        elif where == 2:
            out.append(
                Rest(
                    f"random header {i}",
                    blob,
                    {"Inference-Header-Content-Length": str(rng.randint(0, 220))},
                )
            )
        else:
            flipped = bytearray(body)
            for _ in range(3):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            out.append(
                Rest(
                    f"flipped binary {i}",
                    bytes(flipped),
                    {"Inference-Header-Content-Length": str(len(body) - len(good))},
                )
            )
    return out


def grpc_corpus(seed: int = 0) -> list[tuple[str, Any, bool]]:
    rng = random.Random(seed)
    png = encoded_images(1, seed=3)[0]
    out: list[tuple[str, Any, bool]] = []

    def request(
        name: str,
        datatype: str,
        shape: list[int],
        raw: list[bytes] | None = None,
        model: str = MODEL,
        **contents: Any,
    ) -> Any:
        r = service_pb2.ModelInferRequest(model_name=model)
        t = r.inputs.add(name=name, datatype=datatype, shape=shape)
        for key, values in contents.items():
            getattr(t.contents, key).extend(values)
        if raw is not None:
            r.raw_input_contents.extend(raw)
        return r

    out.append(("valid raw", request("image", "BYTES", [1], [_le([png])]), True))
    out.append(("valid contents", request("image", "BYTES", [1], bytes_contents=[png]), True))
    out.append(
        ("valid pixels", request("pixels", "UINT8", [1, 2, 2, 1], uint_contents=[1, 2, 3, 4]), True)
    )
    out.append(
        ("pixels over 255", request("pixels", "UINT8", [1, 1, 1, 1], uint_contents=[300]), False)
    )
    out.append(("datatype", request("image", "FP32", [1], [_le([png])]), False))
    out.append(("shape", request("image", "BYTES", [1, 1], [_le([png])]), False))
    out.append(("shape count", request("image", "BYTES", [3], [_le([png])]), False))
    out.append(("name", request("images", "BYTES", [1], [_le([png])]), False))
    out.append(("missing inputs", service_pb2.ModelInferRequest(model_name=MODEL), False))
    two = request("image", "BYTES", [1], [_le([png])])
    two.raw_input_contents.append(b"x")
    out.append(("raw count", two, False))
    out.append(
        ("length lies", request("image", "BYTES", [1], [struct.pack("<I", 10**9) + png]), False)
    )
    out.append(("unclaimed", request("image", "BYTES", [1], [_le([png]) + b"zz"]), False))
    out.append(("nonimage", request("image", "BYTES", [1], [_le([b"nope"])]), False))
    out.append(
        (
            "too many",
            request("image", "BYTES", [MAX_IMAGES + 1], [_le([png] * (MAX_IMAGES + 1))]),
            False,
        )
    )
    out.append(("too many pixels", request("pixels", "UINT8", [1, 2000, 1000, 1], [b""]), False))
    out.append(
        ("oversized", request("image", "BYTES", [1], [_le([b"\0" * (MAX_BODY + 1)])]), False)
    )
    out.append(("unknown model", request("image", "BYTES", [1], [_le([png])], model="nope"), False))
    bad_output = request("image", "BYTES", [1], [_le([png])])
    bad_output.outputs.add(name="logits")
    out.append(("unknown output", bad_output, False))
    for i in range(20):
        out.append(
            (
                f"random raw {i}",
                request("image", "BYTES", [rng.randint(0, 3)], [rng.randbytes(rng.randint(0, 64))]),
                False,
            )
        )
    return out


@pytest.fixture(scope="module")
def server(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    proc = start_server(
        tiny_bundle,
        tmp_path_factory.mktemp("oip-fuzz") / "server.log",
        grpc_port=port,
        max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES,
        max_image_pixels=MAX_PIXELS,
    )
    yield proc, port
    proc.stop()


def _judge(payload: Rest, r: httpx.Response) -> str:
    if r.status_code >= 500:
        return f"5xx {r.status_code}: {r.text[:200]}"
    if r.status_code == 200:
        if not payload.ok:
            return "200 for a request that must fail"
        return "" if r.json().get("outputs") else "200 without outputs"
    if payload.ok or not 400 <= r.status_code < 500:
        return f"{r.status_code} for {'a valid' if payload.ok else 'a bad'} request: {r.text[:200]}"
    try:
        body = r.json()
    except ValueError:
        return f"{r.status_code} without JSON: {r.text[:100]!r}"
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)):
        return f"{r.status_code} off-shape: {r.text[:200]}"
    return ""


async def test_v2_rest_fuzz_gets_200_or_4xx(server: tuple[ServerProcess, int]) -> None:
    proc, _ = server
    corpus = rest_corpus()
    assert len(corpus) >= 100 and sum(p.ok for p in corpus) >= 6
    semaphore = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=proc.url, timeout=60) as client:

        async def one(p: Rest) -> tuple[Rest, int, str]:
            async with semaphore:
                r = await client.request(p.method, p.path, content=p.body, headers=p.headers)
                return p, r.status_code, _judge(p, r)

        results = await asyncio.gather(*(one(p) for p in corpus))
        problems = [f"{p.name}: {why}" for p, _, why in results if why]
        assert not problems, "\n".join(problems[:30])
        statuses = {s for _, s, _ in results}
        assert {200, 400, 404, 405, 413} <= statuses, statuses
        assert proc.process.poll() is None
        assert (await client.get("/v2/health/ready")).status_code == 200
        r = await client.post(
            "/predict", content=encoded_images(1, seed=9)[0], headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 200


def test_grpc_fuzz_gets_ok_or_client_errors(server: tuple[ServerProcess, int]) -> None:
    proc, port = server
    corpus = grpc_corpus()
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, message, ok in corpus:
            try:
                stub.ModelInfer(message, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            codes.append(code)
            assert (code == grpc.StatusCode.OK) == ok, (name, code)
            assert code == grpc.StatusCode.OK or code in GRPC_CLIENT_ERRORS, (name, code)
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= set(codes)
    assert proc.process.poll() is None
