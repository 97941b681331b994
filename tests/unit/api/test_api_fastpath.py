"""The lean path of the inference routes (``POST /predict``, ``POST /v2/.../infer``) answers
exactly as the FastAPI routes it stands in front of: the same status, body and headers for
answers and for every kind of refusal."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from nacguard.api import create_app
from nacguard.api.fastpath import LeanRoutes
from nacguard.monitoring.tracing import Tracing
from nacguard.settings import Settings
from tests.fixtures.api import PNG, client_for
from tests.fixtures.bundles import encoded_images

_LEAN_PATHS = {
    "/predict",
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{model_version}/infer",
}
# Timings differ from run to run; everything else must not.
_TIMING_HEADERS = {"x-queue-time-ms", "x-inference-time-ms", "content-length"}


@asynccontextmanager
async def _client(
    bundle: Path, *, lean: bool, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(profile=bundle, **overrides), tracing=Tracing())
    if not lean:  # the stack is built at the first call: without the lean path the router serves
        app.user_middleware = [m for m in app.user_middleware if m.cls is not LeanRoutes]
    lean_routes = [m.kwargs["routes"] for m in app.user_middleware if m.cls is LeanRoutes]
    assert [{r.path for r in routes} for routes in lean_routes] == ([_LEAN_PATHS] if lean else [])
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready(30)
        async with client_for(app) as client:
            yield client


def _shape(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in response.headers.items() if k not in _TIMING_HEADERS}
    size = headers.get("inference-header-content-length")
    if size is None:
        return response.status_code, headers, response.json()
    # A v2 answer with binary outputs: its JSON head, then the outputs' bytes.
    head = json.loads(response.content[: int(size)])
    return response.status_code, headers, (head, response.content[int(size) :])


def _v2_body(image: bytes, *, binary_out: bool, size: int | None = None) -> tuple[bytes, str]:
    """A v2 request in the binary tensor data extension; its JSON header's length."""
    tail = struct.pack("<I", len(image)) + image
    header = json.dumps(
        {
            "id": "req-1",
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(tail) if size is None else size},
                }
            ],
            "parameters": {"binary_data_output": binary_out},
        }
    ).encode()
    return header + tail, str(len(header))


async def test_lean_path_answers_as_the_route(tiny_bundle: Path) -> None:
    (png,) = encoded_images(1)
    id_header = {"X-Request-ID": "same-id"}
    requests: list[dict[str, Any]] = [
        {"content": png, "headers": PNG},
        {"content": png, "headers": PNG, "params": {"top_k": "2", "explain": "true"}},
        {"content": png, "headers": PNG, "params": {"top_k": "x"}},
        {"content": png, "headers": PNG, "params": {"top_k": "99"}},
        {"content": png, "headers": PNG, "params": {"model": "nope"}},
        {"content": png, "headers": {**PNG, "X-Priority": "urgent"}},
        {"content": png, "headers": {**PNG, "X-Timeout-Ms": "-1"}},
        {"content": b"not an image", "headers": PNG},
        {"content": png, "headers": {"Content-Type": "text/plain"}},
        {"content": png * 40, "headers": PNG},
        {"json": {"images": ["%%%"]}},
    ]
    answers: dict[bool, list[tuple[int, dict[str, str], Any]]] = {}
    for lean in (True, False):
        async with _client(tiny_bundle, lean=lean, max_body_bytes=4096) as client:
            answers[lean] = []
            for request in requests:
                headers = {**request.pop("headers", {}), **id_header}
                response = await client.post("/predict", headers=headers, **request)
                request["headers"] = headers
                answers[lean].append(_shape(response))
            # Other methods and paths still reach the router.
            assert (await client.get("/predict")).status_code == 405
            assert (await client.post("/predict/", content=png, headers=PNG)).status_code in (
                307,
                404,
            )
    statuses = [status for status, _, _ in answers[True]]
    assert statuses == [200, 200, 422, 422, 404, 422, 422, 400, 415, 413, 422]
    assert answers[True][0][2]["predictions"][0]["nac_score"] is not None
    assert answers[True] == answers[False]


async def test_lean_path_answers_the_v2_infer_routes_as_they_do(tiny_bundle: Path) -> None:
    (png,) = encoded_images(1, seed=4)
    binary, binary_size = _v2_body(png, binary_out=True)
    as_json, json_size = _v2_body(png, binary_out=False)
    short, short_size = _v2_body(png, binary_out=False, size=10**6)
    octet = {"Content-Type": "application/octet-stream"}
    size = "Inference-Header-Content-Length"
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v2/models/fashion-cnn/infer", {"content": binary, "headers": {size: binary_size}}),
        (
            "/v2/models/fashion-cnn/versions/1/infer",
            {"content": as_json, "headers": {size: json_size}},
        ),
        ("/v2/models/fashion-cnn/infer", {"content": short, "headers": {size: short_size}}),
        ("/v2/models/fashion-cnn/infer", {"content": b"{not json"}),
        ("/v2/models/fashion-cnn/infer", {"content": binary, "headers": {size: "x"}}),
        ("/v2/models/nope/infer", {"content": binary, "headers": {size: binary_size}}),
        (
            "/v2/models/fashion-cnn/versions/9/infer",
            {"content": binary, "headers": {size: binary_size}},
        ),
        ("/v2/models/fashion-cnn/infer", {"content": binary * 8, "headers": {size: binary_size}}),
    ]
    answers: dict[bool, list[tuple[int, dict[str, str], Any]]] = {}
    for lean in (True, False):
        async with _client(tiny_bundle, lean=lean, max_body_bytes=4096) as client:
            answers[lean] = []
            for path, request in requests:
                headers = {**octet, **request.get("headers", {}), "X-Request-ID": "same-id"}
                response = await client.post(path, content=request["content"], headers=headers)
                answers[lean].append(_shape(response))
            # Other methods and paths under the prefix still reach the router.
            assert (await client.get("/v2/models/fashion-cnn/infer")).status_code == 405
            assert (await client.post("/v2/models/fashion-cnn/infer/x")).status_code == 404
    statuses = [status for status, _, _ in answers[True]]
    assert statuses == [200, 200, 400, 400, 400, 404, 404, 413]
    head, tail = answers[True][0][2]
    assert [o["name"] for o in head["outputs"]][:2] == ["label", "class_index"] and tail
    assert answers[True] == answers[False]


def test_a_lean_route_takes_the_request_and_string_path_parameters_only() -> None:
    async def endpoint(request: Any, model_name: str, top_k: int) -> Any: ...

    for route in (
        APIRoute("/m/{model_name}", endpoint, methods=["POST"]),
        APIRoute("/m/{model_name}/{top_k:int}", endpoint, methods=["POST"]),
    ):
        with pytest.raises(ValueError, match="takes more than"):
            LeanRoutes(None, [route])  # type: ignore[arg-type]
