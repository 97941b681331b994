"""The store's behaviour, asserted once and run against both backends: the in-process fallback
and a real redis-server. Whatever a replica does alone, it does the same with Redis."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nacguard.settings import Settings
from nacguard.store import ReviewRecord, Store, make_store
from nacguard.store.records import entry_from_fields
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.store_metrics import RecordingMetrics

PROFILE = "fashion-mnist@0123abcd"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


@dataclass
class Harness:
    """A started store plus what it needs to build siblings and to read back what it wrote."""

    backend: str
    settings: Settings
    metrics: RecordingMetrics
    store: Store
    redis: RedisServer | None
    others: list[Store] = field(default_factory=list)

    async def sibling(
        self, profile_id: str, metrics: RecordingMetrics | None = None, **overrides: Any
    ) -> Store:
        """Another store on the same backend (same Redis, when there is one); ``model`` and
        ``version`` among ``overrides`` go to the store, the rest to its settings."""
        model, version = overrides.pop("model", ""), overrides.pop("version", 0)
        settings = self.settings.model_copy(update=overrides)
        store = make_store(settings, profile_id, metrics, model=model, version=version)
        await store.start()
        self.others.append(store)
        return store

    def reviewed(self) -> list[tuple[dict[str, Any], bytes | None]]:
        """(index row, image bytes) of every review record stored, oldest first."""
        if self.redis is not None:
            raw = self.redis.client().xrange(self.settings.review_stream)
            entries = [entry_from_fields(entry_id, fields) for entry_id, fields in raw]
            return [(e.row(None), e.record.image) for e in entries]
        assert self.settings.review_dir is not None
        out = []
        for meta in sorted(self.settings.review_dir.glob("*.json")):
            row = json.loads(meta.read_text())
            image_file = row["image_file"]
            image = (self.settings.review_dir / image_file).read_bytes() if image_file else None
            out.append((row, image))
        return out


def _settings(backend: str, tmp_path: Path, redis: RedisServer | None) -> Settings:
    common: dict[str, Any] = {
        "review_maxlen": 10,
        "review_max_image_bytes": 64,
        "drift_window_s": 60.0,
        "cache_max_entries": 100,
    }
    if backend == "redis":
        assert redis is not None
        # A generous timeout: these tests are about behaviour, not about a slow machine.
        return Settings(redis_url=redis.url, redis_timeout_s=2.0, **common)
    return Settings(review_dir=tmp_path / "review", **common)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    settings = _settings(request.param, tmp_path, redis)
    metrics = RecordingMetrics()
    store = make_store(settings, PROFILE, metrics)
    await store.start()
    h = Harness(request.param, settings, metrics, store, redis)
    try:
        yield h
    finally:
        for other in h.others:
            await other.close()
        await store.close()


def _record(n: int, image: bytes | None = PNG) -> ReviewRecord:
    return ReviewRecord(
        request_id=f"req-{n}",
        score=0.125 + n,
        label="Sandal",
        class_index=5,
        threshold=0.5,
        time=1_700_000_000.25 + n,
        image=image,
        content_type="image/png",
    )


# --- cache ---------------------------------------------------------------------------------


async def test_cache_miss_then_hit_returns_the_same_value(harness: Harness) -> None:
    cache = harness.store.cache
    value = {"label": "Sandal", "nac_score": 0.8125, "probabilities": [0.1, 0.9], "ood": False}
    assert await cache.get("ab" * 32) is None
    await cache.put("ab" * 32, value)
    assert await cache.get("ab" * 32) == value
    assert harness.metrics.lookups == [False, True]


async def test_cache_hit_is_a_copy_the_caller_may_change(harness: Harness) -> None:
    await harness.store.cache.put("cd" * 32, {"probabilities": [0.5, 0.5]})
    first = await harness.store.cache.get("cd" * 32)
    assert first is not None
    first["probabilities"].append(1.0)
    assert await harness.store.cache.get("cd" * 32) == {"probabilities": [0.5, 0.5]}


async def test_cache_is_keyed_by_profile_too(harness: Harness) -> None:
    await harness.store.cache.put("ef" * 32, {"label": "Bag"})
    other = await harness.sibling("another-profile@ffff")
    assert await other.cache.get("ef" * 32) is None
    assert await harness.store.cache.get("ef" * 32) == {"label": "Bag"}


async def test_cache_disabled_stores_and_counts_nothing(harness: Harness) -> None:
    metrics = RecordingMetrics()
    off = await harness.sibling(PROFILE, metrics, cache_enabled=False)
    await off.cache.put("01" * 32, {"label": "Bag"})
    assert await off.cache.get("01" * 32) is None
    assert metrics.lookups == []


async def test_unserialisable_value_is_not_cached_and_does_not_raise(harness: Harness) -> None:
    await harness.store.cache.put("02" * 32, {"bad": object()})
    assert await harness.store.cache.get("02" * 32) is None


# --- drift ---------------------------------------------------------------------------------


async def test_drift_window_sums_the_buckets_within_the_window(harness: Harness) -> None:
    drift, now = harness.store.drift, time.time()
    window = harness.settings.drift_window_s
    await drift.add(np.array([5, 5, 5, 5]), now - window - 30)  # long out of the window
    await drift.add(np.array([1, 2, 0, 0]), now - 1)
    await drift.add(np.array([0, 1, 0, 3]), now)
    np.testing.assert_array_equal(await drift.window(now), [1, 3, 0, 3])
    # A window ending further on no longer reaches the older of the recent adds' buckets.
    later = await drift.window(now + window + 20)
    assert later.sum() == 0


async def test_drift_window_keeps_trailing_empty_bins(harness: Harness) -> None:
    now = time.time()
    await harness.store.drift.add(np.array([2, 0, 0, 0, 0]), now)
    result = await harness.store.drift.read(now)
    np.testing.assert_array_equal(result.counts, [2, 0, 0, 0, 0])
    assert result.samples == 2
    assert result.scope == ("fleet" if harness.backend == "redis" else "local")


async def test_drift_window_of_declared_bins_starts_as_zeros(harness: Harness) -> None:
    store = make_store(harness.settings, "fresh-profile", drift_bins=6)
    await store.start()
    try:
        counts = await store.drift.window(time.time())
    finally:
        await store.close()
    np.testing.assert_array_equal(counts, np.zeros(6, dtype=np.int64))
    assert counts.dtype == np.int64


# --- review --------------------------------------------------------------------------------


async def test_review_records_every_field_and_caps_image_bytes(harness: Harness) -> None:
    small, large = _record(1), _record(2, image=bytes(65))  # cap is 64 bytes
    await harness.store.review.append(small)
    await harness.store.review.append(large)
    (row1, image1), (row2, image2) = harness.reviewed()
    assert image1 == PNG and image2 is None
    for row, rec, size in ((row1, small, len(PNG)), (row2, large, 65)):
        assert row["request_id"] == rec.request_id
        assert row["profile"] == PROFILE
        assert (row["label"], row["class_index"]) == (rec.label, rec.class_index)
        assert (row["score"], row["threshold"], row["time"]) == (rec.score, rec.threshold, rec.time)
        assert row["content_type"] == "image/png"
        assert row["image_size"] == size
    assert harness.metrics.reviews == 2


async def test_review_records_name_the_served_model_and_version(harness: Harness) -> None:
    # The model repository's stores: each served version writes its name into its records.
    shoes = await harness.sibling(PROFILE, model="shoes", version=3)
    await harness.store.review.append(_record(1))
    await shoes.review.append(_record(2))
    rows = {row["request_id"]: row for row, _ in harness.reviewed()}
    assert [(r["model"], r["version"]) for _, r in sorted(rows.items())] == [("", 0), ("shoes", 3)]


async def test_review_is_bounded_and_keeps_the_newest(harness: Harness) -> None:
    appended = 150
    for n in range(appended):
        await harness.store.review.append(_record(n, image=None))
    kept = [row["request_id"] for row, _ in harness.reviewed()]
    bound = harness.settings.review_maxlen
    assert kept[-1] == f"req-{appended - 1}"
    if harness.backend == "local":
        assert kept == [f"req-{n}" for n in range(appended - bound, appended)]
    else:
        # MAXLEN ~ trims whole stream nodes (100 entries each by default), never below bound.
        assert bound <= len(kept) <= bound + 100
