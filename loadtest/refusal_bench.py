"""What a refusal costs: this tree against an older commit, side by side.

Each server runs with ``max_queue_images=1`` and one upload held open (headers and the first
bytes of a body, never finished), so every request of the measured closed loop is refused with
429. Reported per tree: refusals per second and the server's CPU milliseconds per refusal (its
whole process tree), and the ratios this / older. Same client, interleaved rounds, each server
in a session of its own (see ``versus.py``)::

    python loadtest/refusal_bench.py --against bd1c6cb --out refusal-out

Settings: the benchmark defaults (``batching_bench.BENCH_DEFAULTS``: one worker, result cache
off, warning-level logs, one torch thread) plus ``max_queue_images=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.batching_bench import BENCH_DEFAULTS, RunningServer, start_server
from loadtest.drivers import interleaved_rounds, merge_runs
from loadtest.versus import ROOT, _checkout, _commit, write_report
from loadtest.workload import build_payloads


def _hold(url: str) -> socket.socket:
    """An upload admitted by the server at ``url`` and left unfinished (it fills the bound)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n\x89PNG"
    )
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/healthz").json()["predict_requests_in_progress"] < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: the held upload was never admitted")
        time.sleep(0.01)  # another process: no event to wait on
    return sock


def run(
    against: str, *, rounds: int, duration_s: float, concurrency: int, out: Path
) -> dict[str, Any]:
    """Both servers, a held upload each, interleaved closed loops; the report (JSON-able)."""
    settings = {**BENCH_DEFAULTS, "max_queue_images": "1"}
    payloads = build_payloads(256, encodings=("raw",), seed=0)
    with _checkout(against) as older:
        servers: dict[str, RunningServer] = {}
        held = []
        try:
            for name, source in (("this", ROOT), ("older", older)):
                servers[name] = start_server(
                    None, overrides=settings, log_path=out / f"refusal-{name}.log",
                    own_session=True, source=source,
                )  # fmt: skip
                held.append(_hold(servers[name].url))
            runs = interleaved_rounds(
                {name: (s.url, s.process.pid) for name, s in servers.items()},
                payloads,
                rounds=rounds,
                concurrency=concurrency,
                duration_s=duration_s,
            )
        finally:
            for sock in held:
                sock.close()
            for server in servers.values():
                server.stop()
        commits = {"this": _commit(ROOT), "older": _commit(older)}
    results = {}
    for name, rs in runs.items():
        merged = merge_runs(rs)
        refused = merged.status_codes.get("429", 0)
        results[name] = {
            "sent": merged.sent,
            "status_codes": merged.status_codes,
            "refusals_per_s": refused / merged.duration_s,
            "server_cpu_ms_per_refusal": 1000 * merged.server_cpu_s / refused if refused else None,
            "refused_p99_ms": merged.rejected_p99_ms,
        }
    this, old = results["this"], results["older"]
    return {
        "commits": commits,
        "settings": settings,
        "plan": {"rounds": rounds, "duration_s": duration_s, "concurrency": concurrency},
        "load_average_at_end": list(os.getloadavg()),
        "results": results,
        "ratios": {
            "refusals_per_s": this["refusals_per_s"] / old["refusals_per_s"],
            "server_cpu_ms_per_refusal": this["server_cpu_ms_per_refusal"]
            / old["server_cpu_ms_per_refusal"],
        },
    }


def render(report: dict[str, Any]) -> str:
    """The markdown table of a report."""
    c, p = report["commits"], report["plan"]
    lines = [
        f"Refusals: this tree ({c['this']}) against {c['older']}, closed loop of "
        f"{p['concurrency']} clients of POST /predict, {p['rounds']} interleaved rounds of "
        f"{p['duration_s']:g} s, one upload held open on each server; settings "
        f"{report['settings']}.",
        "",
        "| tree | commit | refusals/s | server CPU ms/refusal | refusal p99 ms | answers |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {c[name]} | {r['refusals_per_s']:.0f} | "
            f"{r['server_cpu_ms_per_refusal']:.4f} | {r['refused_p99_ms']:.1f} | "
            f"{r['status_codes']} |"
        )
    q = report["ratios"]
    lines += [
        "",
        f"this / older: refusals/s **{q['refusals_per_s']:.2f}x**, server CPU per refusal "
        f"**{q['server_cpu_ms_per_refusal']:.2f}x** (load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in report['load_average_at_end'])}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="the older commit (any git revision)")
    p.add_argument("--out", type=Path, default=Path("refusal-out"), help="output folder")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per run (4)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(
        args.against,
        rounds=args.rounds,
        duration_s=args.duration,
        concurrency=args.concurrency,
        out=args.out,
    )
    write_report(args.out, "refusal_bench", report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
