"""Service.drain in-process: readiness fails at once, new work is refused, accepted work (queued
or still uploading) is answered; a drain that runs out of time refuses what is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from tests.fixtures.api import PNG, Api, ApiFactory, until
from tests.fixtures.bundles import encoded_images


def _stalled_upload(data: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose second half is sent only once ``release`` is set (a slow client)."""

    async def body() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        await release.wait()
        yield data[len(data) // 2 :]

    return body()


async def _start_in_flight(
    api: Api, images: list[bytes], release: asyncio.Event
) -> list[asyncio.Task]:
    """Three queued single-image requests and one still uploading, all admitted."""
    tasks = [
        asyncio.create_task(api.client.post("/predict", content=d, headers=PNG)) for d in images[:3]
    ]
    await until(lambda: api.queued == 3)
    tasks.append(
        asyncio.create_task(
            api.client.post("/predict", content=_stalled_upload(images[3], release), headers=PNG)
        )
    )
    await until(lambda: api.service.requests_in_progress == 4)
    return tasks


async def test_drain_answers_accepted_work_and_refuses_new(make_api: ApiFactory) -> None:
    images = encoded_images(5, seed=401)
    release = asyncio.Event()
    # Queued images wait up to 10 s for batch-mates; the drain must not wait for that.
    async with make_api(max_wait_ms=10_000) as api:
        tasks = await _start_in_flight(api, images, release)
        # As the SIGTERM handler does: fail readiness synchronously, then drain.
        api.service.begin_drain()
        drain = asyncio.create_task(api.service.drain(timeout=20))
        assert (await api.client.get("/readyz")).status_code == 503
        refused = await api.client.post("/predict", content=images[4], headers=PNG)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert not drain.done()  # the upload was admitted before the drain: it is waited for
        release.set()
        responses = await asyncio.gather(*tasks)
        assert await drain is True
    for r in responses:
        assert r.status_code == 200, r.text
    # Everything queued ran together once nothing more could arrive.
    assert {r.headers["X-Batch-Sizes"] for r in responses} == {"4"}


async def test_drain_timeout_refuses_what_is_left(make_api: ApiFactory) -> None:
    images = encoded_images(4, seed=411)
    release = asyncio.Event()
    async with make_api(max_wait_ms=10_000) as api:
        tasks = await _start_in_flight(api, images, release)
        started = time.monotonic()
        assert await api.service.drain(timeout=0.3) is False
        assert time.monotonic() - started < 5
        release.set()
        responses = await asyncio.gather(*tasks)
    stalled = responses[3]
    assert stalled.status_code == 503
    assert stalled.json()["error"]["code"] == "shutting_down"
    for r in responses[:3]:
        # Queued requests were either computed when the stop flushed the queue or refused.
        assert r.status_code in {200, 503}, r.text
