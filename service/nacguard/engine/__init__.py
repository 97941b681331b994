"""The engine: dynamic batching over per-device runner threads. No HTTP, no torch import.

:class:`Batcher` queues submitted items and forms batches; each :class:`Runner` computes batches
on its own thread for one device; :class:`BatchStats` reports every computed batch.
"""

from __future__ import annotations

from nacguard.engine.batcher import Batcher, BatchStats
from nacguard.engine.runner import Runner

__all__ = ["BatchStats", "Batcher", "Runner"]
