"""In-process backend: what one replica uses without Redis (and, for drift, while Redis is down).

Same behaviour as the Redis backend, scoped to this process: a bounded LRU cache with TTL, a
ring of drift time buckets, and a bounded folder of flagged images.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nacguard.store.base import (
    NullMetrics,
    ReviewRecord,
    StoreMetrics,
    SyncDriftWindow,
    add_counts,
    drift_bucket,
    drift_buckets_in_window,
    encode_cache_value,
)
from nacguard.store.records import (
    REVIEW_MARKS,
    ReviewEntry,
    ReviewItem,
    ReviewMark,
    entry_from_row,
    image_extension,
    safe_name,
)

__all__ = [
    "LocalDriftWindow",
    "LocalResultCache",
    "LocalReviewDir",
    "NullCache",
    "NullReviewSink",
]

logger = logging.getLogger("nacguard.store")

# A stem as _write makes it (time ms, sequence, safe request id): anything else is refused before
# it can name a path.
_STEM = re.compile(r"^[0-9]{13}-[0-9]{6}-[A-Za-z0-9_.-]{1,64}$")
_MARK_SUFFIX = ".mark"


class NullCache:
    """A cache that is off: every lookup misses, nothing is stored, nothing is counted."""

    enabled = False

    async def get(self, image_sha256: str) -> dict | None:
        """Always ``None``."""
        return None

    async def put(self, image_sha256: str, value: dict) -> None:
        """Store nothing."""


class NullReviewSink:
    """Review recording switched off (no Redis and no ``review_dir``)."""

    enabled = False

    async def append(self, record: ReviewRecord) -> None:
        """Drop the record."""


class LocalResultCache:
    """Bounded LRU cache with a TTL, for one process.

    Values are kept as JSON text, as in Redis: a hit returns a fresh dict (callers may mutate
    it) and a value that Redis could not store fails here too, so both backends behave alike.

    Args:
        max_entries: bound on entries; the least recently used go first.
        ttl_s: lifetime of an entry.
        metrics: receives hit/miss counts.
        clock: monotonic seconds (tests pass their own to expire entries without sleeping).
    """

    enabled = True

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float,
        metrics: StoreMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1 (use NullCache to switch caching off)")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._metrics = metrics or NullMetrics()
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, image_sha256: str) -> dict | None:
        """The cached value, or ``None`` when absent or expired."""
        found = self._entries.get(image_sha256)
        value: dict | None = None
        if found is not None:
            expires_at, text = found
            if expires_at > self._clock():
                self._entries.move_to_end(image_sha256)
                value = json.loads(text)
            else:
                del self._entries[image_sha256]
        self._metrics.cache_lookup(value is not None)
        return value

    async def put(self, image_sha256: str, value: dict) -> None:
        """Store ``value`` (JSON-able); evicts the least recently used entry past the bound."""
        text = encode_cache_value(value)
        if text is None:
            return
        self._entries[image_sha256] = (self._clock() + self._ttl_s, text)
        self._entries.move_to_end(image_sha256)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class LocalDriftWindow(SyncDriftWindow):
    """Score-bin counts in a ring of time buckets, summed over a sliding window.

    Args:
        window_s: how far back :meth:`window` sums.
        n_bins: number of score bins, when known up front: an empty window is then
            ``zeros(n_bins)`` instead of an empty array.
    """

    def __init__(self, window_s: float, n_bins: int | None = None) -> None:
        self._window_s = window_s
        self._n_bins = n_bins or 0
        self._buckets: dict[int, np.ndarray] = {}

    @property
    def n_bins(self) -> int:
        """Bins known so far (declared or seen in an added array)."""
        return self._n_bins

    def record(self, bin_counts: np.ndarray, now: float) -> None:
        """Synchronous :meth:`add` (the Redis window mirrors every add here)."""
        counts = np.asarray(bin_counts, dtype=np.int64)
        self._n_bins = max(self._n_bins, len(counts))
        bucket = drift_bucket(now)
        previous = self._buckets.get(bucket)
        self._buckets[bucket] = counts.copy() if previous is None else add_counts(previous, counts)
        # Only buckets the window can still reach are kept: the ring stays window_s/bucket long.
        oldest = drift_buckets_in_window(now, self._window_s).start
        for stale in [b for b in self._buckets if b < oldest]:
            del self._buckets[stale]

    def counts(self, now: float) -> np.ndarray:
        """Synchronous :meth:`window`."""
        total = np.zeros(self._n_bins, dtype=np.int64)
        for bucket in drift_buckets_in_window(now, self._window_s):
            found = self._buckets.get(bucket)
            if found is not None:
                total = add_counts(total, found)
        return total


class LocalReviewDir:
    """A bounded folder of flagged images: ``<stem>.<ext>`` (the bytes, when kept) beside
    ``<stem>.json`` (the same row ``export_review`` writes to its index).

    Stems start with the record time in milliseconds, so name order is age order; past
    ``max_records`` the oldest records are deleted. Files are written on a worker thread, so a
    slow disk delays only the review record, never the event loop.

    Args:
        directory: created if missing.
        max_records: bound on records kept.
        max_image_bytes: images larger than this keep only their metadata.
        profile: profile identity written into each record.
        metrics: ``review_appended`` per record written.
        model, version: the served version written into each record.
    """

    enabled = True

    def __init__(
        self,
        directory: Path,
        *,
        max_records: int,
        max_image_bytes: int,
        profile: str,
        metrics: StoreMetrics | None = None,
        model: str = "",
        version: int = 0,
    ) -> None:
        self._dir = Path(directory)
        self._model, self._version = model, version
        self._max_records = max_records
        self._max_image_bytes = max_image_bytes
        self._profile = profile
        self._metrics = metrics or NullMetrics()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        # Oldest first (appends arrive in time order); read from disk on the first write.
        self._stems: deque[str] | None = None
        self._failing = False

    @property
    def directory(self) -> Path:
        """The folder written to."""
        return self._dir

    async def append(self, record: ReviewRecord) -> None:
        """Write one record; on a disk error log (once until it works again) and drop it."""
        if await asyncio.to_thread(self._write, record):
            self._metrics.review_appended()

    def _scan(self) -> deque[str]:
        self._dir.mkdir(parents=True, exist_ok=True)
        # Every stem counts, so an image orphaned by a crash before its JSON is evicted too.
        return deque(sorted({path.stem for path in self._dir.iterdir() if path.is_file()}))

    def _write(self, record: ReviewRecord) -> bool:
        with self._lock:
            try:
                if self._stems is None:
                    self._stems = self._scan()
                millis = max(0, int(record.time * 1000))
                stem = f"{millis:013d}-{next(self._seq):06d}-{safe_name(record.request_id)}"
                size = len(record.image) if record.image is not None else 0
                image_file: str | None = None
                if record.image is not None and size <= self._max_image_bytes:
                    image_file = f"{stem}.{image_extension(record.content_type)}"
                    (self._dir / image_file).write_bytes(record.image)
                entry = ReviewEntry(
                    id=stem,
                    profile=self._profile,
                    record=record,
                    image_size=size,
                    model=self._model,
                    version=self._version,
                )
                # JSON last: a record whose metadata exists is complete.
                (self._dir / f"{stem}.json").write_text(json.dumps(entry.row(image_file)))
                self._stems.append(stem)
                self._evict()
            except OSError as exc:
                if not self._failing:
                    logger.warning("review folder %s not writable (%s); dropping", self._dir, exc)
                    self._failing = True
                return False
            if self._failing:
                logger.info("review folder %s writable again", self._dir)
                self._failing = False
            return True

    async def recent(self, limit: int) -> list[ReviewItem] | None:
        """The ``limit`` newest records (stems sort by time), newest first."""
        return await asyncio.to_thread(self._read_many, limit, False)

    async def get(self, entry_id: str) -> ReviewItem | None:
        """One record by stem, or ``None``."""
        return await asyncio.to_thread(self._read_one, entry_id)

    async def marked(self, limit: int) -> list[ReviewItem] | None:
        """Up to ``limit`` marked records, newest first."""
        return await asyncio.to_thread(self._read_many, limit, True)

    async def mark(self, entry_id: str, mark: ReviewMark | None) -> bool | None:
        """Write (or, with ``None``, remove) ``<stem>.mark`` beside the record. Eviction deletes
        it with the record (every ``<stem>.*`` goes)."""
        return await asyncio.to_thread(self._write_mark, entry_id, mark)

    def _write_mark(self, entry_id: str, mark: ReviewMark | None) -> bool | None:
        if not _STEM.match(entry_id) or (mark is not None and mark not in REVIEW_MARKS):
            return False
        path = self._dir / f"{entry_id}{_MARK_SUFFIX}"
        with self._lock:  # never races the eviction of this stem
            if not (self._dir / f"{entry_id}.json").is_file():
                return False
            try:
                if mark is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_text(mark)
            except OSError as exc:
                logger.warning("review mark for %s not written: %s", entry_id, exc)
                return None
        return True

    def _read_one(self, stem: str) -> ReviewItem | None:
        if not _STEM.match(stem):
            return None
        try:
            row = json.loads((self._dir / f"{stem}.json").read_text())
        except (OSError, ValueError):
            return None  # evicted meanwhile, never written, or not ours
        if not isinstance(row, dict):
            return None
        image = None
        image_file = row.get("image_file")
        # The file name comes from our own JSON, but a path must never follow from file content.
        if isinstance(image_file, str) and image_file == safe_name(image_file, 128):
            try:
                image = (self._dir / image_file).read_bytes()
            except OSError:
                image = None
        mark: ReviewMark | None = None
        try:
            text = (self._dir / f"{stem}{_MARK_SUFFIX}").read_text().strip()
            mark = next((m for m in REVIEW_MARKS if m == text), None)
        except OSError:
            pass
        return ReviewItem(entry=entry_from_row({**row, "id": stem}, image), mark=mark)

    def _read_many(self, limit: int, marked_only: bool) -> list[ReviewItem]:
        suffix = _MARK_SUFFIX if marked_only else ".json"
        try:
            names = [p.name for p in self._dir.iterdir() if p.name.endswith(suffix)]
        except OSError:
            return []
        stems = sorted((n[: -len(suffix)] for n in names), reverse=True)
        items: list[ReviewItem] = []
        for stem in stems:
            if len(items) >= limit:
                break
            item = self._read_one(stem)
            if item is not None and (item.mark is not None or not marked_only):
                items.append(item)
        return items

    def _evict(self) -> None:
        assert self._stems is not None
        while len(self._stems) > self._max_records:
            stem = self._stems.popleft()
            for path in self._dir.glob(f"{stem}.*"):
                path.unlink(missing_ok=True)
