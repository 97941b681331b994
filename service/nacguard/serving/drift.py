"""Counting computed scores into the drift window, and reading the drift report.

The drift reference (bins from the calibration scores and the threshold) is built here, by the
serving core, and handed to the metrics, so the score histogram and the drift window share
the same bins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import numpy as np

from nacguard.monitoring import DriftReference, DriftReport, drift_report
from nacguard.nac import Calibration
from nacguard.settings import Settings
from nacguard.store.base import DriftWindow

__all__ = ["DriftRecorder"]


class DriftRecorder:
    """Adds computed scores to a drift window and reports drift against the calibration.

    Counts coalesce while a write to the store is in progress, so a busy server makes one store
    call per write, not per batch.

    Args:
        calibration: the served calibration (reference scores, threshold, expected OOD rate).
        settings: the drift window and thresholds.
    """

    def __init__(self, calibration: Calibration, settings: Settings) -> None:
        # The threshold that flags (alpha's equivalent under ood_alpha; the TPR one under the
        # fused detector, which has no NAC threshold of its own).
        threshold = calibration.decision_threshold
        if threshold != threshold:
            threshold = calibration.threshold
        self.reference = DriftReference(calibration.scores, threshold)
        self._expected_ood_rate = calibration.expected_ood_rate
        self._settings = settings
        self._window: DriftWindow | None = None
        self._pending: np.ndarray | None = None
        self._task: asyncio.Task[None] | None = None

    def attach(self, window: DriftWindow) -> None:
        """Write to ``window`` from now on (the store's, once it is built)."""
        self._window = window

    def add(self, scores: Sequence[float]) -> None:
        """Count computed scores into the window (in the background)."""
        counts = self.reference.bin_counts(scores)
        if not counts.any() or self._window is None:
            return
        record = getattr(self._window, "record", None)
        if record is not None and self._pending is None:
            # An in-process window (or the workers' shared files) adds in memory: at once,
            # so the next read of any worker sees it, and without a task.
            record(counts, time.time())
            return
        self._pending = counts if self._pending is None else self._pending + counts
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write(), name="nacguard-drift")

    async def _write(self) -> None:
        while self._pending is not None and self._window is not None:
            counts, self._pending = self._pending, None
            await self._window.add(counts, time.time())

    async def flush(self) -> None:
        """Wait until every counted score is in the window."""
        task = self._task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def report(self) -> DriftReport:
        """The drift report of the current window."""
        assert self._window is not None
        await self.flush()
        window = await self._window.read(time.time())
        s = self._settings
        return drift_report(
            self.reference,
            window.counts,
            window_s=s.drift_window_s,
            min_samples=s.drift_min_samples,
            psi_threshold=s.drift_psi_threshold,
            ks_threshold=s.drift_ks_threshold,
            scope=window.scope,
            expected_ood_rate=self._expected_ood_rate,
        )
