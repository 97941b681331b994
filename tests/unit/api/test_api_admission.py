"""Admission bound and garbage-collector freeze of the running service.

Requests still reading their body or decoding have not reached the batcher's bounded queue; the
service bounds how many are in progress (``max_queue_images``) so a flood is shed with 429 rather
than piling up before the queue, and sheds before routing, where a rejection is cheap. While serving, the objects loaded at start-up are frozen out of
the collector's full collections (which otherwise stalled every thread for 0.1-0.4 s)."""

from __future__ import annotations

import asyncio
import base64
import gc
from collections.abc import AsyncIterator, Awaitable

import httpx

from tests.fixtures.api import PNG, ApiFactory, until
from tests.fixtures.bundles import encoded_images


async def test_requests_in_progress_beyond_the_queue_bound_get_429(make_api: ApiFactory) -> None:
    first, second, third = encoded_images(3, seed=171)
    release = asyncio.Event()

    async def slow_upload() -> AsyncIterator[bytes]:
        yield first[:10]
        await release.wait()  # the request is admitted, its body still uploading
        yield first[10:]

    async with make_api(max_queue_images=1, retry_after_s=2) as api:
        uploading = asyncio.create_task(
            api.client.post("/predict", content=slow_upload(), headers=PNG)
        )
        await until(lambda: api.service.requests_in_progress == 1)
        assert api.queued == 0  # nothing reached the batcher's queue yet

        r = await api.client.post("/predict", content=second, headers=PNG)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded"
        assert r.headers["Retry-After"] == "2"

        release.set()
        done = await uploading
        assert done.status_code == 200, done.text
        assert len(done.json()["predictions"]) == 1
        # The bound is released with the request: the next one is served.
        r = await api.client.post("/predict", content=third, headers=PNG)
        assert r.status_code == 200, r.text
        assert api.service.requests_in_progress == 0


async def test_a_full_service_sheds_before_routing_and_validation(make_api: ApiFactory) -> None:
    first, second = encoded_images(2, seed=172)
    release = asyncio.Event()

    async def slow_upload() -> AsyncIterator[bytes]:
        yield first[:10]
        await release.wait()
        yield first[10:]

    async with make_api(max_queue_images=1) as api:
        uploading = asyncio.create_task(
            api.client.post("/predict", content=slow_upload(), headers=PNG)
        )
        await until(lambda: api.service.requests_in_progress == 1)
        # An invalid query would be a 422 from validation; shed first, it is a cheap 429.
        r = await api.client.post("/predict?top_k=abc", content=second, headers=PNG)
        assert r.status_code == 429, r.text
        assert r.json() == {
            "error": {"code": "overloaded", "message": "too many requests in progress"}
        }
        assert r.headers["X-Request-ID"]
        # Other endpoints are not shed.
        assert (await api.client.get("/healthz")).status_code == 200
        release.set()
        assert (await uploading).status_code == 200
        r = await api.client.post("/predict?top_k=abc", content=second, headers=PNG)
        assert r.status_code == 422, r.text
        metrics = (await api.client.get("/metrics")).text
        shed = [
            line
            for line in metrics.splitlines()
            if line.startswith("nacguard_rejections_total{") and 'reason="queue_full"' in line
        ]
        assert len(shed) == 1 and shed[0].endswith(" 1.0")


async def test_a_full_service_sheds_v2_infer_before_routing_and_auth(
    make_api: ApiFactory,
) -> None:
    first, second = encoded_images(2, seed=173)
    release = asyncio.Event()
    key = "k-0123456789abcdef-admission"

    async def slow_upload() -> AsyncIterator[bytes]:
        yield first[:10]
        await release.wait()
        yield first[10:]

    async with make_api(max_queue_images=1, retry_after_s=2, api_keys=[key]) as api:
        name = api.service.bundle.name
        paths = [f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"]
        uploading = asyncio.create_task(
            api.client.post("/predict", content=slow_upload(), headers={**PNG, "X-API-Key": key})
        )
        await until(lambda: api.service.requests_in_progress == 1)
        # Without a key the route would answer 401, and the body is not even a v2 request (400):
        # shed first, both infer routes give the protocol's cheap 429.
        for path in paths:
            r = await api.client.post(path, content=b"not json")
            assert r.status_code == 429, r.text
            assert r.json() == {"error": "too many requests in progress"}
            assert r.headers["Retry-After"] == "2" and r.headers["X-Request-ID"]
        # Other v2 routes are not shed.
        assert (await api.client.get("/v2/health/live")).status_code == 200
        release.set()
        assert (await uploading).status_code == 200
        r = await api.client.post(paths[0], content=b"not json")
        assert r.status_code == 401, r.text
        body = {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(second).decode()],
                }
            ]
        }
        r = await api.client.post(paths[1], json=body, headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        metrics = (await api.client.get("/metrics")).text
        shed = [
            line
            for line in metrics.splitlines()
            if line.startswith("nacguard_rejections_total{") and 'reason="queue_full"' in line
        ]
        assert len(shed) == 1 and shed[0].endswith(" 2.0")


async def test_start_up_objects_are_frozen_while_serving(make_api: ApiFactory) -> None:
    assert gc.get_freeze_count() == 0
    async with make_api() as api:
        assert api.service.ready
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


async def test_x_priority_low_is_shed_first_and_high_last(make_api: ApiFactory) -> None:
    images = encoded_images(4, seed=173)
    release = asyncio.Event()

    def slow_upload(data: bytes) -> AsyncIterator[bytes]:
        async def body() -> AsyncIterator[bytes]:
            yield data[:10]
            await release.wait()
            yield data[10:]

        return body()

    def post(data: bytes, priority: str | None = None) -> Awaitable[httpx.Response]:
        headers = {**PNG, **({"X-Priority": priority} if priority else {})}
        return api.client.post("/predict", content=data, headers=headers)

    async with make_api(
        max_queue_images=3, low_priority_share=0.33, normal_priority_share=0.66
    ) as api:
        held = [asyncio.create_task(post(slow_upload(images[0])))]
        await until(lambda: api.service.requests_in_progress == 1)
        # One of two places taken: a low-priority request is refused, before routing.
        refused = await post(images[1], "low")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        held.append(asyncio.create_task(post(slow_upload(images[1]), "normal")))
        await until(lambda: api.service.requests_in_progress == 2)
        # Full for normal traffic (and for requests without the header); high still gets in.
        assert (await post(images[2])).status_code == 429
        assert (await post(images[2], "normal")).status_code == 429
        held.append(asyncio.create_task(post(slow_upload(images[2]), "HIGH")))
        await until(lambda: api.service.requests_in_progress == 3)
        assert (await post(images[3], "high")).status_code == 429
        release.set()
        for task in held:
            assert (await task).status_code == 200
        bad = await post(images[3], "urgent")
        assert bad.status_code == 422, bad.text
        assert "X-Priority" in bad.json()["error"]["message"]
        assert (await post(images[3], "low")).status_code == 200
