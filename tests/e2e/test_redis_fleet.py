"""Real ``nacguard serve`` processes sharing one real ``redis-server``, checked over loopback HTTP.

* A fleet of two servers: the drift window counts the scores of both (``scope: fleet``), the
  result cache filled by one answers the other, and both append their flagged images to the one
  review stream.
* Redis stopped and restarted (same port) under a steady load: no prediction fails or outlives
  its deadline, ``/metrics`` shows Redis down during the outage and up after it, caching stops
  while Redis is away and resumes once it is back.

State changes are awaited by polling with deadlines; the load is bounded in requests and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import encoded_images
from tests.fixtures.redis_server import RedisServer

__all__: list[str] = []

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    # Skip before the session-scoped bundle is built, not only when the fixture asks for Redis.
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]

T = TypeVar("T")

PNG = {"Content-Type": "image/png"}
STREAM = "nacguard:ood"  # the review_stream default
REQUEST_TIMEOUT_S = 5.0
# Generous: two servers, a load generator and Redis share two loaded cores, and a call that
# overruns this bound marks a healthy Redis down (and drops fleet drift counts).
REDIS_TIMEOUT_S = 1.0
STATE_WITHIN_S = 15.0  # bound on every poll for a state change
_REDIS_UP = re.compile(r"^nacguard_redis_up(?:\{[^}]*\})? (\S+)$", re.M)


def _multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]


async def _poll(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Call ``probe`` until it returns something other than ``None`` (bounded); return that."""
    deadline = time.monotonic() + STATE_WITHIN_S
    while True:
        found = await probe()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"not within {STATE_WITHIN_S}s: {what}"
        await asyncio.sleep(0.05)


async def _redis_up(client: httpx.AsyncClient) -> float | None:
    """The server's ``nacguard_redis_up`` gauge, or ``None`` while it is not exported."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    match = _REDIS_UP.search(r.text)
    return float(match.group(1)) if match else None


async def _wait_redis_up(client: httpx.AsyncClient, up: bool) -> None:
    want = 1.0 if up else 0.0

    async def probe() -> bool | None:
        return True if await _redis_up(client) == want else None

    await _poll(probe, f"nacguard_redis_up {want:g} in /metrics")


async def _wait_cached(redis_server: RedisServer, image: bytes) -> None:
    """Wait until the server's cache put for ``image`` (after its response) is in Redis."""
    pattern = f"nacguard:cache:*:{hashlib.sha256(image).hexdigest()}"
    client = redis_server.client()

    async def probe() -> bool | None:
        keys = await asyncio.to_thread(lambda: list(client.scan_iter(match=pattern)))
        return True if keys else None

    try:
        await _poll(probe, f"a cache key {pattern} in Redis")
    finally:
        client.close()


# --- two servers, one Redis ---------------------------------------------------------------------


@pytest.fixture
def fleet(
    tiny_bundle: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two ``nacguard serve`` processes on one Redis, started side by side."""
    settings: dict[str, Any] = {
        "redis_url": redis_server.url,
        "redis_timeout_s": REDIS_TIMEOUT_S,
        "drift_min_samples": 4,
        "request_timeout_s": REQUEST_TIMEOUT_S,
    }
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(start_server, tiny_bundle, tmp_path / f"server-{name}.log", **settings)
            for name in "ab"
        ]
    servers = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # re-raise a failed start (with its log) after keeping the good one
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


async def test_two_servers_share_drift_cache_and_review_stream(
    fleet: tuple[ServerProcess, ServerProcess], redis_server: RedisServer
) -> None:
    server_a, server_b = fleet
    # Uniform noise: about a third scores below the tiny bundle's threshold, so both servers
    # flag some. Seeds are fixed, so the counts are too.
    images_a = encoded_images(10, kind="uniform", seed=7101)
    images_b = encoded_images(6, kind="uniform", seed=7102)
    assert len(set(images_a + images_b)) == 16  # distinct: no cache hit between the two sets

    async with (
        httpx.AsyncClient(base_url=server_a.url, timeout=30) as a,
        httpx.AsyncClient(base_url=server_b.url, timeout=30) as b,
    ):
        flagged: dict[bytes, int] = {}
        for client, images, request_id in ((a, images_a, "fleet-a"), (b, images_b, "fleet-b")):
            r = await client.post(
                "/predict", files=_multipart(images), headers={"X-Request-ID": request_id}
            )
            assert r.status_code == 200, r.text
            assert r.headers["X-Cache-Hits"] == "0"
            flagged[request_id.encode()] = sum(p["ood"] for p in r.json()["predictions"])
        assert all(flagged.values()), f"each server should flag some noise images: {flagged}"

        # Fleet drift: each server's GET flushes its own pending counts into Redis, so poll both
        # until each reports the scores computed by the whole fleet.
        async def both_drift() -> tuple[dict[str, Any], dict[str, Any]] | None:
            da = (await a.get("/v1/drift")).json()
            db = (await b.get("/v1/drift")).json()
            return (da, db) if da["samples"] == db["samples"] == 16 else None

        reports = await _poll(both_drift, "both servers report the fleet's 16 drift samples")
        for report in reports:
            assert report["scope"] == "fleet"
            assert report["samples"] == 16
            assert report["enough_samples"] is True

        # The review stream holds the flagged images of both servers (appended after the
        # responses, hence the poll).
        redis = redis_server.client()
        try:

            async def stream_filled() -> list[Any] | None:
                length = await asyncio.to_thread(redis.xlen, STREAM)
                if length < sum(flagged.values()):
                    return None
                entries: Any = await asyncio.to_thread(redis.xrange, STREAM)
                return list(entries)

            entries = await _poll(stream_filled, f"{sum(flagged.values())} entries in {STREAM}")
        finally:
            redis.close()
        by_request: dict[bytes, int] = {}
        for _, fields in entries:
            by_request[fields[b"request_id"]] = by_request.get(fields[b"request_id"], 0) + 1
        assert by_request == flagged
        assert len({fields[b"profile"] for _, fields in entries}) == 1  # one profile, one fleet

        # The shared cache: an image computed by A is answered by B without compute.
        (image,) = encoded_images(1, kind="blobs", seed=7103)
        first = await a.post("/predict", content=image, headers=PNG)
        assert first.status_code == 200, first.text
        assert first.headers["X-Cache-Hits"] == "0"
        await _wait_cached(redis_server, image)
        second = await b.post("/predict", content=image, headers=PNG)
        assert second.status_code == 200, second.text
        assert second.headers["X-Cache-Hits"] == "1"
        assert second.headers["X-Batch-Sizes"] == ""  # nothing computed
        assert second.json()["predictions"] == first.json()["predictions"]


# --- Redis stopped and restarted under load -----------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request of the load: what came back and when.

    Attributes:
        status: HTTP status; 0 when the request failed at the transport level.
        error: the transport error or body of a failed request; empty otherwise.
        repeated: whether the image is one the load sends again and again.
        cache_hits: the X-Cache-Hits header (-1 when absent).
        started: monotonic time the request was sent.
        finished: monotonic time its answer was read.
    """

    status: int
    error: str
    repeated: bool
    cache_hits: int
    started: float
    finished: float

    @property
    def elapsed_s(self) -> float:
        """Seconds from sending to the end of the answer."""
        return self.finished - self.started


class Load:
    """A few concurrent clients, each sending one image per request back to back; every other
    request repeats one of a few images (cacheable), the rest send images never sent before.

    Args:
        client: the HTTP client of the server under test.
        repeated: the images sent again and again.
        fresh: images each sent once; their number bounds the load (twice as many requests).
        workers: concurrent clients.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        repeated: list[bytes],
        fresh: list[bytes],
        workers: int = 3,
    ) -> None:
        self.client = client
        self.repeated = repeated
        self.fresh = fresh
        self.samples: list[Sample] = []
        self._next = 0
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"load-{i}") for i in range(workers)
        ]

    @property
    def max_requests(self) -> int:
        """The most requests the load will send."""
        return 2 * len(self.fresh)

    def count(self, since: float, *, repeated_hit: bool = False) -> int:
        """Answered requests sent at or after ``since`` (only cache hits on repeated images
        with ``repeated_hit``)."""
        return sum(
            1
            for s in self.samples
            if s.started >= since and (not repeated_hit or (s.repeated and s.cache_hits > 0))
        )

    async def wait_for(
        self, since: float, n: int, what: str, *, repeated_hit: bool = False
    ) -> None:
        """Wait until ``n`` requests sent since ``since`` are answered (bounded)."""

        async def probe() -> bool | None:
            if self.count(since, repeated_hit=repeated_hit) >= n:
                return True
            assert self._next < self.max_requests, f"load exhausted before: {what}"
            return None

        await _poll(probe, what)

    async def stop(self) -> None:
        """Let in-flight requests finish and stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self) -> None:
        while not self._stop.is_set() and self._next < self.max_requests:
            n = self._next
            self._next += 1
            repeated = n % 2 == 0
            image = self.repeated[(n // 2) % len(self.repeated)] if repeated else self.fresh[n // 2]
            started = time.monotonic()
            try:
                r = await self.client.post("/predict", content=image, headers=PNG)
            except httpx.HTTPError as exc:
                status, error, hits = 0, f"{type(exc).__name__}: {exc}", -1
            else:
                status = r.status_code
                error = "" if status == 200 else r.text
                hits = int(r.headers.get("X-Cache-Hits", "-1"))
            self.samples.append(
                Sample(status, error, repeated, hits, started, finished=time.monotonic())
            )


@pytest.fixture
def redis_server_process(
    tiny_bundle: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[ServerProcess]:
    """One ``nacguard serve`` on the test's Redis, with a 5 s request deadline."""
    server = start_server(
        tiny_bundle,
        tmp_path / "server.log",
        redis_url=redis_server.url,
        redis_timeout_s=REDIS_TIMEOUT_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_under_load_fails_no_prediction(
    redis_server_process: ServerProcess, redis_server: RedisServer
) -> None:
    repeated = encoded_images(4, kind="blobs", seed=7201)
    # Enough for ~10 s of load: a faster server used up 300 (600 requests) before Redis,
    # restarted, had passed its next 1 s health check.
    fresh = encoded_images(2000, kind="uniform", seed=7202)
    (late,) = encoded_images(1, kind="blobs", seed=7203)  # first sent after the recovery
    async with httpx.AsyncClient(base_url=redis_server_process.url, timeout=30) as client:
        await _wait_redis_up(client, True)
        load = Load(client, repeated, fresh)
        try:
            begun = time.monotonic()
            # Before: the repeated images come back from the cache.
            await load.wait_for(begun, 1, "a cache hit before the outage", repeated_hit=True)

            # Outage: stop Redis; the server notices, reports it, and keeps answering.
            stopping = time.monotonic()
            await asyncio.to_thread(redis_server.stop)
            await _wait_redis_up(client, False)
            down_seen = time.monotonic()
            await load.wait_for(down_seen, 20, "20 answers while Redis is down")

            # Back: restart on the same port (empty); the health check finds it again.
            restarting = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            await _wait_redis_up(client, True)
            up_seen = time.monotonic()
            await load.wait_for(up_seen, 1, "a cache hit after the restart", repeated_hit=True)
            await load.wait_for(up_seen, 20, "20 answers after the restart")
        finally:
            await load.stop()

        # Caching resumes: an image new to the restarted (empty) Redis is stored there once
        # computed, and its second request is a hit.
        first = await client.post("/predict", content=late, headers=PNG)
        assert first.status_code == 200, first.text
        assert first.headers["X-Cache-Hits"] == "0"
        await _wait_cached(redis_server, late)
        again = await client.post("/predict", content=late, headers=PNG)
        assert again.status_code == 200, again.text
        assert again.headers["X-Cache-Hits"] == "1"
        assert again.json()["predictions"] == first.json()["predictions"]

    samples = load.samples
    failed = [s for s in samples if s.status != 200]
    assert not failed, f"{len(failed)} of {len(samples)} predictions failed: {failed[:5]}"
    slowest = max(samples, key=lambda s: s.elapsed_s)
    assert slowest.elapsed_s < REQUEST_TIMEOUT_S, f"a prediction outlived its deadline: {slowest}"
    # While Redis was certainly gone (down reported, restart not begun) nothing came from the
    # cache: the repeated images were computed again.
    outage = [s for s in samples if s.started >= down_seen and s.finished <= restarting]
    assert sum(s.repeated for s in outage) >= 5
    assert all(s.cache_hits == 0 for s in outage), [s for s in outage if s.cache_hits]
    assert load.count(stopping) > load.count(restarting) > 0  # load ran through the outage
    assert len(samples) < load.max_requests  # stopped by the test, not by running out
