"""The drift window of one replica whose workers are separate processes, without Redis.

Each worker owns one small memory-mapped file per window in the server's shared folder
(``drift-<key>-<pid>.bin``; the key tells the model repository's versions apart): a ring of time buckets, each row ``[bucket, count_0, ..., count_n]`` in
int64. A worker adds to its own file only (one writer per file, on its event loop, no locks,
no system calls: it is a memory write), and reads the sum over every worker's file, so each
worker's ``/v1/drift`` and drift gauges describe the whole replica, at once and exactly.

Why files and not the multi-process metrics: the drift window slides (time buckets that age
out), Prometheus counters only grow. The folder is cleaned when the server starts; a dead
worker's file keeps counting until its buckets leave the window (its images were served), and
is deleted then.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from nacguard.store.base import (
    DRIFT_BUCKET_S,
    SyncDriftWindow,
    drift_bucket,
    drift_buckets_in_window,
)

__all__ = ["WorkerDriftWindow"]


def _alive(path: Path) -> bool:
    """Whether the process that owns ``drift-<key>-<pid>.bin`` still runs."""
    try:
        os.kill(int(path.stem.rsplit("-", 1)[1]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class WorkerDriftWindow(SyncDriftWindow):
    """Score-bin counts of every worker of this replica, summed over a sliding window.

    Args:
        directory: the folder the workers share (``run_dir``).
        window_s: how far back :meth:`read` sums.
        n_bins: number of score bins (fixed: it is the files' row width).
        pid: the process whose file this worker writes (this one's by default).
        key: which window (letters and digits): each loaded model version (and shadow) has
            its own, summed over the workers' files of the same key only.
    """

    def __init__(
        self,
        directory: Path,
        window_s: float,
        n_bins: int,
        *,
        pid: int | None = None,
        key: str = "default",
    ) -> None:
        if not key.isalnum():
            raise ValueError(f"drift window key {key!r}: letters and digits only")
        self._dir = Path(directory)
        self._pattern = f"drift-{key}-*.bin"
        self._window_s = window_s
        self._n_bins = n_bins
        # Two buckets more than the window spans, so the slot being reused is always outside it.
        self._ring = math.ceil(window_s / DRIFT_BUCKET_S) + 2
        self._path = self._dir / f"drift-{key}-{pid or os.getpid()}.bin"
        self._own = np.memmap(self._path, dtype=np.int64, mode="w+", shape=self._shape)
        self._own[:, 0] = -1
        self._own.flush()
        self._others: dict[Path, np.memmap] = {}

    @property
    def _shape(self) -> tuple[int, int]:
        return (self._ring, 1 + self._n_bins)

    @property
    def n_bins(self) -> int:
        """The number of score bins."""
        return self._n_bins

    def record(self, bin_counts: np.ndarray, now: float) -> None:
        """Add one batch's bin counts at ``now`` (unix seconds) to this worker's file."""
        counts = np.asarray(bin_counts, dtype=np.int64)[: self._n_bins]
        bucket = drift_bucket(now)
        row = self._own[bucket % self._ring]
        if row[0] != bucket:
            # Zero before stamping: a reader in between sees an old (out-of-window) or an
            # empty bucket, never old counts under the new stamp.
            row[1:] = 0
            row[0] = bucket
        row[1 : 1 + len(counts)] += counts

    def _other_files(self) -> list[tuple[Path, np.memmap]]:
        """The other workers' files (mapped once, rescanned for new ones on every read)."""
        mapped: dict[Path, np.memmap] = {}
        for path in self._dir.glob(self._pattern):
            if path == self._path:
                continue
            found = self._others.get(path)
            if found is None:
                with contextlib.suppress(OSError, ValueError):  # being created, or just deleted
                    found = np.memmap(path, dtype=np.int64, mode="r", shape=self._shape)
            if found is not None:
                mapped[path] = found
        self._others = mapped
        return list(mapped.items())

    def counts(self, now: float) -> np.ndarray:
        """Every worker's bin counts over the window ending at ``now``."""
        window = drift_buckets_in_window(now, self._window_s)
        total = np.zeros(self._n_bins, dtype=np.int64)
        for path, mapped in [(self._path, self._own), *self._other_files()]:
            rows = np.asarray(mapped)
            stamps = rows[:, 0]
            live = (stamps >= window.start) & (stamps < window.stop)
            total += rows[live, 1:].sum(axis=0)
            if path != self._path and stamps.max() < window.start and not _alive(path):
                self._others.pop(path, None)  # a dead worker's file whose counts aged out
                with contextlib.suppress(OSError):
                    path.unlink()
        return total

    def close(self) -> None:
        """Flush this worker's file (it stays: its counts remain the replica's until they age
        out)."""
        self._own.flush()
