"""The store's small interface: what the API layer calls, whichever backend answers.

Three parts, each with a Redis implementation (shared by every replica) and an in-process one
(the same behaviour on one machine):

* :class:`ResultCache` - predictions keyed by image hash + profile identity.
* :class:`ReviewSink` - flagged (out-of-distribution) images for a human or a retraining job.
* :class:`DriftWindow` - score-bin counts in time buckets, summed over a sliding window.

No call on any of them raises because a backend is slow or gone: the store degrades instead
(cache miss, local drift window, review record dropped) and says so in metrics and logs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "DRIFT_BUCKET_S",
    "KEY_PREFIX",
    "DriftScope",
    "DriftWindow",
    "NullMetrics",
    "ResultCache",
    "ReviewRecord",
    "ReviewSink",
    "StoreMetrics",
    "SyncDriftWindow",
    "WindowCounts",
    "add_counts",
    "cache_key",
    "drift_bucket",
    "drift_buckets_in_window",
    "drift_key",
    "encode_cache_value",
]

#: Every Redis key the service writes starts with this, so an operator can find (and a shared
#: Redis can hold) them apart from other tenants' keys.
KEY_PREFIX = "nacguard"

#: Width of one drift time bucket. Small enough that a 5-minute window slides smoothly (the
#: window covers between window_s and window_s + one bucket), large enough that a window is a
#: few dozen keys to read.
DRIFT_BUCKET_S = 10

DriftScope = Literal["local", "fleet"]

logger = logging.getLogger("nacguard.store")


class StoreMetrics(Protocol):
    """What the store reports. ``nacguard.monitoring.metrics.Metrics`` provides these methods;
    the store depends only on this protocol, not on that module."""

    def cache_lookup(self, hit: bool) -> None:
        """Count one cache lookup, hit or miss."""

    def redis_error(self, operation: str) -> None:
        """Count one failed Redis call (``operation`` is a short fixed name, e.g. cache_get)."""

    def set_redis_up(self, up: bool) -> None:
        """Set the Redis-reachable gauge."""

    def review_appended(self) -> None:
        """Count one flagged image recorded for review."""


class NullMetrics:
    """Metrics that record nothing, so store code never checks for ``None``."""

    def cache_lookup(self, hit: bool) -> None:
        """Record nothing."""

    def redis_error(self, operation: str) -> None:
        """Record nothing."""

    def set_redis_up(self, up: bool) -> None:
        """Record nothing."""

    def review_appended(self) -> None:
        """Record nothing."""


@dataclass(frozen=True)
class ReviewRecord:
    """One flagged image, as a reviewer or a retraining job will see it.

    Attributes:
        request_id: the request that carried the image (joins the record to access logs).
        score: the NAC score (higher = more in-distribution).
        label: predicted class name.
        class_index: predicted class index.
        threshold: the profile's OOD threshold the score fell below.
        time: when it was scored, unix seconds.
        image: the encoded image bytes, or ``None`` (the sink also drops bytes over its cap).
        content_type: the image's media type, e.g. ``image/png``.
    """

    request_id: str
    score: float
    label: str
    class_index: int
    threshold: float
    time: float
    image: bytes | None = None
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class WindowCounts:
    """Bin counts of a drift window and where they came from.

    Attributes:
        counts: one int64 count per score bin (``DriftReference`` bins), summed over the window.
        scope: ``"fleet"`` when the counts are every replica's (from Redis), ``"local"`` when
            they are this process's own (no Redis, or Redis down).
    """

    counts: np.ndarray
    scope: DriftScope

    @property
    def samples(self) -> int:
        """Number of scores in the window."""
        return int(self.counts.sum())


class ResultCache(Protocol):
    """Predictions by image hash, for one profile.

    Attributes:
        enabled: False for the cache that is off (every lookup misses): callers skip the work.
    """

    enabled: bool

    async def get(self, image_sha256: str) -> dict | None:
        """The cached value for this image, or ``None`` (miss, expired, or backend down)."""
        ...

    async def put(self, image_sha256: str, value: dict) -> None:
        """Cache a JSON-able value for this image (best effort; never raises)."""
        ...


class ReviewSink(Protocol):
    """Where flagged images go.

    Attributes:
        enabled: False when review recording is off (records are dropped).
    """

    enabled: bool

    async def append(self, record: ReviewRecord) -> None:
        """Record one flagged image (best effort; never raises)."""
        ...


class DriftWindow(Protocol):
    """Time-bucketed score-bin counts."""

    async def add(self, bin_counts: np.ndarray, now: float) -> None:
        """Add one batch's bin counts at ``now`` (unix seconds: buckets align across replicas)."""
        ...

    async def window(self, now: float) -> np.ndarray:
        """The bin counts summed over the window that ends at ``now``."""
        ...

    async def read(self, now: float) -> WindowCounts:
        """Like :meth:`window`, also saying whether the counts are fleet-wide or local."""
        ...


class SyncDriftWindow:
    """A drift window kept in this process: the asynchronous :class:`DriftWindow` interface
    over the synchronous ``record`` and ``counts`` a subclass defines (scoped ``local``)."""

    def record(self, bin_counts: np.ndarray, now: float) -> None:
        """Add one batch's bin counts at ``now`` (unix seconds)."""
        raise NotImplementedError

    def counts(self, now: float) -> np.ndarray:
        """The bin counts over the window ending at ``now``."""
        raise NotImplementedError

    async def add(self, bin_counts: np.ndarray, now: float) -> None:
        """Asynchronous :meth:`record`."""
        self.record(bin_counts, now)

    async def window(self, now: float) -> np.ndarray:
        """Asynchronous :meth:`counts`."""
        return self.counts(now)

    async def read(self, now: float) -> WindowCounts:
        """The window, scoped ``local`` (this process, or with workers this replica)."""
        return WindowCounts(self.counts(now), "local")


def encode_cache_value(value: dict) -> str | None:
    """A cache value as compact JSON, or ``None`` (logged) when it is not JSON-able. Both cache
    backends store this text, so they accept and return exactly the same values."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        logger.warning("result not JSON-serialisable; not cached", exc_info=True)
        return None


def cache_key(profile_id: str, image_sha256: str) -> str:
    """Redis key of one cached result: same image + same profile = same key."""
    return f"{KEY_PREFIX}:cache:{profile_id}:{image_sha256}"


def drift_key(profile_id: str, bucket: int) -> str:
    """Redis key (a hash: bin index -> count) of one drift time bucket."""
    return f"{KEY_PREFIX}:drift:{profile_id}:{bucket}"


def drift_bucket(now: float) -> int:
    """The time bucket ``now`` (unix seconds) falls in."""
    return math.floor(now / DRIFT_BUCKET_S)


def drift_buckets_in_window(now: float, window_s: float) -> range:
    """Buckets summed by the window that ends at ``now``: those touching ``[now-window_s, now]``.

    Both backends use this, so a local window and a fleet window of one replica agree.
    """
    return range(drift_bucket(now - window_s), drift_bucket(now) + 1)


def add_counts(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``total + counts`` as int64, padding the shorter with zeros (a window may start empty)."""
    size = max(len(total), len(counts))
    out = np.zeros(size, dtype=np.int64)
    out[: len(total)] += total
    out[: len(counts)] += counts.astype(np.int64, copy=False)
    return out
