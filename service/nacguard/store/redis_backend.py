"""Redis backend: the state every replica shares.

Keys (``<profile>`` is the profile identity passed to ``make_store``):

* ``nacguard:cache:<profile>:<sha256>`` - string, the prediction as JSON, ``PX`` = cache TTL.
* ``nacguard:drift:<profile>:<bucket>`` - hash ``{bin index: count, "n": number of bins}``,
  one per 10-second bucket, expiring a margin after it leaves the drift window.
* ``<review_stream>`` (default ``nacguard:ood``) - stream of flagged images, ``MAXLEN ~``.
* ``<review_stream>:marks`` - hash ``{entry id: "ind" | "ood"}``, the operator's marks; marks of
  entries trimmed off the stream are dropped when the marked set is read.

All calls go through :class:`~nacguard.store.link.RedisLink`, so none of them raises or stalls.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, cast

import numpy as np
from redis.asyncio import Redis

from nacguard.store.base import (
    DRIFT_BUCKET_S,
    NullMetrics,
    ReviewRecord,
    StoreMetrics,
    WindowCounts,
    add_counts,
    cache_key,
    drift_bucket,
    drift_buckets_in_window,
    drift_key,
    encode_cache_value,
)
from nacguard.store.link import RedisLink
from nacguard.store.local import LocalDriftWindow
from nacguard.store.records import (
    REVIEW_MARKS,
    ReviewItem,
    ReviewMark,
    entry_from_fields,
    stream_fields,
)

__all__ = [
    "DRIFT_EXPIRY_MARGIN_S",
    "REVIEW_PAGE",
    "RedisDriftWindow",
    "RedisResultCache",
    "RedisReviewSink",
]

logger = logging.getLogger("nacguard.store")

#: Drift buckets live this long past the end of the window, so replicas whose clocks differ by
#: less than this still see each other's buckets.
DRIFT_EXPIRY_MARGIN_S = 30

_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")

#: Review entries read per Redis round trip by the operator page's reads: each may carry an
#: image of up to review_max_image_bytes, and one call must stay well inside the Redis timeout.
REVIEW_PAGE = 25
_RawEntry = tuple[bytes, dict[bytes, bytes]]


class RedisResultCache:
    """Predictions shared by all replicas, with Redis's own expiry.

    Args:
        link: the store's Redis link.
        profile_id: profile identity; part of every key, so two profiles never share results.
        ttl_s: entry lifetime (``SET ... PX``; fractions of a second are kept).
        metrics: hit/miss counts (a lookup skipped or failed because Redis is down is a miss).
    """

    enabled = True

    def __init__(
        self,
        link: RedisLink,
        profile_id: str,
        *,
        ttl_s: float,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self._link = link
        self._profile_id = profile_id
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._metrics = metrics or NullMetrics()

    async def get(self, image_sha256: str) -> dict | None:
        """The cached value, or ``None`` (absent, expired, unreadable, or Redis unavailable)."""
        key = cache_key(self._profile_id, image_sha256)

        async def fetch(client: Redis) -> bytes | None:
            return cast(bytes | None, await client.get(key))

        raw = await self._link.call("cache_get", fetch, None)
        value: dict | None = None
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except ValueError:
                logger.warning("cache entry %s is not JSON; ignored", key)
            else:
                value = loaded if isinstance(loaded, dict) else None
        self._metrics.cache_lookup(value is not None)
        return value

    async def put(self, image_sha256: str, value: dict) -> None:
        """Store ``value`` (JSON-able) for the TTL; dropped silently if Redis is unavailable."""
        text = encode_cache_value(value)
        if text is None:
            return
        key = cache_key(self._profile_id, image_sha256)

        async def store(client: Redis) -> None:
            await client.set(key, text, px=self._ttl_ms)

        await self._link.call("cache_put", store, None)


class RedisReviewSink:
    """Flagged images appended to a Redis Stream (``XADD MAXLEN ~``), for consumer groups.

    Args:
        link: the store's Redis link.
        stream: stream key.
        maxlen: approximate bound: Redis trims whole internal nodes, so the stream may hold up
            to one node (``stream-node-max-entries``, 100 by default) more than this.
        max_image_bytes: images larger than this keep only their metadata.
        profile: profile identity written into each entry.
        metrics: ``review_appended`` per entry written.
    """

    enabled = True

    def __init__(
        self,
        link: RedisLink,
        *,
        stream: str,
        maxlen: int,
        max_image_bytes: int,
        profile: str,
        metrics: StoreMetrics | None = None,
        model: str = "",
        version: int = 0,
    ) -> None:
        self._link = link
        self._model, self._version = model, version
        self._stream = stream
        self._maxlen = maxlen
        self._max_image_bytes = max_image_bytes
        self._profile = profile
        self._metrics = metrics or NullMetrics()

    async def append(self, record: ReviewRecord) -> None:
        """Append one record; dropped (counted as a Redis error) if Redis is unavailable."""
        fields = stream_fields(
            record, self._profile, self._max_image_bytes, model=self._model, version=self._version
        )

        async def add(client: Redis) -> bool:
            await client.xadd(
                self._stream, cast(dict[Any, Any], fields), maxlen=self._maxlen, approximate=True
            )
            return True

        if await self._link.call("review_append", add, False):
            self._metrics.review_appended()

    @property
    def marks_key(self) -> str:
        """The hash of operator marks."""
        return f"{self._stream}:marks"

    def _items(self, raw: list[_RawEntry], marks: list[bytes | None]) -> list[ReviewItem]:
        items = []
        for (entry_id, fields), mark in zip(raw, marks, strict=True):
            text = mark.decode() if mark is not None else None
            items.append(
                ReviewItem(
                    entry=entry_from_fields(entry_id, fields),
                    mark=next((m for m in REVIEW_MARKS if m == text), None),
                )
            )
        return items

    async def recent(self, limit: int) -> list[ReviewItem] | None:
        """The ``limit`` newest entries (``XREVRANGE``), newest first, with their marks.

        Read in pages of :data:`REVIEW_PAGE` entries, one round trip each, so that no single
        call carries many images and runs into the Redis timeout (which would mark a healthy
        Redis down for the serving path too)."""
        raw: list[_RawEntry] = []
        marks: list[bytes | None] = []
        end = "+"
        while len(raw) < limit:
            count = min(REVIEW_PAGE, limit - len(raw))

            async def fetch(
                client: Redis, end: str = end, count: int = count
            ) -> tuple[list[_RawEntry], list[bytes | None]]:
                # decode_responses=False: ids, fields and marks are bytes.
                page: Any = await client.xrevrange(self._stream, max=end, count=count)
                ids = [entry_id for entry_id, _ in page]
                found: Any = await client.hmget(self.marks_key, ids) if ids else []
                return list(page), list(found)

            got = await self._link.call("review_read", fetch, None)
            if got is None:
                return None
            raw.extend(got[0])
            marks.extend(got[1])
            if len(got[0]) < count:
                break
            end = "(" + got[0][-1][0].decode()
        return self._items(raw, marks)

    async def get(self, entry_id: str) -> ReviewItem | None:
        """One entry by stream id, or ``None``."""
        if not _STREAM_ID.match(entry_id):
            return None

        async def fetch(client: Redis) -> tuple[list[_RawEntry], list[bytes | None]]:
            raw: Any = await client.xrange(self._stream, entry_id, entry_id, count=1)
            marks: Any = [await client.hget(self.marks_key, entry_id)] if raw else []
            return list(raw), marks

        got = await self._link.call("review_read", fetch, None)
        items = self._items(*got) if got is not None else []
        return items[0] if items else None

    async def mark(self, entry_id: str, mark: ReviewMark | None) -> bool | None:
        """Set (``HSET``) or clear (``HDEL``) an entry's mark, if the entry is in the stream."""
        if not _STREAM_ID.match(entry_id) or (mark is not None and mark not in REVIEW_MARKS):
            return False

        async def write(client: Redis) -> bool:
            if not await client.xrange(self._stream, entry_id, entry_id, count=1):
                return False
            if mark is None:
                await client.hdel(self.marks_key, entry_id)
            else:
                await client.hset(self.marks_key, entry_id, mark)
            return True

        done: bool | None = await self._link.call("review_mark", write, None)
        return done

    async def marked(self, limit: int) -> list[ReviewItem] | None:
        """Up to ``limit`` marked entries, newest first; marks whose entry was trimmed off the
        stream are deleted here, so the hash stays bounded by the stream. Entries are read in
        pages of :data:`REVIEW_PAGE`, one round trip each."""

        async def all_marks(client: Redis) -> dict[bytes, bytes]:
            found: Any = await client.hgetall(self.marks_key)
            return dict(found)

        marks = await self._link.call("review_read", all_marks, None)
        if marks is None:
            return None
        ids = sorted(marks, key=lambda i: tuple(int(p) for p in i.split(b"-")), reverse=True)
        raw: list[_RawEntry] = []
        for first in range(0, len(ids), REVIEW_PAGE):
            if len(raw) >= limit:
                break
            chunk = ids[first : first + REVIEW_PAGE]

            async def fetch(client: Redis, chunk: list[bytes] = chunk) -> list[Any]:
                async with client.pipeline(transaction=False) as pipe:
                    for entry_id in chunk:
                        pipe.xrange(self._stream, entry_id, entry_id, count=1)
                    replies: list[Any] = await pipe.execute()
                gone = [i for i, reply in zip(chunk, replies, strict=True) if not reply]
                if gone:
                    await client.hdel(self.marks_key, *gone)
                return replies

            replies = await self._link.call("review_read", fetch, None)
            if replies is None:
                return None
            raw.extend(reply[0] for reply in replies if reply)
        raw = raw[:limit]
        return self._items(raw, [marks[entry_id] for entry_id, _ in raw])


class RedisDriftWindow:
    """Fleet-wide drift window: every replica adds its bin counts to shared time buckets.

    Every add is also recorded in a local window, which answers whenever Redis does not, so
    drift is still reported (for this replica alone, ``scope="local"``) during an outage.

    Args:
        link: the store's Redis link.
        profile_id: profile identity; part of every key.
        window_s: how far back the window sums.
        n_bins: number of score bins, when known up front (an empty window is then
            ``zeros(n_bins)``).
    """

    def __init__(
        self, link: RedisLink, profile_id: str, *, window_s: float, n_bins: int | None = None
    ) -> None:
        self._link = link
        self._profile_id = profile_id
        self._window_s = window_s
        self._local = LocalDriftWindow(window_s, n_bins)
        # From its last write, a bucket must outlive the window by one bucket width.
        self._expire_s = math.ceil(window_s) + DRIFT_BUCKET_S + DRIFT_EXPIRY_MARGIN_S

    async def add(self, bin_counts: np.ndarray, now: float) -> None:
        """Add one batch's bin counts at ``now`` (unix seconds) here and, if up, in Redis."""
        counts = np.asarray(bin_counts, dtype=np.int64)
        self._local.record(counts, now)
        nonzero = np.flatnonzero(counts)
        if len(nonzero) == 0:
            return
        key = drift_key(self._profile_id, drift_bucket(now))

        async def increment(client: Redis) -> None:
            # One round trip, no MULTI: HINCRBY is atomic per field, and a partly applied
            # batch (connection lost mid-pipeline) is an acceptable error for a statistic.
            async with client.pipeline(transaction=False) as pipe:
                for index in nonzero:
                    pipe.hincrby(key, str(int(index)), int(counts[index]))
                pipe.hset(key, "n", len(counts))
                pipe.expire(key, self._expire_s)
                await pipe.execute()

        await self._link.call("drift_add", increment, None)

    async def window(self, now: float) -> np.ndarray:
        """Bin counts over the window ending at ``now``: the fleet's, or this replica's own
        while Redis is unavailable."""
        return (await self.read(now)).counts

    async def read(self, now: float) -> WindowCounts:
        """The window with its scope (``fleet`` from Redis, ``local`` as the fallback)."""
        buckets_in_window = drift_buckets_in_window(now, self._window_s)
        keys = [drift_key(self._profile_id, bucket) for bucket in buckets_in_window]

        async def fetch(client: Redis) -> list[dict[bytes, bytes]]:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                buckets: list[dict[bytes, bytes]] = await pipe.execute()
                return buckets

        buckets = await self._link.call("drift_window", fetch, None)
        if buckets is None:
            return WindowCounts(self._local.counts(now), "local")
        total = np.zeros(self._local.n_bins, dtype=np.int64)
        try:
            for bucket in buckets:
                total = add_counts(total, _bucket_counts(bucket))
        except ValueError:
            # Only nacguard writes these keys; a malformed one means another program wrote it.
            logger.warning("malformed drift bucket under %s; using the local window", keys[0])
            return WindowCounts(self._local.counts(now), "local")
        return WindowCounts(total, "fleet")


def _bucket_counts(bucket: dict[bytes, bytes]) -> np.ndarray:
    """One bucket hash as an array; ``n`` gives its length, so trailing empty bins count."""
    size = int(bucket.get(b"n", 0))
    indexed = {int(k): int(v) for k, v in bucket.items() if k != b"n"}
    if indexed:
        size = max(size, max(indexed) + 1)
    counts = np.zeros(size, dtype=np.int64)
    for index, value in indexed.items():
        counts[index] = value
    return counts
