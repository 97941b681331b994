"""The engine: dynamic batching over per-device runner threads. No HTTP, no torch import.

:class:`Batcher` queues submitted items and forms batches; its :class:`BatchPolicy`
(:class:`AdaptiveWait` or :class:`FixedWait`) decides how long a free device waits for
batch-mates; each :class:`Runner` computes batches on its own thread for one device;
:class:`BatchStats` reports every computed batch.
"""

from __future__ import annotations

from nacguard.engine.batcher import Batcher, BatchStats
from nacguard.engine.policy import AdaptiveWait, BatchPolicy, FixedWait
from nacguard.engine.runner import Runner

__all__ = ["AdaptiveWait", "BatchPolicy", "BatchStats", "Batcher", "FixedWait", "Runner"]
