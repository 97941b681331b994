"""Cores, overload and a peer: the benchmark of ``--workers``, shedding and LitServe.

Run from :mod:`loadtest.bench` (``python loadtest/bench.py --parts scale``) or alone::

    python loadtest/scale_bench.py --out scale-out          # ~3 minutes on 2 cores
    python loadtest/scale_bench.py --quick --out /tmp/s     # smoke run, numbers meaningless

Servers, all started at once and driven by the same client (:mod:`loadtest.drivers`):

| server | what |
|---|---|
| `workers-1` | ``nacguard serve --workers 1``, one torch thread |
| `workers-2` | ``--workers 2``, one torch thread each |
| `litserve-nac` | LitServe (:mod:`loadtest.litserve_peer`), the same bundle, NAC in ``predict`` |
| `litserve-plain` | the same without NAC |

1. **Closed loop**, 32 clients, interleaved rounds: ``workers-2`` against ``workers-1`` on the
   standard workload (raw/multipart/JSON bodies), and every server on JSON bodies (the only
   body LitServe's handler reads besides forms) for the peer comparison. Images/s and server
   CPU per request (the server's whole process tree: supervisor and workers, LitServe's API
   server and inference worker).
2. **Overload** on ``workers-2``: open loops at 2x and 4x its closed-loop saturation rate:
   goodput (200s per second over saturation), status codes, the p99 of the refusals, and the
   time from the last flood arrival until a probe is answered 200 fast again (recovery).
3. **Latency stability**: five consecutive open loops at 0.5x saturation on ``workers-2``,
   p99/p50 of each.

The LitServe peers are paused (``SIGSTOP`` to their process groups) except while they are
measured: idle, each one polls its queues and takes about a tenth of a core (0.11 cores
measured here), which would otherwise be taken from every other server's runs on a 2-core
machine. nacguard's servers idle at under 0.01 cores and keep running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from loadtest.batching_bench import (
    BENCH_DEFAULTS,
    RunningServer,
    _free_port,
    setting,
    start_server,
)
from loadtest.drivers import HttpConnection, RunResult, closed_loop, merge_runs, open_loop
from loadtest.workload import Payload, build_payloads

__all__ = ["ScalePlan", "render_scale_markdown", "run_scale", "scale_targets"]

log = logging.getLogger("nacguard.bench.scale")

NACGUARD = {"workers-1": {"workers": 1}, "workers-2": {"workers": 2}}
#: On top of the benchmark defaults: one torch thread per worker, and a queue of 128 images per
#: worker, about 0.1-0.2 s of work here: the bound on queueing delay that overload runs against.
SCALE_DEFAULTS: dict[str, object] = {"torch_threads": 1, "max_queue_images": 128}
PEERS = {"litserve-nac": [], "litserve-plain": ["--plain"]}


@dataclass(frozen=True)
class ScalePlan:
    """Durations and rates of :func:`run_scale`."""

    concurrency: int = 32
    rounds: int = 3
    duration_s: float = 4.0
    warmup_s: float = 1.0
    overload_fractions: tuple[float, ...] = (2.0, 4.0)
    overload_duration_s: float = 6.0
    stable_runs: int = 5
    stable_duration_s: float = 6.0
    peers: bool = True

    @classmethod
    def quick(cls) -> ScalePlan:
        """Smoke-test durations."""
        return cls(rounds=1, duration_s=1.0, warmup_s=0.3, overload_duration_s=1.0,
                   stable_runs=2, stable_duration_s=1.0)  # fmt: skip


def _start_peer(
    name: str, flags: Sequence[str], profile: Path | None, log_dir: Path
) -> RunningServer:
    port = _free_port()
    log_path = log_dir / f"server-{name}.log"
    command = [
        sys.executable,
        str(Path(__file__).with_name("litserve_peer.py")),
        "--port",
        str(port),
    ]
    if profile is not None:
        command += ["--profile", str(profile)]
    with log_path.open("wb") as out:
        # Its own session, as every server here (see start_server's own_session), and its
        # processes are stopped with it (killpg).
        process = subprocess.Popen([*command, *flags], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=server.url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").status_code == 200:
                    return server
            time.sleep(0.2)
    raise RuntimeError(f"{name} not ready within 180 s")


def _signal_peer(server: RunningServer, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, sig)


@contextlib.contextmanager
def _awake(server: RunningServer, peer: bool) -> Iterator[None]:
    """Let a paused peer run for the length of the block (a nacguard server always runs)."""
    if not peer:
        yield
        return
    _signal_peer(server, signal.SIGCONT)
    try:
        yield
    finally:
        _signal_peer(server, signal.SIGSTOP)


def _stop_peer(server: RunningServer) -> None:
    _signal_peer(server, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, 15)
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, 9)
        server.process.wait(10)


@contextlib.contextmanager
def _servers(
    plan: ScalePlan, profile: Path | None, extra: Mapping[str, object], log_dir: Path
) -> Iterator[dict[str, RunningServer]]:
    running: dict[str, RunningServer] = {}
    peers: set[str] = set()

    def start(name: str) -> tuple[str, RunningServer]:
        if name in PEERS:
            return name, _start_peer(name, PEERS[name], profile, log_dir)
        settings = {**BENCH_DEFAULTS, **SCALE_DEFAULTS, **extra, **NACGUARD[name]}
        log_path = log_dir / f"server-{name}.log"
        return name, start_server(profile, settings, log_path=log_path, own_session=True)

    names = [*NACGUARD, *(PEERS if plan.peers else ())]
    with ThreadPoolExecutor(len(names)) as pool:
        try:
            errors = []
            # Every start is collected, also after one failed, so none is left running.
            for future in [pool.submit(start, n) for n in names]:
                try:
                    name, server = future.result()
                except RuntimeError as exc:
                    errors.append(exc)
                    continue
                running[name] = server
                if name in PEERS:
                    peers.add(name)
                    _signal_peer(server, signal.SIGSTOP)  # woken only to be measured
            if errors:
                raise errors[0]
            yield running
        finally:
            for name, server in running.items():
                _stop_peer(server) if name in peers else server.stop()


async def _flood(
    url: str, payloads: Sequence[Payload], probe_body: Payload, *, rate: float, label: str,
    duration_s: float, warmup_s: float, pool: int, pid: int, fast_ms: float,
) -> tuple[RunResult, float]:  # fmt: skip
    """An open loop at ``rate`` and, once its arrivals stop, back-to-back probes until one is
    answered 200 within ``fast_ms``: (the run, seconds from the last arrival to that answer)."""
    host, port = url.removeprefix("http://").split(":")
    probe = HttpConnection(host, int(port), timeout=30)
    await probe.connect()
    done = asyncio.Event()
    flood = asyncio.create_task(
        open_loop(url, payloads, rate=rate, label=label, duration_s=duration_s,
                  warmup_s=warmup_s, max_connections=pool, server_pid=pid, arrivals_done=done)
    )  # fmt: skip
    await done.wait()
    ended = time.perf_counter()
    recovery = math.nan
    while time.perf_counter() - ended < 30:
        sent = time.perf_counter()
        try:
            reply = await probe.request(
                "POST", "/predict", probe_body.body, (("Content-Type", probe_body.content_type),)
            )
        except Exception:  # a broken probe connection is not the server's answer
            await probe.connect()
            continue
        now = time.perf_counter()
        if reply.status == 200 and (now - sent) * 1000 <= fast_ms:
            recovery = now - ended
            break
    probe.close()
    return await flood, recovery


def run_scale(
    plan: ScalePlan, *, profile: Path | None = None, extra: Mapping[str, object] | None = None,
    log_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Run the comparisons of the module docstring; the report (JSON-able)."""
    extra = dict(extra or {})
    mixed = build_payloads(1024, seed=10)
    as_json = build_payloads(1024, encodings=["json"], seed=11)
    closed: dict[str, list[RunResult]] = {}
    overload: list[dict[str, Any]] = []
    stable: list[RunResult] = []
    with _servers(plan, profile, extra, log_dir) as servers:
        runs = [("workers-1", "workers-1", mixed), ("workers-2", "workers-2", mixed)]
        runs += [(f"{n}, json", n, as_json) for n in servers]
        for rnd in range(plan.rounds):
            log.info("scale: closed loop, %d clients, round %d/%d", plan.concurrency, rnd + 1,
                     plan.rounds)  # fmt: skip
            for key, name, payloads in runs if rnd % 2 == 0 else runs[::-1]:
                s = servers[name]
                with _awake(s, name in PEERS):
                    result = asyncio.run(
                        closed_loop(s.url, payloads, label=key, concurrency=plan.concurrency,
                                    duration_s=plan.duration_s, warmup_s=plan.warmup_s,
                                    server_pid=s.process.pid)
                    )  # fmt: skip
                log.info("  %-26s %8.1f img/s  p99 %6.1f ms  cpu %.2f ms/req  %s", key,
                         result.images_per_s, result.p99_ms, result.server_cpu_ms_per_request,
                         result.status_codes)  # fmt: skip
                closed.setdefault(key, []).append(result)
        merged = {k: merge_runs(v) for k, v in closed.items()}
        target = servers["workers-2"]
        saturation = merged["workers-2"].throughput_rps
        queue = int(str({**SCALE_DEFAULTS, **extra}["max_queue_images"]))  # per worker
        for rnd in range(plan.stable_runs):
            result = asyncio.run(
                open_loop(target.url, mixed, rate=0.5 * saturation, label=f"open 0.5x #{rnd + 1}",
                          duration_s=plan.stable_duration_s, warmup_s=plan.warmup_s,
                          max_connections=256, server_pid=target.process.pid)
            )  # fmt: skip
            log.info("  %s: p50 %.1f p99 %.1f ms", result.label, result.p50_ms, result.p99_ms)
            stable.append(result)
        fast_ms = max(20.0, 3 * statistics_median([r.p50_ms for r in stable]))
        for fraction in plan.overload_fractions:
            result, recovery = asyncio.run(
                _flood(target.url, mixed, mixed[0], rate=fraction * saturation,
                       label=f"open {fraction:g}x", duration_s=plan.overload_duration_s,
                       warmup_s=plan.warmup_s, pool=2 * 2 * queue, pid=target.process.pid,
                       fast_ms=fast_ms)
            )  # fmt: skip
            goodput = result.throughput_rps / saturation if saturation else math.nan
            log.info("  %s: goodput %.2f, refusal p99 %.1f ms, recovery %.2f s, %s",
                     result.label, goodput, result.rejected_p99_ms, recovery,
                     result.status_codes)  # fmt: skip
            overload.append({"run": result.to_dict(), "goodput": goodput, "recovery_s": recovery,
                             "fraction": fraction, "fast_ms": fast_ms})  # fmt: skip
    return {
        "plan": asdict(plan),
        "closed": {k: v.to_dict() for k, v in merged.items()},
        "saturation_rps": saturation,
        "stable": [r.to_dict() for r in stable],
        "overload": overload,
        "ratios": _ratios(merged),
    }


def statistics_median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ratios(m: Mapping[str, RunResult]) -> dict[str, float]:
    def ratio(a: str, b: str) -> float:
        if a not in m or b not in m or not m[b].images_per_s:
            return math.nan
        return m[a].images_per_s / m[b].images_per_s

    return {
        "workers2_over_workers1": ratio("workers-2", "workers-1"),
        "workers2_over_litserve_nac": ratio("workers-2, json", "litserve-nac, json"),
        "workers1_over_litserve_nac": ratio("workers-1, json", "litserve-nac, json"),
        "litserve_nac_over_plain": ratio("litserve-nac, json", "litserve-plain, json"),
    }


def _target(name: str, value: float, bound: float, higher: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": bound, "higher_is_better": higher,
            "detail": detail}  # fmt: skip


def scale_targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets from a :func:`run_scale` report (``loadtest.bench.Target`` fields)."""
    r, c = report["ratios"], report["closed"]
    out = [
        _target("NAC screening with --workers 2 >= 1.6x the images/s of --workers 1",
                r["workers2_over_workers1"], 1.6, True, "closed loop, mixed bodies"),
        _target(">= 1.5x LitServe + NAC at 32 clients", r["workers2_over_litserve_nac"], 1.5,
                True, "closed loop, JSON bodies, workers 2 vs LitServe with NAC in predict"),
    ]  # fmt: skip
    for key in ("workers-1", "workers-2"):
        if key in c:
            out.append(_target(f"server CPU per request <= 0.7 ms ({key})",
                               c[key]["server_cpu_ms_per_request"], 0.7, False,
                               "closed loop, whole process tree"))  # fmt: skip
    for o in report["overload"]:
        run, f = o["run"], f"{o['fraction']:g}x"
        other = sum(v for k, v in run["status_codes"].items()
                    if k not in ("200", "429", "503", "not_sent"))  # fmt: skip
        out += [
            _target(f"goodput >= 0.9 of capacity at {f}", o["goodput"], 0.9, True,
                    f"200s/s over the closed-loop saturation {report['saturation_rps']:.0f} req/s"),
            _target(f"only 200/429/503 at {f}", float(other), 0.0, False,
                    f"status codes {run['status_codes']}"),
            _target(f"refusal p99 <= 50 ms at {f}", run["rejected_p99_ms"], 50.0, False,
                    "429/503 latency from the scheduled send"),
            _target(f"full service within 1 s after the {f} flood", o["recovery_s"], 1.0,
                    False, f"a probe answered 200 within {o['fast_ms']:.0f} ms"),
        ]  # fmt: skip
    for run in report["stable"]:
        ratio = run["p99_ms"] / run["p50_ms"] if run["p50_ms"] else math.nan
        out.append(_target(f"p99 <= 3x p50 at half saturation ({run['label']})", ratio, 3.0,
                           False, f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms"))  # fmt: skip
    return out


def _fmt(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def render_scale_markdown(report: Mapping[str, Any]) -> str:
    """The scale report's tables."""
    plan, c, r = report["plan"], report["closed"], report["ratios"]
    lines = [
        f"Closed loop, {plan['concurrency']} clients, {plan['rounds']} interleaved rounds of "
        f"{plan['duration_s']:g} s; one torch thread per worker (LitServe: one inference "
        "worker, one torch thread, its API server process).",
        "",
        "| configuration | images/s | p50 ms | p99 ms | errors | server CPU ms/req |",
        "|---|---|---|---|---|---|",
    ]
    for key, run in c.items():
        lines.append(
            f"| {key} | {_fmt(run['images_per_s'])} | {_fmt(run['p50_ms'])} | "
            f"{_fmt(run['p99_ms'])} | {run['errors']} | "
            f"{_fmt(run['server_cpu_ms_per_request'], '{:.2f}')} |"
        )
    lines += [
        "",
        f"workers 2 / workers 1: **{_fmt(r['workers2_over_workers1'], '{:.2f}')}x**; "
        f"workers 2 / LitServe+NAC (JSON bodies): "
        f"**{_fmt(r['workers2_over_litserve_nac'], '{:.2f}')}x** (workers 1: "
        f"{_fmt(r['workers1_over_litserve_nac'], '{:.2f}')}x); LitServe NAC / plain: "
        f"{_fmt(r['litserve_nac_over_plain'], '{:.2f}')}x.",
        "",
        f"Overload on workers-2 (saturation {report['saturation_rps']:.0f} req/s):",
        "",
        "| arrival rate | req/s answered 200 | goodput | status codes | refusal p99 ms | "
        "recovery s |",
        "|---|---|---|---|---|---|",
    ]
    for o in report["overload"]:
        run = o["run"]
        codes = ", ".join(f"{k}: {v}" for k, v in run["status_codes"].items())
        lines.append(
            f"| {o['fraction']:g}x | {_fmt(run['throughput_rps'])} | "
            f"{_fmt(o['goodput'], '{:.2f}')} | {codes} | {_fmt(run['rejected_p99_ms'])} | "
            f"{_fmt(o['recovery_s'], '{:.2f}')} |"
        )
    lines += ["", "Open loops at 0.5x saturation on workers-2, one after another:", "",
              "| run | p50 ms | p99 ms | p99/p50 |", "|---|---|---|---|"]  # fmt: skip
    for run in report["stable"]:
        ratio = run["p99_ms"] / run["p50_ms"] if run["p50_ms"] else math.nan
        lines.append(f"| {run['label']} | {_fmt(run['p50_ms'])} | {_fmt(run['p99_ms'])} | "
                     f"{_fmt(ratio, '{:.2f}')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("scale-out"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", type=Path)
    p.add_argument("--no-peers", action="store_true", help="skip LitServe")
    p.add_argument("--set", action="append", default=[], type=setting, metavar="NAME=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    plan = ScalePlan.quick() if args.quick else ScalePlan()
    if args.no_peers or shutil.which("python") is None:
        plan = ScalePlan(**{**asdict(plan), "peers": False})
    extra = dict(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="scale-", dir=args.out))
    report = run_scale(plan, profile=args.profile, extra=extra, log_dir=log_dir)
    (args.out / "scale.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = render_scale_markdown(report)
    (args.out / "scale.md").write_text(markdown)
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
