"""Where a one-worker server's time goes: the event loop and the runner share one GIL.

Two measurements, one run:

1. **In-process.** The demo bundle's ``predict_batch`` (one torch thread) at batch 1, 16 and
   each ``--concurrency``: with NAC and plain, alone; and with NAC beside a second thread running
   pure Python. torch releases the GIL inside each operator and takes it back afterwards; with
   another thread holding it, every one of the ~90 operators a NAC batch dispatches from Python
   waits for its turn.
2. **In the server.** ``nacguard serve`` with the benchmark defaults (``BENCH_DEFAULTS``: one
   worker, one torch thread, cache off, log level warning): batching, ``max_batch_size=1`` and
   batching without NAC (``scoring=false``), driven by ``wrk`` with one raw PNG (Fashion-MNIST
   test image) per request. Reported: requests/s, the mean batch, the compute time per batch the
   server itself measured (``nacguard_inference_duration_seconds``) against the same batch size
   computed alone in-process, and the CPU of the event loop (the main thread), of the busiest
   other thread (the runner) and of the whole process, in cores, from ``/proc`` over the
   measured window.

    python loadtest/gil_probe.py --out gil-out            # ~1.7 minutes on 2 cores
    python loadtest/gil_probe.py --concurrency 1,32 --duration 8 --out gil-out

Needs ``wrk`` (Debian package ``wrk``). Run it on a quiet machine: the figures are only as good
as the cores are free.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psutil
from loadtest.batching_bench import BENCH_DEFAULTS, sample_payloads, start_server
from loadtest.drivers import metric_totals, process_cpu_seconds

CONFIGS: dict[str, dict[str, str]] = {
    "batching": {},
    "no-batching": {"max_batch_size": "1"},
    "plain": {"scoring": "false"},  # batching, no NAC: the model's forward only
}


def _rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            pass


def in_process(batch_sizes: Sequence[int], seconds: float, rounds: int) -> list[dict[str, Any]]:
    """Batches/s of the demo bundle's ``predict_batch``, alone and beside a Python thread."""
    import torch

    from nacguard.bundle import load_bundle
    from nacguard.settings import DEMO_PROFILE

    torch.set_num_threads(1)
    bundle = load_bundle(DEMO_PROFILE, "cpu")
    rows = []
    for size in batch_sizes:
        x = torch.rand(size, 1, 28, 28)
        for _ in range(10):
            bundle.predict_batch(x)
        alone, plain, beside = [], [], []
        for _ in range(rounds):
            alone.append(_rate(lambda x=x: bundle.predict_batch(x), seconds))
            plain.append(_rate(lambda x=x: bundle.predict_batch(x, scoring=False), seconds))
            result: dict[str, float] = {}
            thread = threading.Thread(
                target=lambda x=x, result=result: result.update(
                    r=_rate(lambda: bundle.predict_batch(x), seconds)
                )
            )
            thread.start()
            _spin(seconds)
            thread.join()
            beside.append(result["r"])
        a, b = statistics.median(alone), statistics.median(beside)
        rows.append(
            {
                "batch": size,
                "alone_ms": 1000 / a,
                "plain_alone_ms": 1000 / statistics.median(plain),
                "beside_python_ms": 1000 / b,
                "slowdown": a / b,
            }
        )
    return rows


_BATCH_METRICS = (
    "nacguard_inference_duration_seconds_sum",
    "nacguard_inference_duration_seconds_count",
    "nacguard_batch_size_images_sum",
)


def _batches(url: str) -> tuple[float, ...]:
    """Compute seconds, batches and images so far, from the server's ``/metrics``."""
    totals = metric_totals(httpx.get(url + "/metrics", timeout=10).text, _BATCH_METRICS)
    return tuple(totals[name] for name in _BATCH_METRICS)


def _sample(url: str, pid: int) -> tuple[tuple[float, ...], dict[int, float], float]:
    """The server's batch totals (:func:`_batches`), the CPU seconds of each live thread of
    ``pid`` (user + system) and of the whole process so far."""
    threads = {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    return _batches(url), threads, process_cpu_seconds(pid)


def _wrk(url: str, concurrency: int, seconds: float, script: Path) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(script),
            url + "/predict",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return float(match.group(1))


def in_server(
    concurrency: Sequence[int], seconds: float, script: Path, inproc: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One server per configuration; wrk at each concurrency; see the module docstring."""
    rows = []
    for name, overrides in CONFIGS.items():
        server = start_server(None, {**BENCH_DEFAULTS, **overrides}, own_session=True)
        try:
            pid = server.process.pid
            for c in concurrency:
                _wrk(server.url, c, 1, script)  # warm-up, unrecorded
                before, cpu0, total0 = _sample(server.url, pid)
                t0 = time.monotonic()
                rps = _wrk(server.url, c, seconds, script)
                wall = time.monotonic() - t0
                after, cpu1, total1 = _sample(server.url, pid)
                used = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
                loop = used.get(pid, 0.0) / wall  # the main thread runs the event loop
                others = sorted((v / wall for t, v in used.items() if t != pid), reverse=True)
                batches = after[1] - before[1]
                mean_batch = (after[2] - before[2]) / batches if batches else 0.0
                per_batch = 1000 * (after[0] - before[0]) / batches if batches else 0.0
                key = "plain_alone_ms" if overrides.get("scoring") == "false" else "alone_ms"
                alone = next((r[key] for r in inproc if r["batch"] == round(mean_batch)), None)
                rows.append(
                    {
                        "config": name,
                        "clients": c,
                        "rps": rps,
                        "mean_batch": mean_batch,
                        "compute_ms_per_batch": per_batch,
                        "compute_alone_ms": alone,
                        "compute_busy_share": (after[0] - before[0]) / wall,
                        "loop_cores": loop,
                        "busiest_other_thread_cores": others[0] if others else 0.0,
                        "process_cores": (total1 - total0) / wall,
                    }
                )
        finally:
            server.stop()
    return rows


def render(inproc: Sequence[dict[str, Any]], server: Sequence[dict[str, Any]]) -> str:
    """The two tables as markdown."""
    lines = [
        "In-process `predict_batch`, demo bundle, one torch thread (medians of the rounds):",
        "",
        "| batch | NAC alone ms | plain alone ms | NAC beside a Python thread ms | slowdown |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['alone_ms']:.2f} | {r['plain_alone_ms']:.2f} "
        f"| {r['beside_python_ms']:.2f} | {r['slowdown']:.1f}x |"
        for r in inproc
    ]
    lines += [
        "",
        "In the server (BENCH_DEFAULTS; wrk, one raw PNG per request):",
        "",
        "| server | clients | req/s | mean batch | compute ms/batch | same batch alone ms "
        "| compute busy share | event loop cores | runner cores | process cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in server:
        alone = r["compute_alone_ms"]
        lines.append(
            f"| {r['config']} | {r['clients']} | {r['rps']:.0f} | {r['mean_batch']:.1f} "
            f"| {r['compute_ms_per_batch']:.2f} | {'' if alone is None else f'{alone:.2f}'} "
            f"| {r['compute_busy_share']:.2f} | {r['loop_cores']:.2f} "
            f"| {r['busiest_other_thread_cores']:.2f} | {r['process_cores']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,32", help="wrk connections, comma-separated")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per server measurement")
    p.add_argument("--rounds", type=int, default=3, help="in-process rounds")
    p.add_argument("--rate-s", type=float, default=1.5, help="seconds per in-process rate")
    p.add_argument("--out", type=Path, required=True, help="directory for gil_probe.{json,md}")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("gil_probe: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    concurrency = [int(c) for c in args.concurrency.split(",")]
    inproc = in_process(sorted({1, 16, *concurrency}), args.rate_s, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp, "body.png")
        body.write_bytes(sample_payloads(1)[0])
        script = Path(tmp, "post.lua")
        script.write_text(
            'wrk.method = "POST"\n'
            f'local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()\n'
            'wrk.headers["Content-Type"] = "image/png"\n'
        )
        server = in_server(concurrency, args.duration, script, inproc)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = render(inproc, server)
    (args.out / "gil_probe.json").write_text(
        json.dumps({"in_process": inproc, "server": server}, indent=2)
    )
    (args.out / "gil_probe.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
