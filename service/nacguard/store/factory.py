"""``Store``: the cache, review sink and drift window of one profile, and ``make_store``, which
picks Redis or the in-process fallback from the settings."""

from __future__ import annotations

import hashlib
from types import TracebackType

from nacguard.settings import Settings
from nacguard.store.base import DriftWindow, ResultCache, ReviewSink, StoreMetrics
from nacguard.store.link import RedisLink
from nacguard.store.local import (
    LocalDriftWindow,
    LocalResultCache,
    LocalReviewDir,
    NullCache,
    NullReviewSink,
)
from nacguard.store.redis_backend import RedisDriftWindow, RedisResultCache, RedisReviewSink
from nacguard.store.worker_drift import WorkerDriftWindow

__all__ = ["Store", "make_store"]


class Store:
    """Shared state of one profile: ``cache``, ``review`` and ``drift``, one backend.

    Build it with :func:`make_store`; ``start()`` before use, ``close()`` at shutdown (or use
    ``async with``). Without Redis, start and close do nothing and the parts work at once.

    Attributes:
        cache: results by image hash.
        review: where flagged images go.
        drift: time-bucketed score-bin counts.
    """

    def __init__(
        self,
        *,
        cache: ResultCache,
        review: ReviewSink,
        drift: DriftWindow,
        link: RedisLink | None = None,
    ) -> None:
        self.cache = cache
        self.review = review
        self.drift = drift
        self._link = link

    @property
    def caching(self) -> bool:
        """Whether results are cached (the cache is on)."""
        return self.cache.enabled

    @property
    def reviewing(self) -> bool:
        """Whether flagged images are recorded for review."""
        return self.review.enabled

    @property
    def backend(self) -> str:
        """``"redis"`` or ``"local"``."""
        return "local" if self._link is None else "redis"

    @property
    def redis_up(self) -> bool:
        """Whether Redis is answering now (always ``False`` for the local backend)."""
        return self._link is not None and self._link.up

    async def start(self) -> None:
        """Connect (bounded by the Redis timeout) and start the health task. Never fails for an
        unreachable Redis: the store starts degraded and recovers when Redis answers."""
        if self._link is not None:
            await self._link.start()

    async def close(self) -> None:
        """Stop the health task and close the connections."""
        if self._link is not None:
            await self._link.close()

    async def __aenter__(self) -> Store:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def make_store(
    settings: Settings,
    profile_id: str,
    metrics: StoreMetrics | None = None,
    *,
    drift_bins: int | None = None,
    health_interval_s: float = 1.0,
    drift_key: str = "",
    model: str = "",
    version: int = 0,
) -> Store:
    """Build the store the settings ask for.

    With ``settings.redis_url``: Redis cache (``cache_ttl_s``), Redis Stream review sink
    (``review_stream``, ``review_maxlen``, ``review_max_image_bytes``) and fleet drift window
    (``drift_window_s``), all bounded by ``redis_timeout_s``. Without it: an LRU cache of
    ``cache_max_entries``, a bounded ``review_dir`` folder (or no review recording when unset),
    and a local drift window (with several workers, one shared by all of them:
    :mod:`nacguard.store.worker_drift`). ``cache_enabled=False`` (or ``cache_max_entries=0`` without
    Redis) switches caching off.

    Args:
        settings: the service settings.
        profile_id: identity of the served profile (e.g. its name and weights sha256). It is
            part of every key, so a new profile never sees an old profile's results or drift.
        metrics: receives cache, Redis and review counts (``Metrics`` fits).
        drift_bins: number of drift score bins (``len(reference.edges) - 1``), when known, so
            an empty window has the right length.
        health_interval_s: how often the health task PINGs a Redis that is down.
        drift_key: which of the process's drift windows this is (the model repository's
            ``model/version/role``), so the workers' shared windows of different versions
            stay apart (without Redis; with Redis ``profile_id`` keys the window).
        model, version: the served version, written into every review record.

    Returns:
        The store; call ``await store.start()`` before use.
    """
    if settings.redis_url is not None:
        link = RedisLink(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            metrics=metrics,
            down_interval_s=health_interval_s,
        )
        cache: ResultCache = (
            RedisResultCache(link, profile_id, ttl_s=settings.cache_ttl_s, metrics=metrics)
            if settings.cache_enabled
            else NullCache()
        )
        return Store(
            cache=cache,
            review=RedisReviewSink(
                link,
                stream=settings.review_stream,
                maxlen=settings.review_maxlen,
                max_image_bytes=settings.review_max_image_bytes,
                profile=profile_id,
                metrics=metrics,
                model=model,
                version=version,
            ),
            drift=RedisDriftWindow(
                link, profile_id, window_s=settings.drift_window_s, n_bins=drift_bins
            ),
            link=link,
        )
    if settings.cache_enabled and settings.cache_max_entries > 0:
        cache = LocalResultCache(
            max_entries=settings.cache_max_entries, ttl_s=settings.cache_ttl_s, metrics=metrics
        )
    else:
        cache = NullCache()
    review: ReviewSink = (
        LocalReviewDir(
            settings.review_dir,
            max_records=settings.review_maxlen,
            max_image_bytes=settings.review_max_image_bytes,
            profile=profile_id,
            metrics=metrics,
            model=model,
            version=version,
        )
        if settings.review_dir is not None
        else NullReviewSink()
    )
    drift: DriftWindow = LocalDriftWindow(settings.drift_window_s, drift_bins)
    if settings.run_dir is not None and settings.worker_count > 1 and drift_bins:
        # Several workers: one window for the replica, merged across them through the shared
        # folder (the result cache stays per worker; the review folder is shared).
        key = hashlib.sha256(drift_key.encode()).hexdigest()[:16]
        drift = WorkerDriftWindow(settings.run_dir, settings.drift_window_s, drift_bins, key=key)
    return Store(cache=cache, review=review, drift=drift, link=None)
