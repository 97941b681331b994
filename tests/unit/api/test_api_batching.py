"""Dynamic batching through the API: concurrent requests share batches; big requests split;
the batch sizes are observable in X-Batch-Sizes and in nacguard_batch_size_images."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from nacguard.bundle import load_bundle
from tests.fixtures.api import PNG, ApiFactory, multipart, until
from tests.fixtures.bundles import encoded_images


def _histogram(metrics: str, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram over all its series."""
    count = total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"{name}_(count|sum)\{{.*\}} (\S+)$", line)
        if match:
            if match.group(1) == "count":
                count += float(match.group(2))
            else:
                total += float(match.group(2))
    return count, total


async def test_concurrent_requests_share_one_batch(make_api: ApiFactory) -> None:
    images = encoded_images(4, seed=201)
    # A batch runs when it is full (4) or the oldest image waited 10 s: with four concurrent
    # single-image requests the full batch is what runs, at once.
    async with make_api(max_batch_size=4, max_wait_ms=10_000) as api:
        responses = await asyncio.gather(
            *(api.client.post("/predict", content=d, headers=PNG) for d in images)
        )
        metrics = (await api.client.get("/metrics")).text
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch-Sizes"] == "4"
    # Warm-up batches are not observed; the one real batch is.
    assert _histogram(metrics, "nacguard_batch_size_images") == (1.0, 4.0)


async def test_large_request_is_split_and_reassembled_in_order(
    make_api: ApiFactory, tiny_bundle: Path
) -> None:
    images = encoded_images(5, seed=211) + encoded_images(2, kind="uniform", seed=212)
    files = multipart(images)
    async with make_api(max_batch_size=3, max_wait_ms=0) as api:
        r = await api.client.post("/predict", files=files)
        metrics = (await api.client.get("/metrics")).text
    assert r.status_code == 200, r.text
    assert r.headers["X-Batch-Sizes"] == "3,3,1"
    assert _histogram(metrics, "nacguard_batch_size_images") == (3.0, 7.0)
    bundle = load_bundle(tiny_bundle)
    want = bundle.predict([Image.open(io.BytesIO(d)) for d in images])
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [p.label for p in want]
    assert [p["nac_score"] for p in got] == pytest.approx([p.nac_score for p in want], abs=1e-6)


async def test_batch_buckets_pad_without_changing_scores(make_api: ApiFactory) -> None:
    images = encoded_images(3, seed=221)
    files = multipart(images)
    async with make_api(max_batch_size=8, max_wait_ms=0) as plain:
        want = (await plain.client.post("/predict", files=files)).json()
    async with make_api(max_batch_size=8, max_wait_ms=0, batch_buckets=[4]) as padded:
        r = await padded.client.post("/predict", files=files)
    # Padded to a bucket of 4 for compute; reported and answered as the 3 real images.
    assert r.headers["X-Batch-Sizes"] == "3"
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in want["predictions"]]
    assert [p["nac_score"] for p in got] == pytest.approx(
        [p["nac_score"] for p in want["predictions"]], abs=1e-6
    )


async def test_queue_and_in_flight_gauges_are_read_at_scrape(make_api: ApiFactory) -> None:
    images = encoded_images(2, seed=231)
    async with make_api(max_wait_ms=10_000) as api:
        waiting = asyncio.create_task(
            api.client.post(
                "/predict",
                files=multipart(images),
                headers={"X-Timeout-Ms": "2000"},
            )
        )
        await until(lambda: api.queued == 2)
        metrics = (await api.client.get("/metrics")).text
        assert re.search(r"^nacguard_queue_images\{.*\} 2\.0$", metrics, re.M)
        assert re.search(r"^nacguard_in_flight_images\{.*\} 2\.0$", metrics, re.M)
        waiting.cancel()


async def test_one_runner_per_listed_device(make_api: ApiFactory) -> None:
    images = encoded_images(6, seed=241)
    async with make_api(device="cpu,cpu", max_batch_size=2, max_wait_ms=0) as api:
        assert api.service.devices == ["cpu", "cpu"]
        responses = await asyncio.gather(
            *(api.client.post("/predict", content=d, headers=PNG) for d in images)
        )
    assert all(r.status_code == 200 for r in responses)
