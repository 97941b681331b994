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
from nacguard.store.review_export import ExportResult, ReviewReader, export_review

__all__ = [
    "DriftWindow",
    "ExportResult",
    "ResultCache",
    "ReviewEntry",
    "ReviewReader",
    "ReviewRecord",
    "ReviewSink",
    "Store",
    "StoreMetrics",
    "WindowCounts",
    "export_review",
    "make_store",
]
