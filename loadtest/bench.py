"""The performance benchmark behind the README's numbers: one run, one machine, every comparison.

Starts ``nacguard serve`` once per configuration (all at the start, each on its own loopback
port), then drives them with an async client, interleaving the configurations round by round so
that noise from anything else on the machine hits all of them alike::

    python loadtest/bench.py --out bench-out          # full run, ~4-5 minutes on 2 cores
    python loadtest/bench.py --quick --out /tmp/b     # smoke run, well under a minute

What it measures (the demo profile unless ``--profile``; single-image requests, 20% generated
OOD images, raw/multipart/JSON bodies in turn, unless told otherwise):

1. **Closed loop** at ``--concurrency`` clients (32), ``--rounds`` interleaved rounds:
   dynamic batching (the server defaults) against ``max_batch_size=1``; NAC screening against
   plain classification (``scoring=false``); the result cache on against off, both fed the same
   requests drawn from a small set of repeated images; and the protocols on the batching server:
   the Open Inference Protocol over REST (binary tensor data, as ``tritonclient`` sends it) and
   over gRPC, against ``/predict``, with the same images (``--protocols-only``: just these).
2. **Latency against throughput**: a closed-loop concurrency sweep (1 to 64 clients; batching,
   ``max_batch_size=1`` and batching with the fixed window, interleaved, see
   :mod:`loadtest.sweep`) and open loops on the batching server at fractions of its measured
   closed-loop saturation throughput: 0.5x (the latency target) and 2x (overload: only
   explicit 429/503 rejections are allowed), plus a few points in between.
3. **NAC fast path against the reference-style computation**, in-process (no HTTP: the
   reference is a baseline, not a server option) on the demo model, at batch 1 and at larger
   batches, round-robin.
4. **Model repository swaps** (``--parts swap``, :mod:`loadtest.swap_bench`): requests/s,
   p50/p99, non-200 answers and peak RSS of one server while a new version is dropped into
   its repository every few seconds, side by side with steady state, interleaved.

Outputs in ``--out``: ``bench.json`` (every run, with status codes, latency percentiles, batch
sizes from the ``nacguard_batch_size_images`` histogram and CPU per request), ``bench.md`` (the
tables and the targets, pass or miss) and ``latency_throughput.png``.

Servers run with the benchmark defaults of :mod:`loadtest.batching_bench` (result cache off
except where the cache is compared, warning-level logs, half the cores for torch); ``--set
NAME=VALUE`` adds settings to every server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import functools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.batching_bench import (
    BENCH_DEFAULTS,
    RunningServer,
    _free_port,
    setting,
    start_server,
)
from loadtest.drivers import RunResult, closed_loop, merge_runs, open_loop
from loadtest.protocols import GrpcRequest, grpc_closed_loop, grpc_requests, v2_rest_payloads
from loadtest.sweep import render_sweep, run_sweep, sweep_rows, sweep_targets
from loadtest.workload import ENCODINGS, Payload, build_payloads

__all__ = [
    "CONFIGS",
    "BenchPlan",
    "ServerConfig",
    "Target",
    "main",
    "nac_in_process",
    "run_bench",
    "write_outputs",
]

log = logging.getLogger("nacguard.bench")


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration.

    Attributes:
        name: short key (``batching``, ``no-batching``, ``plain``, ``cache``).
        overrides: settings on top of the benchmark defaults.
        description: what it is, for the tables.
    """

    name: str
    overrides: Mapping[str, object]
    description: str


CONFIGS: tuple[ServerConfig, ...] = (
    ServerConfig(
        "batching", {}, "dynamic batching (server defaults: adaptive wait), NAC on, cache off"
    ),
    ServerConfig("no-batching", {"max_batch_size": 1}, "max_batch_size=1, NAC on, cache off"),
    ServerConfig(
        "fixed-wait", {"batch_wait": "fixed"}, "dynamic batching, fixed max_wait_ms window"
    ),
    ServerConfig("plain", {"scoring": False}, "dynamic batching, scoring=false (no NAC)"),
    ServerConfig("cache", {"cache_enabled": True}, "dynamic batching, NAC on, result cache on"),
)


@dataclass(frozen=True)
class BenchPlan:
    """How long and how hard to drive each configuration.

    Attributes:
        concurrency: closed-loop clients for the comparisons.
        rounds: interleaved rounds of the closed-loop comparisons.
        duration_s: measured seconds per configuration and round.
        warmup_s: unrecorded seconds before each measured window.
        sweep: closed-loop concurrencies of the sweep (:mod:`loadtest.sweep`).
        sweep_configs: the configurations swept side by side.
        sweep_rounds: interleaved rounds of the sweep.
        sweep_duration_s: measured seconds per sweep point and round.
        parts: what to run: ``closed`` (the comparisons; the open loops need it), ``sweep``,
            ``open``, ``inproc``, ``scale``, ``swap`` (the model repository swapping versions
            under load against steady state: :mod:`loadtest.swap_bench`).
        open_fractions: open-loop arrival rates as fractions of the saturation throughput.
        open_duration_s: measured seconds of the 0.5x and 2x open loops.
        open_point_duration_s: measured seconds of the other open-loop points.
        images_per_request: request sizes to draw from.
        multi_images: images per request of the second batching comparison (0: skip it).
        ood_fraction: share of generated OOD images.
        encodings: request encodings to draw from.
        repeated_images: distinct images behind the cache comparison's requests.
        inproc_batches: batch sizes of the in-process fast vs reference comparison.
        inproc_rounds: its round-robin rounds.
        inproc_min_s: least seconds per variant, batch size and round.
        protocols_only: run only the protocol comparison (/predict, v2 REST, gRPC).
        swap_duration_s: measured seconds per phase (steady, swap) of the swap part.
        swap_rounds: its interleaved rounds.
        swap_every_s: a new version every so many seconds of its swap phase.
    """

    concurrency: int = 32
    rounds: int = 3
    duration_s: float = 4.0
    warmup_s: float = 1.0
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sweep_configs: tuple[str, ...] = ("batching", "no-batching", "fixed-wait")
    sweep_rounds: int = 2
    sweep_duration_s: float = 2.0
    parts: tuple[str, ...] = ("closed", "sweep", "open", "inproc", "scale", "swap")
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 2.0)
    open_duration_s: float = 12.0
    open_point_duration_s: float = 4.0
    images_per_request: tuple[int, ...] = (1,)
    multi_images: int = 8
    ood_fraction: float = 0.2
    encodings: tuple[str, ...] = ENCODINGS
    repeated_images: int = 64
    inproc_batches: tuple[int, ...] = (1, 16, 64)
    inproc_rounds: int = 5
    inproc_min_s: float = 0.4
    protocols_only: bool = False
    swap_duration_s: float = 6.0
    swap_rounds: int = 2
    swap_every_s: float = 2.0

    @classmethod
    def quick(cls) -> BenchPlan:
        """Tiny durations: checks that everything runs and writes its outputs (smoke test)."""
        return cls(
            rounds=1,
            duration_s=1.0,
            warmup_s=0.3,
            sweep=(1, 8),
            sweep_rounds=1,
            sweep_duration_s=0.8,
            open_fractions=(0.5, 2.0),
            open_duration_s=1.0,
            open_point_duration_s=0.8,
            repeated_images=16,
            inproc_batches=(1, 16),
            inproc_rounds=1,
            inproc_min_s=0.05,
            swap_duration_s=2.5,
            swap_rounds=1,
            swap_every_s=1.0,
            # The scale part (four more servers, LitServe among them) and the swap part only
            # when asked for.
            parts=("closed", "sweep", "open", "inproc"),
        )


@dataclass
class Target:
    """One published target and whether this run met it.

    Attributes:
        name: what is promised.
        value: the measured figure.
        threshold: the bound.
        higher_is_better: ``value >= threshold`` passes (else ``value <= threshold``).
        detail: how the figure was obtained.
        met: whether it passed.
    """

    name: str
    value: float
    threshold: float
    higher_is_better: bool
    detail: str
    met: bool = field(init=False)

    def __post_init__(self) -> None:
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        self.met = bool(ok) and not math.isnan(self.value)


# --- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _servers(
    configs: Sequence[ServerConfig],
    profile: Path | None,
    extra: Mapping[str, object],
    log_dir: Path,
) -> Iterator[dict[str, RunningServer]]:
    """Start every configuration at once (startup is mostly waiting on imports) and stop them
    all at the end, also on errors."""
    running: dict[str, RunningServer] = {}

    def start(cfg: ServerConfig) -> tuple[str, RunningServer]:
        settings = {**BENCH_DEFAULTS, **extra, **cfg.overrides}
        server = start_server(profile, settings, log_path=log_dir / f"server-{cfg.name}.log")
        return cfg.name, server

    pool = ThreadPoolExecutor(max(1, len(configs)))  # none: a run of other parts only
    try:
        futures = [pool.submit(start, cfg) for cfg in configs]
        errors = []
        for future in futures:
            try:
                name, server = future.result()
                running[name] = server
            except RuntimeError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        yield running
    finally:
        list(pool.map(lambda s: s.stop(), running.values()))
        pool.shutdown()


# --- the in-process comparison -------------------------------------------------------------------


def nac_in_process(
    profile: Path | None,
    batches: Sequence[int],
    *,
    rounds: int,
    min_s: float,
    threads: int,
) -> list[dict[str, Any]]:
    """Images/s of the NAC fast path, plain classification and the reference-style NAC.

    Runs in this process on the CPU with ``threads`` intra-op threads (the servers' setting),
    variants round-robin, median over ``rounds``. The reference runs on a copy of the model
    whose parameters require grad, as the authors' code does; its scores are checked against
    the fast path's first.

    Returns:
        One row per batch size: ``batch``, ``fast_ips``, ``plain_ips``, ``reference_ips``,
        ``fast_over_reference`` and ``fast_over_plain``.
    """
    import torch

    from nacguard.bundle import load_bundle
    from nacguard.offline.reference import reference_scores
    from nacguard.settings import DEMO_PROFILE

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bundle = load_bundle(profile or DEMO_PROFILE, "cpu")
        ref_model = copy.deepcopy(bundle.model)
        for p in ref_model.parameters():
            p.requires_grad_(True)
        spec = bundle.preprocess
        gen = torch.Generator().manual_seed(0)
        rows = []
        for batch in batches:
            x = torch.randn(batch, spec.channels, *spec.size, generator=gen)
            torch.testing.assert_close(
                bundle.score(x).nac.cpu(),
                reference_scores(ref_model, bundle.profile, x).cpu(),
                atol=1e-4,
                rtol=0,
            )
            variants: dict[str, Callable[[], object]] = {
                "fast": functools.partial(bundle.score, x),
                "plain": functools.partial(bundle.classify, x),
                "reference": functools.partial(reference_scores, ref_model, bundle.profile, x),
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():
                fn()
            for _ in range(rounds):
                for name, fn in variants.items():
                    calls = 0
                    t0 = time.perf_counter()
                    while (elapsed := time.perf_counter() - t0) < min_s or calls < 2:
                        fn()
                        calls += 1
                    times[name].append(calls * batch / elapsed)
            ips = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                {
                    "batch": batch,
                    "fast_ips": ips["fast"],
                    "plain_ips": ips["plain"],
                    "reference_ips": ips["reference"],
                    "fast_over_reference": ips["fast"] / ips["reference"],
                    "fast_over_plain": ips["fast"] / ips["plain"],
                }
            )
        return rows
    finally:
        torch.set_num_threads(previous_threads)


# --- the run -------------------------------------------------------------------------------------


def _payloads(plan: BenchPlan, size: int) -> tuple[list[Payload], list[Payload], list[Payload]]:
    encodings: Any = plan.encodings
    unique = build_payloads(
        1024,
        images_per_request=plan.images_per_request,
        ood_fraction=plan.ood_fraction,
        encodings=encodings,
        size=size,
        seed=0,
    )
    repeated = build_payloads(
        512,
        images_per_request=plan.images_per_request,
        ood_fraction=plan.ood_fraction,
        encodings=encodings,
        distinct_images=plan.repeated_images,
        size=size,
        seed=1,
    )
    multi = (
        build_payloads(
            256,
            images_per_request=(plan.multi_images,),
            ood_fraction=plan.ood_fraction,
            encodings=[e for e in encodings if e != "raw"] or ["multipart"],
            size=size,
            seed=2,
        )
        if plan.multi_images > 1
        else []
    )
    return unique, repeated, multi


def _bundle_meta(profile: Path | None) -> dict[str, Any]:
    from nacguard.settings import DEMO_PROFILE

    meta: dict[str, Any] = json.loads(((profile or DEMO_PROFILE) / "bundle.json").read_text())
    return meta


def _input_size(profile: Path | None) -> int:
    return int(_bundle_meta(profile)["preprocess"]["size"][0])


#: The protocol comparison's configurations (all on the batching server, same images).
PROTOCOLS = ("/predict, raw images", "v2 REST (binary)", "gRPC")


def _log_run(r: RunResult) -> None:
    log.info(
        "  %-34s %8.1f img/s  p50 %7.1f  p99 %7.1f ms  batch %5.1f  codes %s",
        r.label,
        r.images_per_s,
        r.p50_ms,
        r.p99_ms,
        r.mean_batch,
        r.status_codes,
    )


def run_bench(
    plan: BenchPlan,
    *,
    profile: Path | None = None,
    extra: Mapping[str, object] | None = None,
    log_dir: Path,
) -> dict[str, Any]:
    """Run every comparison (see the module docstring) and return the report (JSON-able).

    Args:
        plan: durations and workload.
        profile: bundle to serve (``None``: the demo profile).
        extra: settings added to every server.
        log_dir: where the servers' logs go.
    """
    started = time.perf_counter()
    # Other work on the machine skews every figure: record how busy it was, before and after.
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    extra = dict(extra or {})
    unique, repeated, multi = _payloads(plan, _input_size(profile))
    # The protocols carry the same images as raw single-image /predict bodies (same seed).
    raw = build_payloads(
        1024, ood_fraction=plan.ood_fraction, encodings=["raw"], size=_input_size(profile), seed=0
    )
    model = str(_bundle_meta(profile).get("name", "unnamed"))
    grpc_port = _free_port()
    closed: dict[str, list[RunResult]] = {}
    swept: dict[str, dict[int, RunResult]] = {}
    opened: list[RunResult] = []
    wanted = set(plan.sweep_configs) if "sweep" in plan.parts else set()
    if "closed" in plan.parts:
        wanted |= {c.name for c in CONFIGS}
    configs = [c for c in CONFIGS if c.name in wanted]
    configs = [
        replace(c, overrides={**c.overrides, "grpc_port": grpc_port}) if c.name == "batching" else c
        for c in configs
        if not plan.protocols_only or c.name == "batching"
    ]
    with _servers(configs, profile, extra, log_dir) as servers:
        log.info("servers ready after %.0fs", time.perf_counter() - started)

        def closed_run(
            key: str, server: str, payloads: Sequence[Payload] | Sequence[GrpcRequest], **kw: Any
        ) -> RunResult:
            s = servers[server]
            kw.setdefault("concurrency", plan.concurrency)
            kw.setdefault("duration_s", plan.duration_s)
            kw.update(label=key, warmup_s=plan.warmup_s, server_pid=s.process.pid)
            if payloads and isinstance(payloads[0], GrpcRequest):
                target = f"127.0.0.1:{grpc_port}"
                loop = grpc_closed_loop(s.url, target, payloads, **kw)  # type: ignore[arg-type]
            else:
                loop = closed_loop(s.url, payloads, **kw)  # type: ignore[arg-type]
            result = asyncio.run(loop)
            _log_run(result)
            return result

        comparisons: list[tuple[str, str, Sequence[Payload] | Sequence[GrpcRequest]]] = [
            ("batching", "batching", unique),
            ("no-batching", "no-batching", unique),
            ("plain", "plain", unique),
            ("cache on, repeated images", "cache", repeated),
            ("cache off, repeated images", "batching", repeated),
        ]
        protocol_runs: list[tuple[str, str, Sequence[Payload] | Sequence[GrpcRequest]]] = [
            (PROTOCOLS[0], "batching", raw),
            (PROTOCOLS[1], "batching", v2_rest_payloads(raw, model)),
            (PROTOCOLS[2], "batching", grpc_requests(raw, model)),
        ]
        if plan.protocols_only:
            comparisons = [("batching", "batching", unique), *protocol_runs]
        else:
            comparisons += protocol_runs
        if multi and not plan.protocols_only:
            n = plan.multi_images
            comparisons += [
                (f"batching, {n} images/request", "batching", multi),
                (f"no-batching, {n} images/request", "no-batching", multi),
            ]
        for rnd in range(plan.rounds if "closed" in plan.parts else 0):
            log.info("closed loop, %d clients, round %d/%d", plan.concurrency, rnd + 1, plan.rounds)
            # Alternate the order between rounds so no configuration always follows another.
            order = comparisons if rnd % 2 == 0 else comparisons[::-1]
            for key, server, payloads in order:
                closed.setdefault(key, []).append(closed_run(key, server, payloads))
        merged = {k: merge_runs(v) for k, v in closed.items()}

        if "sweep" in plan.parts:
            log.info("concurrency sweep: %s clients, %d rounds", plan.sweep, plan.sweep_rounds)
            swept = run_sweep(
                lambda server, clients: closed_run(
                    server, server, unique, concurrency=clients, duration_s=plan.sweep_duration_s
                ),
                plan.sweep_configs,
                plan.sweep,
                plan.sweep_rounds,
            )

        saturation_rps = merged["batching"].throughput_rps if "batching" in merged else math.nan
        queue_bound = int(str({**BENCH_DEFAULTS, **extra}.get("max_queue_images", 1024)))
        run_open = "open" in plan.parts and "closed" in plan.parts
        for fraction in plan.open_fractions if run_open else ():
            s = servers["batching"]
            main_point = fraction in (0.5, 2.0)
            rate = max(1.0, fraction * saturation_rps)
            # Below saturation a few connections suffice; at and above it the pool must exceed
            # the server's bound on requests in progress, or the generator sheds load itself.
            pool = queue_bound if fraction < 1.0 else 2 * queue_bound
            result = asyncio.run(
                open_loop(
                    s.url,
                    unique,
                    rate=rate,
                    label=f"open {fraction:g}x",
                    duration_s=plan.open_duration_s if main_point else plan.open_point_duration_s,
                    warmup_s=plan.warmup_s,
                    max_connections=pool,
                    server_pid=s.process.pid,
                )
            )
            _log_run(result)
            opened.append(result)

    inproc: list[dict[str, Any]] = []
    if "inproc" in plan.parts:
        log.info("in-process NAC fast path vs reference")
        threads = int(str({**BENCH_DEFAULTS, **extra}.get("torch_threads", 1)) or 1)
        inproc = nac_in_process(
            profile,
            plan.inproc_batches,
            rounds=plan.inproc_rounds,
            min_s=plan.inproc_min_s,
            threads=max(1, threads),
        )
    scale: dict[str, Any] | None = None
    if "scale" in plan.parts:
        from loadtest.scale_bench import ScalePlan, run_scale, scale_targets

        log.info("workers, overload and the LitServe peer (scale_bench)")
        scale_plan = ScalePlan(
            concurrency=plan.concurrency,
            rounds=plan.rounds,
            duration_s=plan.duration_s,
            warmup_s=plan.warmup_s,
        )
        scale = run_scale(scale_plan, profile=profile, extra=extra, log_dir=log_dir)
    swap: dict[str, Any] | None = None
    if "swap" in plan.parts:
        from loadtest.swap_bench import run_swap

        log.info("the model repository swapping versions under load (swap_bench)")
        swap = run_swap(
            duration_s=plan.swap_duration_s,
            rounds=plan.swap_rounds,
            swap_every_s=plan.swap_every_s,
            profile=profile,
            extra=extra,
            log_dir=log_dir,
        )
    meta = _meta(plan, profile, extra)
    meta["load_average_at_start"] = load_at_start
    report: dict[str, Any] = {
        "meta": meta,
        "closed": {k: v.to_dict() for k, v in merged.items()},
        "closed_rounds": {k: [r.to_dict() for r in v] for k, v in closed.items()},
        "sweep": [r.to_dict() for by_clients in swept.values() for r in by_clients.values()],
        "sweep_table": sweep_rows(swept),
        "open": [r.to_dict() for r in opened],
        "saturation_rps": saturation_rps,
        "in_process": inproc,
    }
    report["ratios"] = _ratios(merged, plan.multi_images)
    targets = _targets(merged, opened) if merged else []
    targets += [Target(**t) for t in sweep_targets(report["sweep_table"])]
    if scale is not None:
        report["scale"] = scale
        targets += [Target(**t) for t in scale_targets(scale)]
    if swap is not None:
        from loadtest.swap_bench import swap_targets

        report["swap"] = swap
        targets += [Target(**t) for t in swap_targets(swap)]
    report["targets"] = [asdict(t) for t in targets]
    meta["wall_s"] = time.perf_counter() - started
    return report


def _ratios(m: Mapping[str, RunResult], multi_images: int = 0) -> dict[str, float]:
    def ratio(a: str, b: str) -> float:
        if a not in m or b not in m or not m[b].images_per_s:
            return math.nan
        return m[a].images_per_s / m[b].images_per_s

    out = {
        "batching_over_no_batching": ratio("batching", "no-batching"),
        "nac_over_plain": ratio("batching", "plain"),
        "cache_on_over_off": ratio("cache on, repeated images", "cache off, repeated images"),
        "v2_rest_over_predict": ratio(PROTOCOLS[1], "batching"),
        "grpc_over_predict": ratio(PROTOCOLS[2], "batching"),
        "v2_rest_over_predict_raw": ratio(PROTOCOLS[1], PROTOCOLS[0]),
        "grpc_over_predict_raw": ratio(PROTOCOLS[2], PROTOCOLS[0]),
    }
    if multi_images > 1:
        out["batching_over_no_batching_multi"] = ratio(
            f"batching, {multi_images} images/request",
            f"no-batching, {multi_images} images/request",
        )
    return out


def _targets(m: Mapping[str, RunResult], opened: Sequence[RunResult]) -> list[Target]:
    ratios = _ratios(m)
    protocols = [
        Target(
            f"Open Inference Protocol {name} >= {bound:g}x the images/s of /predict",
            ratios[key],
            bound,
            True,
            "closed loop, images/s ratio against /predict's mixed raw/multipart/JSON bodies "
            f"(against raw bodies only: {_f(ratios[key + '_raw'], '{:.2f}')}x)",
        )
        for name, key, bound in (
            ("REST (binary)", "v2_rest_over_predict", 0.9),
            ("gRPC", "grpc_over_predict", 1.0),
        )
    ]
    if "no-batching" not in m:  # --protocols-only
        return protocols
    targets = [
        *protocols,
        Target(
            "dynamic batching >= 3x the throughput of max_batch_size=1",
            ratios["batching_over_no_batching"],
            3.0,
            True,
            "closed loop, images/s ratio",
        ),
        Target(
            "NAC screening >= 0.6x plain classification throughput",
            ratios["nac_over_plain"],
            0.6,
            True,
            "closed loop, images/s ratio, scoring on vs scoring=false",
        ),
    ]
    half = next((r for r in opened if r.label == "open 0.5x"), None)
    if half is not None:
        targets.append(
            Target(
                "p99 <= 3x p50 at half the saturation throughput",
                half.p99_ms / half.p50_ms if half.p50_ms else math.nan,
                3.0,
                False,
                f"open loop at {half.target_rps:.0f} req/s: p50 {half.p50_ms:.1f} ms, "
                f"p99 {half.p99_ms:.1f} ms",
            )
        )
    below = [*m.values(), *(r for r in opened if _fraction(r) < 1.0)]
    # Requests the generator could not send (its connection pool busy) are not server errors;
    # they are reported beside the count.
    not_sent = sum(r.status_codes.get("not_sent", 0) for r in below)
    targets.append(
        Target(
            "zero errors below saturation",
            float(sum(r.errors for r in below) - not_sent),
            0.0,
            False,
            f"all closed-loop runs and open loops below 1x: {sum(r.sent for r in below)} requests"
            + (f", {not_sent} not sent (generator's pool busy)" if not_sent else ""),
        )
    )
    over = [r for r in opened if _fraction(r) > 1.0]
    if over:
        other = sum(r.errors - r.rejections - r.status_codes.get("not_sent", 0) for r in over)
        codes: dict[str, int] = {}
        for r in over:
            for k, v in r.status_codes.items():
                codes[k] = codes.get(k, 0) + v
        targets.append(
            Target(
                "above saturation only explicit 429/503 rejections",
                float(other),
                0.0,
                False,
                f"open loop at 2x: status codes {codes} (non-200 other than 429/503 counted)",
            )
        )
    return targets


def _fraction(r: RunResult) -> float:
    try:
        return float(r.label.split()[1].rstrip("x"))
    except (IndexError, ValueError):
        return math.nan


def _meta(plan: BenchPlan, profile: Path | None, extra: Mapping[str, object]) -> dict[str, Any]:
    import torch

    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=False,
        ).stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "profile": str(profile or "demo (profiles/fashion-mnist)"),
        "server_defaults": {**BENCH_DEFAULTS, **extra},
        "configs": [asdict(c) | {"overrides": dict(c.overrides)} for c in CONFIGS],
        "plan": asdict(plan),
        "load_average_at_end": load,
        "command": " ".join(["python", "loadtest/bench.py", *sys.argv[1:]]),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --- outputs -------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN/inf to None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def _codes(codes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in codes.items()) or "–"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: comparisons, latency/overload runs, in-process NAC, targets."""
    meta = report["meta"]
    plan = meta["plan"]
    c = report["closed"]
    lines = [
        f"Machine: {meta['cpu_count']} cores ({meta['cpu']}), Python {meta['python']}, "
        f"torch {meta['torch']}; commit {meta['commit'] or '?'}, {meta['date']}; load average "
        f"(1 min) {_f((meta.get('load_average_at_start') or [None])[0])} at the start, "
        f"{_f((meta.get('load_average_at_end') or [None])[0])} at the end. "
        + (
            f"Closed loop: {plan['concurrency']} clients, {plan['rounds']} interleaved rounds of "
            f"{plan['duration_s']:g} s per configuration. "
            if c
            else ""
        )
        + f"Requests of {'/'.join(str(n) for n in plan['images_per_request'])} image(s), "
        f"{plan['ood_fraction']:.0%} OOD, encodings {'/'.join(plan['encodings'])}.",
    ]
    if c:
        lines += _closed_table(report)
    if report.get("sweep_table"):
        lines += [
            "",
            f"Closed-loop concurrency sweep: {plan['sweep_rounds']} interleaved rounds of "
            f"{plan['sweep_duration_s']:g} s per point (after {plan['warmup_s']:g} s unrecorded); "
            "`batching` is the server defaults (adaptive wait, max_wait_ms bound 2), "
            "`fixed-wait` the same with batch_wait=fixed:",
            "",
            *render_sweep(report["sweep_table"], plan["sweep_configs"]),
        ]
    if report["open"]:
        lines += _open_table(report)
    if report["in_process"]:
        lines += _inproc_table(report)
    if report.get("scale"):
        from loadtest.scale_bench import render_scale_markdown

        lines += ["", "Workers, overload and the LitServe peer (`scale_bench.py`):", ""]
        lines += [render_scale_markdown(report["scale"])]
    if report.get("swap"):
        from loadtest.swap_bench import render_swap_markdown

        s = report["swap"]["settings"]
        lines += [
            "",
            f"Model repository, steady vs swapping (`swap_bench.py`): {s['rounds']} interleaved "
            f"rounds of {s['duration_s']:g} s per phase, a new version every "
            f"{s['swap_every_s']:g} s (every other one with new weights), {s['clients']} "
            f"clients, poll_interval_s={s['poll_interval_s']:g}, {s['workers']} worker(s):",
            "",
            render_swap_markdown(report["swap"]).rstrip("\n"),
        ]
    lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        op = ">=" if t["higher_is_better"] else "<="
        lines.append(
            f"| {t['name']} | {_f(t['value'], '{:.2f}')} ({t['detail']}) | {op} "
            f"{t['threshold']:g} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def _closed_table(report: Mapping[str, Any]) -> list[str]:
    plan = report["meta"]["plan"]
    c = report["closed"]
    r = report["ratios"]
    lines = [
        "",
        "| comparison | configuration | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch"
        " | server CPU ms/req | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(group: str, key: str, ratio: str = "") -> str:
        x = c[key]
        return (
            f"| {group} | {key} | {_f(x['images_per_s'])} | {_f(x['p50_ms'])} | {_f(x['p95_ms'])}"
            f" | {_f(x['p99_ms'])} | {x['errors']} | {_f(x['mean_batch'])} "
            f"| {_f(x['server_cpu_ms_per_request'], '{:.2f}')} | {ratio} |"
        )

    if "no-batching" in c:  # not with --protocols-only
        lines += [
            row("batching", "batching", f"**{_f(r['batching_over_no_batching'], '{:.2f}')}x**"),
            row("batching", "no-batching", "1x"),
            row("NAC screening", "batching", f"**{_f(r['nac_over_plain'], '{:.2f}')}x**"),
            row("NAC screening", "plain", "1x"),
            row(
                "result cache",
                "cache on, repeated images",
                f"**{_f(r['cache_on_over_off'], '{:.2f}')}x** "
                f"({c['cache on, repeated images']['cache_hit_rate']:.0%} hits)",
            ),
            row("result cache", "cache off, repeated images", "1x"),
        ]
    if PROTOCOLS[2] in c:
        lines += [
            row("protocols", "batching", "1x (/predict, mixed bodies)"),
            row("protocols", PROTOCOLS[0], ""),
            row("protocols", PROTOCOLS[1], f"**{_f(r.get('v2_rest_over_predict'), '{:.2f}')}x**"),
            row("protocols", PROTOCOLS[2], f"**{_f(r.get('grpc_over_predict'), '{:.2f}')}x**"),
        ]
    n = plan.get("multi_images", 0)
    if n and f"batching, {n} images/request" in c:
        lines += [
            row(
                f"batching, {n}-image requests",
                f"batching, {n} images/request",
                f"**{_f(r.get('batching_over_no_batching_multi'), '{:.2f}')}x**",
            ),
            row(f"batching, {n}-image requests", f"no-batching, {n} images/request", "1x"),
        ]
    return lines


def _open_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        f"Open loop on the batching server (saturation = {report['saturation_rps']:.0f} req/s, "
        "the closed-loop throughput above; latency from each request's scheduled send time):",
        "",
        "| arrival rate | req/s asked | req/s answered 200 | p50 ms | p95 ms | p99 ms | p99/p50 "
        "| mean batch | status codes | 429/503 p99 ms | generator lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in report["open"]:
        ratio = o["p99_ms"] / o["p50_ms"] if o["p50_ms"] and o["p99_ms"] is not None else None
        lines.append(
            f"| {o['label'].split()[1]} | {o['target_rps']:.0f} | {_f(o['throughput_rps'])} "
            f"| {_f(o['p50_ms'])} | {_f(o['p95_ms'])} | {_f(o['p99_ms'])} | {_f(ratio, '{:.2f}')} "
            f"| {_f(o['mean_batch'])} | {_codes(o['status_codes'])} "
            f"| {_f(o.get('rejected_p99_ms'))} | {_f(o.get('send_lag_p99_ms'))} |"
        )
    return lines


def _inproc_table(report: Mapping[str, Any]) -> list[str]:
    meta = report["meta"]
    lines = [
        "",
        "NAC fast path against the reference-style computation, in-process (no HTTP), images/s "
        f"with {meta['server_defaults'].get('torch_threads', '?')} torch thread(s):",
        "",
        "| batch | fast path | reference-style | fast / reference | plain classification "
        "| fast / plain |",
        "|---|---|---|---|---|---|",
    ]
    for row_ in report["in_process"]:
        lines.append(
            f"| {row_['batch']} | {row_['fast_ips']:.0f} | {row_['reference_ips']:.0f} "
            f"| **{row_['fast_over_reference']:.2f}x** | {row_['plain_ips']:.0f} "
            f"| {row_['fast_over_plain']:.2f}x |"
        )
    return lines


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Latency (p50 and p99) against throughput: closed-loop curves per configuration and the
    open-loop points of the batching server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    curves: dict[str, list[dict[str, Any]]] = {}
    for run in report["sweep"]:
        curves.setdefault(run["label"], []).append(run)
    swept = {run["concurrency"] for run in report["sweep"]}
    for key in ("batching", "no-batching"):
        # The comparisons' concurrency joins the curves unless the sweep measured it too.
        if key in report["closed"] and report["closed"][key]["concurrency"] not in swept:
            curves.setdefault(key, []).append(report["closed"][key])
    for ax, q in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for label, runs in curves.items():
            pts = sorted(
                (r["concurrency"], r["images_per_s"], r[q]) for r in runs if r[q] is not None
            )
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=f"{label} (closed)")
            for conc, x, y in pts:
                ax.annotate(
                    str(conc), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7
                )
        pts = [
            (o["images_per_s"], o[q], o["label"].split()[1])
            for o in report["open"]
            if o[q] is not None
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", label="batching (open loop)")
            for x, y, text in pts:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("throughput (images/s answered 200)")
        ax.set_ylabel(f"{q[:3]} latency (ms)")
        ax.set_title(f"{q[:3]} latency against throughput")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("nacguard, demo profile (labels: closed-loop clients / open-loop load)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``latency_throughput.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "bench.json",
        "markdown": out / "bench.md",
        "plot": out / "latency_throughput.png",
    }
    clean = _clean(dict(report))
    paths["json"].write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(clean))
    plot(clean, paths["plot"])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny durations (smoke test)")
    p.add_argument(
        "--workload",
        choices=("demo", "photos"),
        default="demo",
        help="demo: the comparisons above; photos: 3-12 MP JPEGs into ResNet-18 at 224 "
        "(loadtest/photos_bench.py; uses --out, --quick, --concurrency, --rounds, "
        "--duration, --set)",
    )
    p.add_argument("--profile", type=Path, help="bundle directory (default: the demo profile)")
    p.add_argument("--concurrency", type=int, help="closed-loop clients (default 32)")
    p.add_argument("--rounds", type=int, help="interleaved closed-loop rounds (default 3)")
    p.add_argument("--duration", type=float, help="measured seconds per configuration and round")
    p.add_argument(
        "--images-per-request",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="request sizes to draw from, e.g. 1 or 1,1,8 (default 1)",
    )
    p.add_argument("--ood-fraction", type=float, help="share of generated OOD images (0.2)")
    p.add_argument(
        "--parts",
        type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
        help="what to run, of closed,sweep,open,inproc,scale,swap (default all; open needs "
        "closed; --quick leaves out scale and swap)",
    )
    p.add_argument(
        "--sweep",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        help="closed-loop clients of the sweep (default 1,2,4,8,16,32,64)",
    )
    p.add_argument("--sweep-rounds", type=int, help="interleaved rounds of the sweep (2)")
    p.add_argument("--sweep-duration", type=float, help="measured seconds per sweep point (2)")
    p.add_argument(
        "--protocols-only",
        action="store_true",
        help="only /predict against the Open Inference Protocol's REST and gRPC (--parts closed)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=setting,
        metavar="NAME=VALUE",
        help="setting for all servers",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # start_server's readiness polls
    plan = BenchPlan.quick() if args.quick else BenchPlan()
    changes: dict[str, Any] = {}
    for name, value in (
        ("concurrency", args.concurrency),
        ("rounds", args.rounds),
        ("duration_s", args.duration),
        ("images_per_request", args.images_per_request),
        ("ood_fraction", args.ood_fraction),
        ("parts", args.parts),
        ("sweep", args.sweep),
        ("sweep_rounds", args.sweep_rounds),
        ("sweep_duration_s", args.sweep_duration),
        ("protocols_only", args.protocols_only or None),
    ):
        if value is not None:
            changes[name] = value
    if args.protocols_only:
        changes["parts"] = ("closed",)
    plan = BenchPlan(**{**asdict(plan), **changes})
    extra: dict[str, object] = dict(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workload == "photos":
        return _photos(args, extra)
    report = run_bench(plan, profile=args.profile, extra=extra, log_dir=args.out)
    paths = write_outputs(report, args.out)
    sys.stdout.write(paths["markdown"].read_text())
    log.info(
        "wrote %s in %.0fs", ", ".join(str(p) for p in paths.values()), report["meta"]["wall_s"]
    )
    return 0


def _photos(args: argparse.Namespace, extra: dict[str, object]) -> int:
    from loadtest.photos_bench import PhotosPlan, run_photos, write_photos

    plan = PhotosPlan.quick() if args.quick else PhotosPlan()
    changes = {
        k: v
        for k, v in (
            ("concurrency", args.concurrency),
            ("rounds", args.rounds),
            ("duration_s", args.duration),
        )
        if v is not None
    }
    report = run_photos(PhotosPlan(**{**asdict(plan), **changes}), args.out, extra)
    paths = write_photos(report, args.out)
    sys.stdout.write(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
