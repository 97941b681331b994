"""Does the operator page cost ``/predict`` anything while nobody has it open?

Starts two ``nacguard serve`` processes on the same profile that differ only in ``ui_enabled``
(true / false), with the benchmark defaults (``batching_bench.BENCH_DEFAULTS``: result cache off,
warning-level logs), and drives both with the benchmark's closed loop (``drivers.closed_loop``:
its own lean HTTP/1.1 client) in interleaved rounds, the order reversed every other round, so
whatever else runs on the machine hits both alike. Nobody opens the page during the run.

    python loadtest/ui_bench.py                       # 5 rounds of 4 s each, 32 clients
    python loadtest/ui_bench.py --rounds 3 --json out.json

Prints one table and the ratio ui_enabled=true / ui_enabled=false of images/s and p99; a ratio
within the spread between rounds of one configuration is "nothing measurable".
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.batching_bench import BENCH_DEFAULTS, start_server
from loadtest.drivers import interleaved_rounds, merge_runs
from loadtest.workload import build_payloads

CONFIGS = {"ui on": {"ui_enabled": "true"}, "ui off": {"ui_enabled": "false"}}


def run(rounds: int, duration_s: float, concurrency: int) -> dict[str, Any]:
    """Run the comparison and return every round and the pooled results."""
    payloads = build_payloads(1024, ood_fraction=0.2, seed=0)
    servers = {name: start_server(None, {**BENCH_DEFAULTS, **cfg}) for name, cfg in CONFIGS.items()}
    try:
        runs = interleaved_rounds(
            {name: (s.url, s.process.pid) for name, s in servers.items()},
            payloads,
            rounds=rounds,
            concurrency=concurrency,
            duration_s=duration_s,
        )
    finally:
        for server in servers.values():
            server.stop()
    pooled = {name: merge_runs(rs) for name, rs in runs.items()}
    on, off = pooled["ui on"], pooled["ui off"]
    per_round = {name: [r.images_per_s for r in rs] for name, rs in runs.items()}
    return {
        "settings": {
            **BENCH_DEFAULTS,
            "rounds": rounds,
            "duration_s": duration_s,
            "concurrency": concurrency,
            "requests": "1 image each, 20% generated OOD, raw/multipart/json in turn",
        },
        "pooled": {name: r.to_dict() for name, r in pooled.items()},
        "per_round_images_per_s": per_round,
        "round_spread": {
            name: (statistics.pstdev(v) / statistics.mean(v)) if len(v) > 1 else 0.0
            for name, v in per_round.items()
        },
        "ratio_images_per_s": on.images_per_s / off.images_per_s,
        "ratio_p99": on.p99_ms / off.p99_ms,
        # CPU per request hardly depends on what else runs on the machine: the steadiest view.
        "ratio_server_cpu_per_request": on.server_cpu_ms_per_request
        / off.server_cpu_ms_per_request,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the per-round lines
    report = run(args.rounds, args.duration, args.concurrency)
    print(
        "\n| configuration | images/s | p50 ms | p99 ms | server CPU ms/req | errors "
        "| spread between rounds |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in report["pooled"].items():
        errors = sum(n for code, n in r["status_codes"].items() if code != "200")
        print(
            f"| {name} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['server_cpu_ms_per_request']:.3f} | {errors} "
            f"| ±{report['round_spread'][name] * 100:.1f}% |"
        )
    print(
        f"\nui on / ui off: images/s {report['ratio_images_per_s']:.3f}x, "
        f"p99 {report['ratio_p99']:.3f}x, "
        f"server CPU per request {report['ratio_server_cpu_per_request']:.3f}x"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
