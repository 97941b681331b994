"""Shared state: result cache, OOD review stream and fleet drift window, backed by Redis when
``NACGUARD_REDIS_URL`` is set and by an in-process fallback otherwise (see docs/redis.md)."""

from nacguard.store.base import (
    DriftWindow,
    ResultCache,
    ReviewRecord,
    ReviewSink,
    StoreMetrics,
    WindowCounts,
)
from nacguard.store.factory import Store, make_store
from nacguard.store.records import ReviewEntry

__all__ = [
    "DriftWindow",
    "ResultCache",
    "ReviewEntry",
    "ReviewRecord",
    "ReviewSink",
    "Store",
    "StoreMetrics",
    "WindowCounts",
    "make_store",
]
