"""The batching benchmark's building blocks work against a real server (a short smoke run)."""

from __future__ import annotations

from pathlib import Path

from loadtest.batching_bench import BENCH_DEFAULTS, closed_loop, sample_payloads, start_server


async def test_closed_loop_against_a_real_server(tiny_bundle: Path, tmp_path: Path) -> None:
    server = start_server(
        tiny_bundle, {**BENCH_DEFAULTS, "max_batch_size": 8}, log_path=tmp_path / "bench.log"
    )
    try:
        result = await closed_loop(
            server.url,
            sample_payloads(8, images_per_request=2),
            label="smoke",
            concurrency=4,
            duration_s=1.0,
            warmup_s=0.2,
            images_per_request=2,
        )
    finally:
        assert server.stop() == 0
    assert result.requests > 0
    assert result.errors == 0
    assert result.images_per_s == 2 * result.throughput_rps
    assert 1.0 <= result.mean_batch <= 8.0
    assert 0 < result.p50_ms <= result.p99_ms
