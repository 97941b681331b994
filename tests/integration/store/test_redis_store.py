"""The Redis store against real redis-server processes: what it writes (keys, TTLs, stream
entries), the export, fleet drift across two stores, and every way Redis can fail - absent at
start, killed mid-traffic and restarted, hanging - without a call raising or stalling."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
from redis.asyncio import Redis

from nacguard.offline.review_export import ReviewReader, export_review
from nacguard.settings import Settings
from nacguard.store import ReviewRecord, Store, make_store
from nacguard.store.base import DRIFT_BUCKET_S, cache_key, drift_bucket, drift_key
from nacguard.store.link import RedisLink
from nacguard.store.redis_backend import DRIFT_EXPIRY_MARGIN_S, RedisResultCache
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.store_metrics import RecordingMetrics

pytestmark = pytest.mark.redis

PROFILE = "fashion-mnist@0123abcd"
SHA = "9f" * 32
T = TypeVar("T")

# The calls below must come back within this, whatever Redis does. It is 10x the configured
# timeout: a miss here means a call waited on Redis, not that the machine was slow.
TIMEOUT_S = 0.2
BOUND_S = 2.0


async def bounded(call: Awaitable[T]) -> T:
    """``await call``, failing the test if it stalls."""
    async with asyncio.timeout(BOUND_S):
        return await call


async def eventually(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    """Wait (polling the event loop) until ``condition()`` holds."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


def _settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "redis_timeout_s": TIMEOUT_S,
        "review_maxlen": 50,
        "review_max_image_bytes": 16,
        "drift_window_s": 60.0,
    }
    values.update(overrides)
    return Settings(**values)


def _record(n: int, image: bytes | None = b"\x89PNG-tiny") -> ReviewRecord:
    return ReviewRecord(f"req-{n}", 0.25, "Sandal", 5, 0.5, 1_700_000_000.0 + n, image, "image/png")


@pytest.fixture
async def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
async def store(redis_server: RedisServer, metrics: RecordingMetrics) -> AsyncIterator[Store]:
    # A generous timeout for the tests about content; resilience tests build their own.
    s = make_store(_settings(redis_server.url, redis_timeout_s=2.0), PROFILE, metrics)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


# --- what is written -----------------------------------------------------------------------


async def test_cache_entry_key_and_ttl(store: Store, redis_server: RedisServer) -> None:
    await store.cache.put(SHA, {"label": "Bag"})
    key = cache_key(PROFILE, SHA)
    assert key == f"nacguard:cache:{PROFILE}:{SHA}"
    raw = redis_server.client()
    assert json.loads(raw.get(key)) == {"label": "Bag"}
    assert 0 < raw.pttl(key) <= Settings().cache_ttl_s * 1000


async def test_cache_entry_expires_by_redis_ttl(redis_server: RedisServer) -> None:
    link = RedisLink(redis_server.url, timeout_s=2.0)
    await link.start()
    try:
        cache = RedisResultCache(link, PROFILE, ttl_s=0.05)
        await cache.put(SHA, {"label": "Bag"})
        assert 0 < redis_server.client().pttl(cache_key(PROFILE, SHA)) <= 50
        # Redis expires the key by itself: wait for that, bounded.
        deadline = time.monotonic() + 5
        while await cache.get(SHA) is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert redis_server.client().exists(cache_key(PROFILE, SHA)) == 0
    finally:
        await link.close()


async def test_stream_entry_fields(store: Store, redis_server: RedisServer) -> None:
    await store.review.append(_record(1))
    await store.review.append(_record(2, image=b"x" * 17))  # over the 16-byte cap
    (id1, small), (_, large) = redis_server.client().xrange("nacguard:ood")
    assert small == {
        b"request_id": b"req-1",
        b"profile": PROFILE.encode(),
        b"model": b"",  # a store made without the model repository's names
        b"version": b"0",
        b"label": b"Sandal",
        b"class_index": b"5",
        b"score": b"0.25",
        b"threshold": b"0.5",
        b"time": b"1700000001.0",
        b"content_type": b"image/png",
        b"image_size": b"9",
        b"image": b"\x89PNG-tiny",
    }
    assert b"image" not in large and large[b"image_size"] == b"17"
    assert int(id1.split(b"-")[0]) > 0  # Redis assigned the id


async def test_stream_length_stays_near_its_bound(store: Store, redis_server: RedisServer) -> None:
    for n in range(400):
        await store.review.append(_record(n, image=None))
    length = redis_server.client().xlen("nacguard:ood")
    assert 50 <= length <= 50 + 100  # MAXLEN ~ 50, trimmed by whole 100-entry nodes


async def test_fleet_drift_sums_two_replicas(redis_server: RedisServer) -> None:
    settings = _settings(redis_server.url, redis_timeout_s=2.0)
    a, b = make_store(settings, PROFILE), make_store(settings, PROFILE)
    async with a, b:
        now = time.time()
        await a.drift.add(np.array([1, 0, 2]), now)
        await b.drift.add(np.array([0, 4, 1]), now)
        await b.drift.add(np.array([1, 0, 0]), now - 5)
        for replica in (a, b):
            result = await replica.drift.read(now)
            assert result.scope == "fleet"
            np.testing.assert_array_equal(result.counts, [2, 4, 3])
    ttl = redis_server.client().ttl(drift_key(PROFILE, drift_bucket(now)))
    assert 60 < ttl <= 60 + DRIFT_BUCKET_S + DRIFT_EXPIRY_MARGIN_S


# --- export --------------------------------------------------------------------------------


async def test_export_snapshot_writes_images_and_index(
    store: Store, redis_server: RedisServer, tmp_path: Path
) -> None:
    await store.review.append(_record(1))
    await store.review.append(_record(2, image=None))
    result = await export_review(redis_server.url, tmp_path)
    assert (result.exported, result.images) == (2, 1)
    rows = json.loads(result.index_json.read_text())
    assert [r["request_id"] for r in rows] == ["req-1", "req-2"]
    assert (tmp_path / rows[0]["image_file"]).read_bytes() == b"\x89PNG-tiny"
    assert rows[0]["image_file"].endswith(".png") and rows[1]["image_file"] is None
    with result.index_csv.open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["id"] for r in csv_rows] == [r["id"] for r in rows]
    assert csv_rows[1]["image_file"] == ""
    assert redis_server.client().xlen("nacguard:ood") == 2  # a snapshot leaves the stream


async def test_export_with_group_exports_each_entry_once(
    store: Store, redis_server: RedisServer, tmp_path: Path
) -> None:
    for n in range(5):
        await store.review.append(_record(n))
    first = await export_review(redis_server.url, tmp_path, group="review", count=3)
    assert first.exported == 3
    second = await export_review(redis_server.url, tmp_path, group="review")
    assert second.exported == 2
    third = await export_review(redis_server.url, tmp_path, group="review")
    assert third.exported == 0
    rows = json.loads((tmp_path / "index.json").read_text())
    assert [r["request_id"] for r in rows] == [f"req-{n}" for n in range(5)]
    assert redis_server.client().xpending("nacguard:ood", "review")["pending"] == 0


async def test_unacknowledged_entries_are_exported_by_the_next_run(
    store: Store, redis_server: RedisServer, tmp_path: Path
) -> None:
    for n in range(3):
        await store.review.append(_record(n))
    client = Redis.from_url(redis_server.url)
    try:
        reader = ReviewReader(client, stream="nacguard:ood", group="g", consumer="c")
        await reader.ensure_group()
        await reader.ensure_group()  # idempotent
        taken = await reader.read_new(2)  # delivered, then the reader "crashes": no ack
        assert [e.record.request_id for e in taken] == ["req-0", "req-1"]
    finally:
        await client.aclose()
    result = await export_review(redis_server.url, tmp_path, group="g", consumer="c")
    assert result.exported == 3
    assert redis_server.client().xpending("nacguard:ood", "g")["pending"] == 0


# --- failures ------------------------------------------------------------------------------


async def _exercise(store: Store, n: int) -> None:
    """One request's worth of store traffic; every call bounded."""
    await bounded(store.cache.get(f"{n:064x}"))
    await bounded(store.cache.put(f"{n:064x}", {"n": n}))
    await bounded(store.review.append(_record(n)))
    await bounded(store.drift.add(np.array([1, 0]), time.time()))


async def test_redis_absent_at_start_then_arriving(
    redis_server: RedisServer, metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.stop()
    store = make_store(_settings(redis_server.url), PROFILE, metrics, health_interval_s=0.05)
    await bounded(store.start())
    try:
        assert not store.redis_up and metrics.up == [False]
        for n in range(5):
            await _exercise(store, n)
        assert metrics.lookups == [False] * 5
        assert metrics.errors == []  # skipped while down, not attempted
        window = await bounded(store.drift.read(time.time()))
        assert window.scope == "local" and window.counts.tolist() == [5, 0]
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1

        redis_server.start()
        await eventually(lambda: store.redis_up)
        assert metrics.up == [False, True]
        await store.cache.put(SHA, {"label": "Bag"})
        assert await store.cache.get(SHA) == {"label": "Bag"}
        assert (await store.drift.read(time.time())).scope == "fleet"
    finally:
        await store.close()


async def test_redis_killed_mid_traffic_then_restarted(
    redis_server: RedisServer, metrics: RecordingMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nacguard.store")
    store = make_store(_settings(redis_server.url), PROFILE, metrics, health_interval_s=0.05)
    await store.start()
    try:
        await store.cache.put(SHA, {"label": "Bag"})
        assert await store.cache.get(SHA) == {"label": "Bag"}
        await store.drift.add(np.array([0, 3]), time.time())

        redis_server.stop(kill=True)
        for n in range(20):
            await _exercise(store, n)
        assert not store.redis_up
        assert metrics.up == [True, False]
        assert metrics.errors  # the failing call was counted...
        assert len(metrics.errors) < 20  # ...and later ones were not even attempted
        # Drift falls back to this replica's own window, which saw every add.
        window = await bounded(store.drift.read(time.time()))
        assert window.scope == "local" and window.counts.tolist() == [20, 3]
        went_away = [r for r in caplog.records if "went away" in r.getMessage()]
        assert len(went_away) == 1 and went_away[0].levelno == logging.WARNING

        redis_server.start()  # same port, empty
        await eventually(lambda: store.redis_up)
        assert metrics.up == [True, False, True]
        assert len([r for r in caplog.records if "is back" in r.getMessage()]) == 1
        assert await store.cache.get(SHA) is None  # the restarted server is empty
        await store.cache.put(SHA, {"label": "Coat"})
        assert await store.cache.get(SHA) == {"label": "Coat"}
        errors_after_recovery = len(metrics.errors)
        for n in range(5):
            await _exercise(store, n)
        assert len(metrics.errors) == errors_after_recovery
    finally:
        await store.close()


async def test_hanging_redis_at_start_is_bounded(
    hanging_redis_url: str, metrics: RecordingMetrics
) -> None:
    store = make_store(_settings(hanging_redis_url), PROFILE, metrics)
    await bounded(store.start())
    try:
        assert not store.redis_up and metrics.up == [False]
        for n in range(3):
            await _exercise(store, n)
        assert await bounded(store.cache.get(SHA)) is None
    finally:
        await bounded(store.close())


async def test_rejected_command_counts_an_error_but_keeps_redis_up(
    store: Store, redis_server: RedisServer, metrics: RecordingMetrics
) -> None:
    redis_server.client().set("nacguard:ood", "another program's string")
    for n in range(3):
        await store.review.append(_record(n))  # XADD on a string: WRONGTYPE
    assert metrics.errors == ["review_append"] * 3 and metrics.reviews == 0
    assert store.redis_up
    await store.cache.put(SHA, {"label": "Bag"})
    assert await store.cache.get(SHA) == {"label": "Bag"}


def _hang(server: RedisServer, seconds: float) -> threading.Thread:
    """Make the real server hang (``DEBUG SLEEP``) from a thread; returns once it is hung."""
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=seconds + 5)
    thread = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", seconds))
    thread.start()
    deadline = time.monotonic() + 5
    while True:  # hung = a PING gets no answer within 50 ms
        with socket.create_connection(("127.0.0.1", server.port), timeout=1) as probe:
            probe.settimeout(0.05)
            probe.sendall(b"PING\r\n")
            try:
                probe.recv(16)
            except TimeoutError:
                return thread
        assert time.monotonic() < deadline, "DEBUG SLEEP did not take effect"


async def test_redis_hanging_mid_traffic_is_bounded_and_recovers(
    redis_server: RedisServer, metrics: RecordingMetrics
) -> None:
    store = make_store(_settings(redis_server.url), PROFILE, metrics, health_interval_s=0.05)
    await store.start()
    try:
        assert store.redis_up
        sleeper = await asyncio.to_thread(_hang, redis_server, 1.0)
        assert await bounded(store.cache.get(SHA)) is None
        assert not store.redis_up
        assert metrics.errors == ["cache_get"]
        for n in range(3):
            await _exercise(store, n)
        await asyncio.to_thread(sleeper.join)
        await eventually(lambda: store.redis_up)
        await store.cache.put(SHA, {"label": "Bag"})
        assert await store.cache.get(SHA) == {"label": "Bag"}
    finally:
        await store.close()
