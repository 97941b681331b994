"""What only the in-process fallback has: LRU order, its own TTL clock, the review folder's
files, the drift ring's size, and which parts make_store picks without Redis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nacguard.settings import Settings
from nacguard.store import ReviewRecord, make_store
from nacguard.store.base import DRIFT_BUCKET_S, add_counts, drift_buckets_in_window
from nacguard.store.local import (
    LocalDriftWindow,
    LocalResultCache,
    LocalReviewDir,
    NullCache,
    NullReviewSink,
)
from nacguard.store.records import image_extension, safe_name
from tests.fixtures.store_metrics import RecordingMetrics


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rows(folder: Path) -> list[tuple[Path, dict]]:
    """(JSON file, row) of every record in a review folder."""
    return [(meta, json.loads(meta.read_text())) for meta in sorted(folder.glob("*.json"))]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def _record(request_id: str, t: float, image: bytes | None = b"img") -> ReviewRecord:
    return ReviewRecord(request_id, 0.1, "Bag", 8, 0.5, t, image, "image/jpeg")


async def test_lru_evicts_the_least_recently_used() -> None:
    cache = LocalResultCache(max_entries=2, ttl_s=60)
    await cache.put("a", {"v": 1})
    await cache.put("b", {"v": 2})
    assert await cache.get("a") == {"v": 1}  # a is now more recent than b
    await cache.put("c", {"v": 3})
    assert await cache.get("b") is None
    assert await cache.get("a") == {"v": 1}
    assert await cache.get("c") == {"v": 3}
    assert len(cache) == 2


async def test_entries_expire_after_the_ttl() -> None:
    clock, metrics = Clock(), RecordingMetrics()
    cache = LocalResultCache(max_entries=10, ttl_s=5, metrics=metrics, clock=clock)
    await cache.put("a", {"v": 1})
    clock.now += 4.9
    assert await cache.get("a") == {"v": 1}
    clock.now += 0.2
    assert await cache.get("a") is None
    assert len(cache) == 0  # the expired entry is gone, not just hidden
    assert metrics.lookups == [True, False]


def test_zero_entries_is_refused_by_the_lru() -> None:
    with pytest.raises(ValueError, match="NullCache"):
        LocalResultCache(max_entries=0, ttl_s=1)


def test_make_store_without_redis_picks_the_local_parts(tmp_path: Path) -> None:
    store = make_store(Settings(review_dir=tmp_path), "p")
    assert store.backend == "local" and not store.redis_up
    assert isinstance(store.cache, LocalResultCache)
    assert isinstance(store.review, LocalReviewDir)
    assert isinstance(store.drift, LocalDriftWindow)
    bare = make_store(Settings(cache_max_entries=0), "p")
    assert isinstance(bare.cache, NullCache)
    assert isinstance(bare.review, NullReviewSink)


async def test_review_folder_layout(tmp_path: Path) -> None:
    sink = LocalReviewDir(tmp_path, max_records=5, max_image_bytes=10, profile="p")
    await sink.append(_record("../../etc/passwd", 1_700_000_000.5))
    ((meta, row),) = _rows(tmp_path)
    assert meta.name.startswith("1700000000500-")
    assert "/" not in meta.stem and ".." not in meta.stem
    assert row["request_id"] == "../../etc/passwd"
    assert row["image_file"] == meta.stem + ".jpg"
    assert (tmp_path / row["image_file"]).read_bytes() == b"img"
    assert row["time_utc"].startswith("2023-11-14T22:13:20.5")


async def test_review_folder_bound_counts_records_already_on_disk(tmp_path: Path) -> None:
    first = LocalReviewDir(tmp_path, max_records=3, max_image_bytes=10, profile="p")
    for n in range(3):
        await first.append(_record(f"old-{n}", 1000.0 + n))
    # A restarted process finds three records and keeps the bound across both lifetimes.
    second = LocalReviewDir(tmp_path, max_records=3, max_image_bytes=10, profile="p")
    await second.append(_record("new", 2000.0))
    rows = _rows(tmp_path)
    assert sorted(row["request_id"] for _, row in rows) == ["new", "old-1", "old-2"]
    images = [meta.with_suffix(".jpg") for meta, _ in rows]
    # Each record is its JSON + image; the evicted records left nothing behind.
    assert _files(tmp_path) == sorted([meta for meta, _ in rows] + images)


async def test_unwritable_review_folder_drops_records_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    metrics = RecordingMetrics()
    sink = LocalReviewDir(
        blocker / "review", max_records=3, max_image_bytes=10, profile="p", metrics=metrics
    )
    for n in range(3):
        await sink.append(_record(f"r{n}", 1.0))
    assert metrics.reviews == 0
    assert len([r for r in caplog.records if "not writable" in r.getMessage()]) == 1


def test_drift_ring_holds_only_buckets_the_window_can_reach() -> None:
    ring = LocalDriftWindow(window_s=60)
    start = 1_700_000_000.0
    for step in range(500):
        ring.record(np.array([1, 0]), start + step * DRIFT_BUCKET_S)
    now = start + 499 * DRIFT_BUCKET_S
    assert len(ring._buckets) <= len(drift_buckets_in_window(now, 60))
    np.testing.assert_array_equal(ring.counts(now), [len(drift_buckets_in_window(now, 60)), 0])


def test_add_counts_pads_the_shorter_array() -> None:
    total = add_counts(np.array([1, 2]), np.array([1, 1, 1]))
    np.testing.assert_array_equal(total, [2, 3, 1])
    assert total.dtype == np.int64


def test_file_name_helpers() -> None:
    assert image_extension("image/PNG; charset=binary") == "png"
    assert image_extension("application/x-unknown") == "bin"
    assert safe_name("a/b\\c d") == "a_b_c_d"
    assert safe_name("...") == "x"
