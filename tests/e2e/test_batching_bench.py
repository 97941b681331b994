"""The batching benchmark script against real servers (a short smoke run, as a process: tests
never import loadtest/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_batching_bench_runs_both_configurations(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    command = [
        sys.executable,
        "loadtest/batching_bench.py",
        "--profile",
        str(tiny_bundle),
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--images-per-request",
        "2",
        "--set",
        "max_batch_size=8",
        "--set",
        "torch_threads=1",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    unbatched, batched = json.loads(out.read_text())
    for result in (unbatched, batched):
        assert result["requests"] > 0 and result["errors"] == 0, result
        assert result["images_per_request"] == 2
        assert 0 < result["p50_ms"] <= result["p99_ms"]
    # max_batch_size=1 really ran one image per batch; the other server may batch up to 8.
    assert unbatched["label"] == "max_batch_size=1" and unbatched["mean_batch"] == 1.0
    assert 1.0 <= batched["mean_batch"] <= 8.0
    assert "max_batch_size=1" in done.stdout and "default batching" in done.stdout
