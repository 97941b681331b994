"""Two replicas of the app sharing one real Redis: shared cache, review stream, fleet drift; and a
hung Redis that degrades the service instead of stalling it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fixtures.api import PNG, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.redis


async def test_replicas_share_cache_review_and_drift(
    make_api: ApiFactory, redis_server: RedisServer
) -> None:
    images = encoded_images(8, kind="uniform", seed=601)
    async with (
        make_api(redis_url=redis_server.url) as a,
        make_api(redis_url=redis_server.url) as b,
    ):
        first = await a.client.post(
            "/predict", files=multipart(images), headers={"X-Request-ID": "replica-a"}
        )
        assert first.headers["X-Cache-Hits"] == "0"
        # Replica b answers the same images from the cache replica a filled.
        second = await b.client.post("/predict", files=multipart(images))
        assert second.headers["X-Cache-Hits"] == "8"
        assert second.headers["X-Batch-Sizes"] == ""
        assert second.json()["predictions"] == first.json()["predictions"]

        await a.client.get("/v1/drift")  # flushes a's pending drift counts
        drift = (await b.client.get("/v1/drift")).json()
    assert drift["scope"] == "fleet"
    assert drift["samples"] == 8

    flagged = sum(p["ood"] for p in first.json()["predictions"])
    assert flagged > 0
    entries: Any = redis_server.client().xrange("nacguard:ood")
    assert len(entries) == flagged
    assert all(fields[b"request_id"] == b"replica-a" for _, fields in entries)


async def test_hung_redis_degrades_without_stalling(
    make_api: ApiFactory, hanging_redis_url: str
) -> None:
    (image,) = encoded_images(1, seed=611)
    async with make_api(redis_url=hanging_redis_url, redis_timeout_s=0.05) as api:
        started = time.monotonic()
        r = await api.client.post("/predict", content=image, headers=PNG)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 5
        drift = (await api.client.get("/v1/drift")).json()
    assert drift["scope"] == "local"
