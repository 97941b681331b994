"""The lean ``POST /predict`` path answers exactly as the FastAPI route it stands in front of:
the same status, body and headers for answers and for every kind of refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from nacguard.api import create_app
from nacguard.api.fastpath import PredictFastPath
from nacguard.monitoring.tracing import Tracing
from nacguard.settings import Settings
from tests.fixtures.api import PNG, client_for
from tests.fixtures.bundles import encoded_images

# Timings differ from run to run; everything else must not.
_TIMING_HEADERS = {"x-queue-time-ms", "x-inference-time-ms", "content-length"}


@asynccontextmanager
async def _client(
    bundle: Path, *, lean: bool, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(profile=bundle, **overrides), tracing=Tracing())
    if not lean:  # the stack is built at the first call: without the lean path the router serves
        app.user_middleware = [m for m in app.user_middleware if m.cls is not PredictFastPath]
    assert any(m.cls is PredictFastPath for m in app.user_middleware) == lean
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready(30)
        async with client_for(app) as client:
            yield client


def _shape(response: httpx.Response) -> tuple[int, dict[str, str], Any]:
    headers = {k: v for k, v in response.headers.items() if k not in _TIMING_HEADERS}
    return response.status_code, headers, response.json()


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
