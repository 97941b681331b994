"""Every error status of the API, in the one JSON shape, from the one handler."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from nacguard.api import create_app
from nacguard.settings import Settings
from tests.fixtures.api import PNG, Api, ApiFactory, client_for, multipart, until
from tests.fixtures.bundles import encoded_images


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert r.headers["X-Request-ID"]
    message: str = body["error"]["message"]
    return message


async def _rejections(api: Api, reason: str) -> float:
    text = (await api.client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("nacguard_rejections_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no rejection series for {reason}")


# --- 400 -------------------------------------------------------------------------------------


async def test_400_undecodable_image(api: Api) -> None:
    message = _error(
        await api.client.post("/predict", content=b"not an image", headers=PNG), 400, "bad_image"
    )
    assert "decode" in message
    assert await _rejections(api, "bad_input") == 1


async def test_400_bad_image_fails_only_its_request(make_api: ApiFactory) -> None:
    good = encoded_images(3, seed=101)
    async with make_api(max_batch_size=2, max_wait_ms=10_000) as api:
        first = asyncio.create_task(api.client.post("/predict", content=good[0], headers=PNG))
        await until(lambda: api.queued == 1)
        # A request with one bad image is refused before any of its images is queued...
        bad = await api.client.post("/predict", files=multipart([good[1], b"\x89PNG broken"]))
        assert "image 1" in _error(bad, 400, "bad_image")
        assert api.queued == 1
        # ...so the queued image's batch-mate is the next good request, and both succeed.
        second = await api.client.post("/predict", content=good[2], headers=PNG)
        first_r = await first
    for r in (first_r, second):
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch-Sizes"] == "2"


# --- 413 -------------------------------------------------------------------------------------


async def test_413_declared_body_too_large(make_api: ApiFactory) -> None:
    async with make_api(max_body_bytes=4096) as api:
        r = await api.client.post("/predict", content=b"\0" * 5000, headers=PNG)
        assert "body" in _error(r, 413, "payload_too_large")
        assert await _rejections(api, "too_large") == 1


async def test_413_streamed_body_too_large_without_content_length(make_api: ApiFactory) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1024
            yield b"\0" * 1024

    async with make_api(max_body_bytes=4096) as api:
        r = await api.client.post("/predict", content=chunks(), headers=PNG)
        _error(r, 413, "payload_too_large")
    # Refused as soon as the limit was passed: the server stopped reading after the fifth KiB
    # (the client may have one chunk in flight), not after all 100.
    assert 5 * 1024 <= sent <= 7 * 1024, sent


async def test_413_too_many_images(make_api: ApiFactory) -> None:
    images = encoded_images(3, seed=111)
    async with make_api(max_images_per_request=2) as api:
        r = await api.client.post("/predict", files=multipart(images))
        assert "more than 2 images" in _error(r, 413, "payload_too_large")
        payload = {"images": [base64.b64encode(d).decode() for d in images]}
        _error(await api.client.post("/predict", json=payload), 413, "payload_too_large")


async def test_413_image_bytes_and_pixels(make_api: ApiFactory) -> None:
    (big,) = encoded_images(1, kind="uniform", seed=121, size=64)
    assert len(big) > 1000
    (small,) = encoded_images(1, seed=122)
    async with make_api(max_image_bytes=1000, max_image_pixels=28 * 28 - 1) as api:
        r = await api.client.post("/predict", content=big, headers=PNG)
        assert "bytes" in _error(r, 413, "payload_too_large")
        payload = {"images": [base64.b64encode(big).decode()]}
        _error(await api.client.post("/predict", json=payload), 413, "payload_too_large")
        r = await api.client.post("/predict", content=small, headers=PNG)
        assert "pixels" in _error(r, 413, "payload_too_large")


# --- 415 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "image/svg+xml", "application/xml"])
async def test_415_content_types(api: Api, content_type: str) -> None:
    (image,) = encoded_images(1, seed=131)
    r = await api.client.post("/predict", content=image, headers={"Content-Type": content_type})
    _error(r, 415, "unsupported_media_type")


async def test_415_missing_content_type(api: Api) -> None:
    (image,) = encoded_images(1, seed=132)
    r = await api.client.post("/predict", content=image)
    _error(r, 415, "unsupported_media_type")


async def test_415_image_format_not_allowed(make_api: ApiFactory) -> None:
    (jpeg,) = encoded_images(1, seed=133, fmt="JPEG")
    async with make_api(allowed_formats=["PNG"]) as api:
        r = await api.client.post("/predict", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert "JPEG" in _error(r, 415, "unsupported_media_type")
        assert await _rejections(api, "unsupported") == 1


# --- 422 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"images": ["@@@not base64@@@"]}',
        b'{"images": []}',
        b'{"images": "abc"}',
        b'{"images": [1]}',
        b'{"images": ["aGk="], "extra": 1}',
        b"[]",
    ],
)
async def test_422_malformed_json(api: Api, body: bytes) -> None:
    r = await api.client.post(
        "/predict", content=body, headers={"Content-Type": "application/json"}
    )
    _error(r, 422, "invalid_request")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n\r\n"),
        ("multipart/form-data; boundary=xyz", b"garbage without boundaries"),
        ("multipart/form-data; boundary=xyz", b"--xyz--\r\n"),
    ],
)
async def test_422_malformed_multipart(api: Api, content_type: str, body: bytes) -> None:
    r = await api.client.post("/predict", content=body, headers={"Content-Type": content_type})
    _error(r, 422, "invalid_request")


@pytest.mark.parametrize("query", ["top_k=11", "top_k=-1", "top_k=abc", "top_k=1001"])
async def test_422_top_k_out_of_range(api: Api, query: str) -> None:
    (image,) = encoded_images(1, seed=141)
    r = await api.client.post(f"/predict?{query}", content=image, headers=PNG)
    assert "top_k" in _error(r, 422, "invalid_request")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
async def test_422_bad_timeout_header(api: Api, value: str) -> None:
    (image,) = encoded_images(1, seed=142)
    r = await api.client.post("/predict", content=image, headers={**PNG, "X-Timeout-Ms": value})
    _error(r, 422, "invalid_request")


# --- 429 / 504 -------------------------------------------------------------------------------


async def test_429_queue_full_then_504_deadline(make_api: ApiFactory) -> None:
    images = encoded_images(3, seed=151)
    async with make_api(max_queue_images=2, max_wait_ms=10_000, retry_after_s=1.5) as api:
        # Two images wait for batch-mates (max_batch_size 64 and a 10 s wait) and fill the queue.
        waiting = asyncio.create_task(
            api.client.post(
                "/predict", files=multipart(images[:2]), headers={"X-Timeout-Ms": "300"}
            )
        )
        await until(lambda: api.queued == 2)
        r = await api.client.post("/predict", content=images[2], headers=PNG)
        _error(r, 429, "overloaded")
        assert r.headers["Retry-After"] == "2"  # 1.5 s rounded up to whole seconds
        # The waiting request's deadline passes before any batch forms: 504, nothing computed.
        _error(await waiting, 504, "deadline_exceeded")
        assert await _rejections(api, "queue_full") == 1
        assert await _rejections(api, "deadline") == 1
        # Neither request's images were ever computed.
        metrics = (await api.client.get("/metrics")).text
        assert "nacguard_batch_size_images_count{" not in metrics


async def test_timeout_header_is_capped_by_settings(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=152)
    async with make_api(max_wait_ms=10_000, request_timeout_s=0.2) as api:
        started = time.monotonic()
        r = await api.client.post("/predict", content=image, headers={**PNG, "X-Timeout-Ms": "1e9"})
        _error(r, 504, "deadline_exceeded")
        assert time.monotonic() - started < 5  # the 0.2 s cap applied, not the 10 s wait


# --- 503 -------------------------------------------------------------------------------------


async def test_503_while_starting(tiny_bundle: Path) -> None:
    app = create_app(Settings(profile=tiny_bundle))  # lifespan not run: nothing loaded
    (image,) = encoded_images(1, seed=161)
    async with client_for(app) as client:
        r = await client.post("/predict", content=image, headers=PNG)
        _error(r, 503, "not_ready")
        assert r.headers["Retry-After"] == "1"
        _error(await client.get("/readyz"), 503, "not_ready")
        _error(await client.get("/metrics"), 503, "not_ready")
        _error(await client.get("/v1/profile"), 503, "not_ready")
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["ready"] is False


async def test_503_while_draining(api: Api) -> None:
    (image,) = encoded_images(1, seed=162)
    api.service.begin_drain()
    r = await api.client.post("/predict", content=image, headers=PNG)
    _error(r, 503, "shutting_down")
    assert r.headers["Retry-After"] == "1"
    _error(await api.client.get("/readyz"), 503, "shutting_down")
    assert (await api.client.get("/healthz")).json()["draining"] is True
    assert await _rejections(api, "shutting_down") == 2


async def test_503_when_the_profile_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "bundle.json").write_text('{"schema_version": 999}')
    app = create_app(Settings(profile=tmp_path))
    fatal: list[BaseException] = []
    app.state.service.on_fatal = fatal.append
    async with app.router.lifespan_context(app), client_for(app) as client:
        with pytest.raises(Exception, match="schema version"):
            await app.state.service.wait_ready(10)
        message = _error(await client.get("/readyz"), 503, "not_ready")
        assert "schema version" in message
    assert len(fatal) == 1


# --- 404 / 405 / 500 -------------------------------------------------------------------------


async def test_404_and_405_use_the_error_shape(api: Api) -> None:
    _error(await api.client.get("/nope"), 404, "not_found")
    r = await api.client.get("/predict")
    _error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]


async def test_500_hides_the_exception(api: Api) -> None:
    async def explode() -> None:
        raise RuntimeError("secret internal detail")

    api.app.add_api_route("/explode", explode)
    r = await api.client.get("/explode", headers={"X-Request-ID": "boom-1"})
    message = _error(r, 500, "internal_error")
    assert "secret" not in r.text
    assert "Traceback" not in r.text
    assert message == "internal server error"
    assert r.headers["X-Request-ID"] == "boom-1"
