"""The workers' shared drift window: every worker reads the sum of all workers' files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from nacguard.store.base import DRIFT_BUCKET_S
from nacguard.store.worker_drift import WorkerDriftWindow

NOW = 1_800_000_000.0


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def test_each_worker_sees_the_sum_of_all_workers(tmp_path: Path) -> None:
    mine = WorkerDriftWindow(tmp_path, 300, 4)
    other = WorkerDriftWindow(tmp_path, 300, 4, pid=os.getppid())
    mine.record(np.array([1, 0, 2, 0]), NOW)
    other.record(np.array([0, 3, 0, 1]), NOW + 1)
    other.record(np.array([1, 1, 1, 1]), NOW + DRIFT_BUCKET_S)  # the next bucket
    want = [2, 4, 3, 2]
    assert mine.counts(NOW + DRIFT_BUCKET_S).tolist() == want
    assert other.counts(NOW + DRIFT_BUCKET_S).tolist() == want


def test_buckets_leave_the_window_and_slots_are_reused(tmp_path: Path) -> None:
    window = WorkerDriftWindow(tmp_path, 30, 2)
    window.record(np.array([5, 5]), NOW)
    assert window.counts(NOW).tolist() == [5, 5]
    # Past the window the bucket no longer counts; a full ring later its slot holds new counts.
    later = NOW + 10 * DRIFT_BUCKET_S
    assert window.counts(later).tolist() == [0, 0]
    window.record(np.array([1, 2]), later)
    assert window.counts(later).tolist() == [1, 2]


def test_a_dead_workers_file_counts_until_it_ages_out(tmp_path: Path) -> None:
    dead = WorkerDriftWindow(tmp_path, 30, 2, pid=_dead_pid())
    dead.record(np.array([7, 0]), NOW)
    idle = WorkerDriftWindow(tmp_path, 30, 2, pid=os.getppid())  # alive, never written to
    window = WorkerDriftWindow(tmp_path, 30, 2)
    assert window.counts(NOW).tolist() == [7, 0]
    assert len(list(tmp_path.glob("drift-*.bin"))) == 3
    window.counts(NOW + 100)
    # The dead worker's file is gone; a live worker's stays, however idle.
    assert sorted(tmp_path.glob("drift-*.bin")) == sorted([window._path, idle._path])


def test_windows_of_different_keys_stay_apart(tmp_path: Path) -> None:
    """Two loaded versions in one worker (and another worker's): each key sums its own files;
    the row widths may differ."""
    v1 = WorkerDriftWindow(tmp_path, 300, 4, key="v1")
    v2 = WorkerDriftWindow(tmp_path, 300, 3, key="v2")
    v1_other = WorkerDriftWindow(tmp_path, 300, 4, key="v1", pid=os.getppid())
    v1.record(np.array([1, 0, 2, 0]), NOW)
    v2.record(np.array([5, 5, 5]), NOW)
    v1_other.record(np.array([0, 1, 0, 0]), NOW)
    assert v1.counts(NOW).tolist() == [1, 1, 2, 0]
    assert v2.counts(NOW).tolist() == [5, 5, 5]
