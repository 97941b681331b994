"""What the metrics read from the layers that report to them, as protocols (no imports of
those layers: monitoring stays below the engine and the serving core)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["BatchStatsLike"]


class BatchStatsLike(Protocol):
    """What :meth:`Metrics.observe_batch` reads (``nacguard.engine.BatchStats`` fits)."""

    @property
    def device(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def queue_wait_s(self) -> Sequence[float]: ...
    @property
    def compute_s(self) -> float: ...
    @property
    def policy_wait_s(self) -> float: ...
