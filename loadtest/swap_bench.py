"""Throughput and latency while the model repository swaps versions, against steady state.

One ``nacguard serve --repository`` process on the demo profile (model ``demo``), poll mode.
Rounds alternate a *steady* closed loop with a *swap* closed loop of the same length during
which a new version is dropped into the repository every ``--swap-every`` seconds, alternating a
profile-only update (same weights, another threshold) and new weights (the demo's weights with
one value nudged, so their sha256 differs and they are read again). The server's resident memory
is sampled throughout (and, with ``device=cuda``, the CUDA memory allocated, from ``/metrics``
every 0.25 s). It reports, side by side: requests/s, p50/p99, non-200 answers, swaps completed,
peak RSS (and peak device memory).

    python loadtest/swap_bench.py --out swap-out --duration 8 --rounds 2

Settings: the server's defaults except ``poll_interval_s=0.5``, ``cache_enabled=false``, one
torch thread and one worker (``--workers``: each worker loads every version, and the swap and
weight-load counters are the sum over the workers); 16 closed-loop clients, single-image
requests, 20% OOD.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.batching_bench import start_server
from loadtest.drivers import RunResult, closed_loop, merge_runs
from loadtest.workload import build_payloads

from nacguard.bundle.format import BUNDLE_FILE, MODEL_FILE, sha256_file
from nacguard.settings import demo_profile

MODEL = "demo"


def _version(repo: Path, source: Path, number: int, *, new_weights: bool) -> None:
    """Write version ``number`` under a hidden name, then rename it into place."""
    staged = repo / f".incoming-{number}"
    shutil.copytree(source, staged)
    meta = json.loads((staged / BUNDLE_FILE).read_text())
    if new_weights:
        state = load_file(str(staged / MODEL_FILE))
        first = next(k for k, v in state.items() if v.is_floating_point())
        state[first] = state[first].clone()
        state[first].view(-1)[0] += 1e-6 * number
        save_file(state, str(staged / MODEL_FILE))
        meta["model"]["sha256"] = sha256_file(staged / MODEL_FILE)
    meta["calibration"]["threshold"] = float(meta["calibration"]["threshold"]) + 1e-4 * number
    (staged / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    staged.rename(repo / MODEL / str(number))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def _sample_rss(pid: int, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(_rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def _sample_device(client: httpx.AsyncClient, stop: asyncio.Event, out: list[float]) -> None:
    """CUDA memory allocated, from the server's /metrics (largest per-device value: every
    loaded version reports the same devices)."""
    pattern = re.compile(r"^nacguard_device_memory_allocated_bytes\{[^}]*\} (\S+)$", re.M)
    while not stop.is_set():
        values = [float(v) for v in pattern.findall((await client.get("/metrics")).text)]
        if values:
            out.append(max(values) / 2**20)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


def _counter(text: str, name: str) -> float:
    match = re.search(rf'^{name}\{{model="{MODEL}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def _phase(
    url: str, pid: int, payloads: list[Any], duration: float, swap: bool, state: dict[str, Any]
) -> tuple[RunResult, float, float, float | None]:
    """One closed-loop phase; with ``swap``, drop versions while it runs. Returns the run,
    the swaps made, the peak RSS and (on CUDA) the peak device memory allocated, in MB."""
    stop = asyncio.Event()
    rss: list[float] = []
    device: list[float] = []
    sampler = asyncio.create_task(_sample_rss(pid, stop, rss))
    async with httpx.AsyncClient(base_url=url) as client:
        samplers = [sampler]
        if state["cuda"]:
            samplers.append(asyncio.create_task(_sample_device(client, stop, device)))
        before = _counter((await client.get("/metrics")).text, "nacguard_model_swaps_total")

        async def dropper() -> None:
            end = time.monotonic() + duration
            while time.monotonic() + state["every"] < end + 1.0:
                await asyncio.sleep(state["every"])  # the swap schedule: a period by design
                state["next"] += 1
                # Each version starts from the one before: every other one keeps its weights.
                await asyncio.to_thread(
                    _version,
                    state["repo"],
                    state["repo"] / MODEL / str(state["next"] - 1),
                    state["next"],
                    new_weights=state["next"] % 2 == 1,
                )

        drops = asyncio.create_task(dropper()) if swap else None
        run = await closed_loop(
            url,
            payloads,
            label="swap" if swap else "steady",
            concurrency=16,
            duration_s=duration,
            warmup_s=0.5,
            server_pid=pid,
        )
        if drops is not None:
            await drops
        after = _counter((await client.get("/metrics")).text, "nacguard_model_swaps_total")
        stop.set()
        await asyncio.gather(*samplers)
    return run, after - before, max(rss) if rss else float("nan"), max(device, default=None)


async def _bench(args: argparse.Namespace, repo: Path) -> dict[str, Any]:
    source = args.profile or demo_profile()
    (repo / MODEL).mkdir(parents=True)
    shutil.copytree(source, repo / MODEL / "1")
    settings = {
        "torch_threads": 1,
        **args.extra,
        "repository": repo,
        "poll_interval_s": 0.5,
        "cache_enabled": False,
        # Each worker loads every version itself, and the repository counters are summed
        # over the workers: one worker keeps the counts per process.
        "workers": args.workers,
    }
    server = start_server(None, settings, log_path=args.log_dir / "swap-server.log")
    on_cuda = str(settings.get("device", "cpu")).startswith("cuda")
    state = {"repo": repo, "source": source, "next": 1, "every": args.swap_every, "cuda": on_cuda}
    payloads = build_payloads(256, seed=3)
    results: dict[str, list[RunResult]] = {"steady": [], "swap": []}
    swaps, peaks = {"steady": 0.0, "swap": 0.0}, {"steady": 0.0, "swap": 0.0}
    device_peaks: dict[str, float | None] = {"steady": None, "swap": None}
    try:
        pid = server.process.pid
        for _ in range(args.rounds):
            for phase in ("steady", "swap"):
                run, done, peak, device = await _phase(
                    server.url, pid, payloads, args.duration, phase == "swap", state
                )
                results[phase].append(run)
                swaps[phase] += done
                peaks[phase] = max(peaks[phase], peak)
                if device is not None:
                    device_peaks[phase] = max(device_peaks[phase] or 0.0, device)
        async with httpx.AsyncClient(base_url=server.url) as client:
            text = (await client.get("/metrics")).text
        weight_loads = _counter(text, "nacguard_model_weight_loads_total")
    finally:
        server.stop()
    merged = {k: merge_runs(v, label=k) for k, v in results.items()}
    steady, swap = merged["steady"], merged["swap"]
    return {
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "swap_every_s": args.swap_every,
            "clients": 16,
            "poll_interval_s": 0.5,
            "workers": args.workers,
            "cuda": torch.cuda.is_available(),
        },
        "versions_dropped": state["next"] - 1,
        "versions_with_new_weights": sum(1 for v in range(2, state["next"] + 1) if v % 2 == 1),
        "phases": {
            k: {
                "requests_per_s": r.throughput_rps,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "sent": r.sent,
                "non_200": r.sent - r.ok,
                "status_codes": r.status_codes,
                "swaps": swaps[k],
                "peak_rss_mb": peaks[k],
                "peak_device_allocated_mb": device_peaks[k],  # None: not on CUDA
            }
            for k, r in merged.items()
        },
        "weight_loads": weight_loads,
        "ratios": {
            "throughput_swap_over_steady": swap.throughput_rps / steady.throughput_rps,
            "p99_swap_over_steady": swap.p99_ms / steady.p99_ms,
        },
    }


def run_swap(
    *,
    duration_s: float,
    rounds: int,
    swap_every_s: float,
    log_dir: Path,
    workers: int = 1,
    profile: Path | None = None,
    extra: dict[str, object] | None = None,
) -> dict[str, Any]:
    """Run the steady and swap phases side by side and return the report (JSON-able); what
    ``loadtest/bench.py --parts swap`` runs.

    Args:
        duration_s: seconds per phase; rounds: interleaved rounds of both phases.
        swap_every_s: a new version every so many seconds of a swap phase.
        log_dir: where the server's log goes; workers: server worker processes.
        profile: the bundle version 1 is (default: the demo profile).
        extra: further server settings (the benchmark's own override them).
    """
    args = argparse.Namespace(
        duration=duration_s,
        rounds=rounds,
        swap_every=swap_every_s,
        log_dir=log_dir,
        workers=workers,
        profile=profile,
        extra=dict(extra or {}),
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nacguard-swap-") as tmp:
        return asyncio.run(_bench(args, Path(tmp) / "repository"))


def swap_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench's bound: no request answered other than 200 while versions swap."""
    swap = report["phases"]["swap"]
    return [
        {
            "name": "non-200 answers while swapping versions",
            "value": float(swap["non_200"]),
            "threshold": 0.0,
            "higher_is_better": False,
            "detail": f"{swap['swaps']:.0f} swaps, {swap['sent']} requests",
        }
    ]


def render_swap_markdown(report: dict[str, Any]) -> str:
    """The phases side by side, and the ratios."""
    phases = report["phases"]
    cuda = any(p.get("peak_device_allocated_mb") is not None for p in phases.values())
    lines = [
        "| phase | req/s | p50 ms | p99 ms | non-200 | swaps | peak RSS MB |"
        + (" peak CUDA allocated MB |" if cuda else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for name, p in phases.items():
        device = p.get("peak_device_allocated_mb")
        lines.append(
            f"| {name} | {p['requests_per_s']:.1f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['non_200']} | {p['swaps']:.0f} | {p['peak_rss_mb']:.0f} |"
            + ((f" {device:.0f} |" if device is not None else " - |") if cuda else "")
        )
    r = report["ratios"]
    lines.append(
        f"\nswap / steady: throughput {r['throughput_swap_over_steady']:.2f}x, "
        f"p99 {r['p99_swap_over_steady']:.2f}x; {report['versions_dropped']} versions dropped "
        f"({report['versions_with_new_weights']} with new weights), weight loads "
        f"{report['weight_loads']:.0f} (version 1 included), "
        f"{report['settings']['workers']} worker(s)"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``swap_bench.json`` and ``swap_bench.md`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("swap-out"))
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--swap-every", type=float, default=2.0)
    parser.add_argument(
        "--workers", type=int, default=1, help="server worker processes (counters sum over them)"
    )
    args = parser.parse_args(argv)
    report = run_swap(
        duration_s=args.duration,
        rounds=args.rounds,
        swap_every_s=args.swap_every,
        workers=args.workers,
        log_dir=Path(tempfile.gettempdir()) / "nacguard-swap-logs",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_swap_markdown(report)
    (args.out / "swap_bench.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
