"""GPU benchmark of nacguard: one prepared script for a CUDA machine, done in under 5 minutes.

Prints one table for a torchvision ResNet-50 at 224x224 (random weights: speed does not depend
on them), bf16 autocast, channels_last, batch 256:

* plain forward, eager and torch.compile'd;
* NAC on ``avgpool`` only (analytic head gradient: one forward under inference_mode), eager
  and compiled;
* NAC on layer1..layer3 + avgpool with the published ImageNet settings (O / M / beta: layer1
  5000/1000/1, layer2 50/500/0.01, layer3 500/50/300, avgpool 10/50/3000): one
  activation-only gradient call eagerly, the "probe" split when compiled;
* the reference-style computation (:func:`nacguard.offline.reference.reference_scores`: parameter
  gradients on, one ``autograd.grad`` per layer, B x (M-1) x N comparison tensors);
* batched GPU JPEG decoding (nvjpeg, 256 images of 500x375) against one CPU thread of Pillow,
  and the on-device resize/crop/normalise that follows it;
* score fidelity of bf16 and fp16 against fp32 on the same inputs (random weights and inputs:
  a pessimistic case, see docs/gpu.md);
* score fidelity of GPU JPEG decoding (``gpu_decode``) against CPU decoding on the demo's
  validation sets (:mod:`loadtest.gpu_decode_fidelity`);
* end-to-end server throughput: ``nacguard serve`` on a ResNet-50 bundle built on the fly (in a
  temporary directory, with :func:`nacguard.bundle.save_bundle`), driven with 224x224
  JPEG uploads (raw ``image/jpeg`` bodies) at high concurrency by several load-generator
  processes.

Compiled variants run in child processes with a timeout, so a slow compile cannot push the run
past its time budget; what does not fit is reported as skipped. Usage::

    python loadtest/gpu_bench.py [--json out.json]     # on a CUDA machine
    python loadtest/gpu_bench.py --cpu-smoke           # everything tiny on CPU, < 1 minute

The load generator is the project's lean HTTP/1.1 driver (:mod:`loadtest.drivers`) rather than
httpx: at thousands of requests per second httpx's ~2.8 ms of client CPU per request would make
the client the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision
from PIL import Image

from nacguard.accel import CompileConfig, accelerate
from nacguard.bundle import Calibration, save_bundle
from nacguard.imaging.gpu_jpeg import decode_jpeg_batch, preprocess_tensors
from nacguard.imaging.preprocess import PreprocessSpec, decode_image
from nacguard.nac import LayerConfig, NacProfile, NacScorer, ProfileBuilder, threshold_at_tpr
from nacguard.offline.precision import compare_precision
from nacguard.offline.reference import reference_scores

log = logging.getLogger("nacguard.gpu_bench")

# The published ResNet-50 / ImageNet settings: LayerConfig(name, beta, O, M).
LAYERS_4 = [
    LayerConfig("layer1", 1.0, 5000.0, 1000),
    LayerConfig("layer2", 0.01, 50.0, 500),
    LayerConfig("layer3", 300.0, 500.0, 50),
    LayerConfig("avgpool", 3000.0, 10.0, 50),
]
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """Everything a run measures, and how big."""

    device: str
    model: str
    size: int
    batch: int
    rounds: int
    precision: str
    channels_last: bool
    compile_backend: str
    compile_mode: str | None
    decode_images: int
    decode_shape: tuple[int, int]
    fidelity_images: int
    fidelity_dtypes: tuple[str, ...]
    server_buckets: str
    server_max_batch: int
    server_clients: int
    server_concurrency: int
    server_duration_s: float
    server_warmup_s: float
    server_payloads: int
    budget_s: float


FULL = Plan(
    device="cuda",
    model="resnet50",
    size=224,
    batch=256,
    rounds=10,
    precision="bf16",
    channels_last=True,
    compile_backend="inductor",
    compile_mode=None,
    decode_images=256,
    decode_shape=(500, 375),
    fidelity_images=512,
    fidelity_dtypes=("bf16", "fp16"),
    server_buckets="32,64,128,256",
    server_max_batch=256,
    server_clients=4,
    server_concurrency=96,
    server_duration_s=15.0,
    server_warmup_s=3.0,
    server_payloads=512,
    budget_s=270.0,  # + ~10 s of imports: under 5 minutes
)

SMOKE = Plan(
    device="cpu",
    model="resnet18",
    size=32,
    batch=2,
    rounds=2,
    precision="bf16",
    channels_last=True,
    compile_backend="eager",  # Dynamo capture of the same graphs, no code generation
    compile_mode=None,
    decode_images=8,
    decode_shape=(125, 94),
    fidelity_images=8,
    fidelity_dtypes=("bf16",),
    server_buckets="4,8",
    server_max_batch=8,
    server_clients=1,
    server_concurrency=4,
    server_duration_s=3.0,
    server_warmup_s=1.0,
    server_payloads=16,
    budget_s=48.0,
)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(fn: Callable[[], object], n: int, rounds: int, device: torch.device) -> float:
    """Median images/s of ``fn`` (which processes ``n`` images) over ``rounds`` timed calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


@dataclass
class Setup:
    """The model, an input batch and the two profiles every section uses."""

    device: torch.device
    model: torch.nn.Module
    x: torch.Tensor
    profile4: NacProfile
    profile1: NacProfile


def _setup(plan: Plan) -> Setup:
    device = torch.device(plan.device)
    torch.manual_seed(0)
    model = torchvision.models.get_model(plan.model, weights=None).eval().to(device)
    x = torch.randn(plan.batch, 3, plan.size, plan.size, device=device)
    # Profiles are counted in fp32 and contiguous format, as `nacguard profile build` does.
    profile4 = ProfileBuilder(model, LAYERS_4).fit([x])
    profile1 = ProfileBuilder(model, LAYERS_4[-1:]).fit([x])
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return Setup(device, model, x, profile4, profile1)


def _autocast(plan: Plan, device: torch.device) -> Any:
    dtype = _DTYPES[plan.precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_eager(plan: Plan) -> dict[str, Any]:
    """Plain forward, NAC avgpool, NAC 4 layers and the reference style, all eager."""
    s = _setup(plan)
    dtype = _DTYPES[plan.precision]
    fast4 = NacScorer(s.model, s.profile4, device=s.device, autocast_dtype=dtype)
    fast1 = NacScorer(s.model, s.profile1, device=s.device, autocast_dtype=dtype)
    ref_model = torchvision.models.get_model(plan.model, weights=None).eval().to(s.device)
    ref_model.load_state_dict(s.model.state_dict())  # parameters keep requires_grad, as naively
    if plan.channels_last:
        ref_model.to(memory_format=torch.channels_last)

    def plain() -> None:
        with torch.inference_mode(), _autocast(plan, s.device):
            s.model(s.x)

    def reference() -> None:
        with _autocast(plan, s.device):
            reference_scores(ref_model, s.profile4, s.x)

    # Same numbers (fp32, a few images): the fast path and the reference agree.
    few = s.x[:4].contiguous()
    agree = float(
        (
            NacScorer(s.model, s.profile4, device=s.device)(few).nac
            - reference_scores(ref_model, s.profile4, few)
        )
        .abs()
        .max()
    )
    rows = {
        "plain": _images_per_s(plain, plan.batch, plan.rounds, s.device),
        "nac-avgpool": _images_per_s(lambda: fast1(s.x), plan.batch, plan.rounds, s.device),
        "nac-4": _images_per_s(lambda: fast4(s.x), plan.batch, plan.rounds, s.device),
        "reference": _images_per_s(reference, plan.batch, max(2, plan.rounds // 3), s.device),
    }
    return {"images_per_s": rows, "fast_vs_reference_max_abs_fp32": agree}


def section_compiled(plan: Plan, which: str) -> dict[str, Any]:
    """Compiled variants: ``forward`` (plain + avgpool-only NAC) or ``nac4`` (probe split)."""
    s = _setup(plan)
    dtype = _DTYPES[plan.precision]
    config = CompileConfig(mode=plan.compile_mode, backend=plan.compile_backend)
    profile = s.profile1 if which == "forward" else s.profile4
    eager = NacScorer(s.model, profile, device=s.device, autocast_dtype=dtype)
    scorer = NacScorer(s.model, profile, device=s.device, autocast_dtype=dtype)
    t0 = time.perf_counter()
    paths = accelerate(s.model, scorer, s.x[:1], config, max_shapes=1)
    if paths.states is not None:
        scorer.states_fn = paths.states
    scorer(s.x)  # compiles
    rows: dict[str, float] = {}
    if which == "forward":

        def plain() -> None:
            with torch.inference_mode(), _autocast(plan, s.device):
                paths.plain(s.x)

        plain()
        compile_s = time.perf_counter() - t0
        rows["plain"] = _images_per_s(plain, plan.batch, plan.rounds, s.device)
        rows["nac-avgpool"] = _images_per_s(lambda: scorer(s.x), plan.batch, plan.rounds, s.device)
    else:
        compile_s = time.perf_counter() - t0
        rows["nac-4"] = _images_per_s(lambda: scorer(s.x), plan.batch, plan.rounds, s.device)
    diff = float((scorer(s.x).nac - eager(s.x).nac).abs().max())
    return {
        "images_per_s": rows,
        "compile_s": compile_s,
        "nac_path": paths.states.path if paths.states is not None else "eager",
        "still_compiled": paths.active,
        "max_abs_nac_vs_eager": diff,
    }


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def section_decode(plan: Plan) -> dict[str, Any]:
    """Batched nvjpeg decode (+ device preprocessing) against Pillow on one CPU thread."""
    w, h = plan.decode_shape
    datas = [_jpeg(_photo(w, h, seed)) for seed in range(plan.decode_images)]
    spec = PreprocessSpec()
    n_cpu = min(len(datas), 64)
    t0 = time.perf_counter()
    for d in datas[:n_cpu]:
        decode_image(d, max_pixels=10**8).convert("RGB")
    pil = n_cpu / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    spec.batch([decode_image(d, max_pixels=10**8) for d in datas[:n_cpu]])
    pil_full = n_cpu / (time.perf_counter() - t0)
    out: dict[str, Any] = {"pil_decode_1_thread": pil, "pil_decode_preprocess_1_thread": pil_full}
    device = torch.device(plan.device)
    if device.type != "cuda":
        cpu = decode_jpeg_batch(datas, "cpu")
        out["torchvision_cpu_decoded"] = sum(t is not None for t in cpu)
        return out
    rounds = max(3, plan.rounds // 2)
    out["nvjpeg_decode"] = _images_per_s(
        lambda: decode_jpeg_batch(datas, device), len(datas), rounds, device
    )

    def decode_and_preprocess() -> None:
        decoded = [t for t in decode_jpeg_batch(datas, device) if t is not None]
        preprocess_tensors(decoded, spec)

    out["nvjpeg_decode_preprocess"] = _images_per_s(
        decode_and_preprocess, len(datas), rounds, device
    )
    out["speedup_vs_pil"] = out["nvjpeg_decode"] / pil
    return out


def section_fidelity(plan: Plan) -> dict[str, Any]:
    """bf16 and fp16 NAC scores against fp32 (random weights and inputs: pessimistic)."""
    s = _setup(plan)
    s.model.to(memory_format=torch.contiguous_format)
    gen = torch.Generator(device=s.device).manual_seed(1)
    n = plan.fidelity_images
    ind = torch.randn(n, 3, plan.size, plan.size, device=s.device, generator=gen)
    ood = torch.rand(n, 3, plan.size, plan.size, device=s.device, generator=gen) * 4 - 2
    out = {}
    for name in plan.fidelity_dtypes:
        dtype = _DTYPES[name]
        assert dtype is not None
        for label, profile in (("nac-4", s.profile4), ("nac-avgpool", s.profile1)):
            report = compare_precision(
                s.model, profile, ind, {"uniform": ood}, dtype, batch_size=plan.batch
            )
            out[f"{name}/{label}"] = report.to_dict()
    return out


def _server_bundle(plan: Plan, out: Path) -> Path:
    s = _setup(plan)
    s.model.to(memory_format=torch.contiguous_format)
    # 224x224 uploads, no resize: the server's CPU work is decoding, not resampling.
    spec = PreprocessSpec(size=(plan.size, plan.size), resize=None)
    scores = NacScorer(s.model, s.profile4, device=s.device)(s.x.contiguous()).nac.cpu().numpy()
    scores = scores.astype(np.float64)
    calibration = Calibration(0.95, threshold_at_tpr(scores, 0.95), np.sort(scores), "random")
    return save_bundle(
        out,
        name=f"{plan.model}-random",
        model_ref={"kind": "torchvision", "name": plan.model, "kwargs": {}},
        model=s.model,
        preprocess=spec,
        classes=[f"class{i}" for i in range(1000)],
        profile=s.profile4,
        calibration=calibration,
        provenance={"purpose": "loadtest/gpu_bench.py", "weights": "random"},
    )


def _drive(url: str, bodies: list[bytes], plan: Plan, server_pid: int) -> Any:
    """One load generator: a closed loop of raw JPEG uploads; returns its RunResult."""
    from loadtest.drivers import closed_loop
    from loadtest.workload import Payload

    payloads = [Payload(b, "image/jpeg", 1, 0, "raw") for b in bodies]
    return asyncio.run(
        closed_loop(
            url,
            payloads,
            label="jpeg-224",
            concurrency=plan.server_concurrency,
            duration_s=plan.server_duration_s,
            warmup_s=plan.server_warmup_s,
            server_pid=server_pid,
        )
    )


def _client_process(
    url: str, bodies: list[bytes], plan: Plan, server_pid: int, start: Any, results: Any
) -> None:
    """Child load generator: waits for its siblings (so the measured windows coincide), then
    drives the server and reports its RunResult."""
    start.wait(120)
    results.put(_drive(url, bodies, plan, server_pid))


def _drive_concurrently(url: str, bodies: list[bytes], plan: Plan, server_pid: int) -> list[Any]:
    if plan.server_clients == 1:
        return [_drive(url, bodies, plan, server_pid)]
    # One event loop per process: a single one could not keep a GPU server busy.
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(plan.server_clients), ctx.Queue()
    procs = [
        ctx.Process(
            target=_client_process,
            args=(url, bodies[i :: plan.server_clients], plan, server_pid, start, results),
        )
        for i in range(plan.server_clients)
    ]
    for proc in procs:
        proc.start()
    limit = 180 + plan.server_warmup_s + plan.server_duration_s
    try:
        return [results.get(timeout=limit) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def section_server(plan: Plan) -> dict[str, Any]:
    """``nacguard serve`` on a fresh ResNet bundle, driven with JPEG uploads."""
    try:
        from loadtest.batching_bench import start_server
        from loadtest.drivers import merge_runs

        import nacguard.api.server  # noqa: F401 - is the server there at all?
    except ImportError as exc:
        return {"skipped": f"server or load driver not importable: {exc}"}
    bodies = [_jpeg(_photo(plan.size, plan.size, seed)) for seed in range(plan.server_payloads)]
    with tempfile.TemporaryDirectory(prefix="nacguard-gpu-bench-") as tmp:
        bundle = _server_bundle(plan, Path(tmp) / "bundle")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        overrides = {
            "device": plan.device,
            "precision": plan.precision,
            "channels_last": plan.channels_last,
            "batch_buckets": json.dumps([int(b) for b in plan.server_buckets.split(",")]),
            "max_batch_size": plan.server_max_batch,
            "max_queue_images": 8192,
            "max_wait_ms": 2,
            "request_timeout_s": 60,
            "cache_enabled": False,
            "log_level": "warning",
            "torch_threads": max(1, (os.cpu_count() or 2) // 4),
        }
        started = time.perf_counter()
        server = start_server(bundle, overrides, log_path=Path(tmp) / "serve.log")
        ready_s = time.perf_counter() - started
        try:
            runs = _drive_concurrently(server.url, bodies, plan, server.process.pid)
        finally:
            status = server.stop()
    # The generators ran side by side over the same window: their rates add up. (merge_runs
    # pools runs made one after another, so its rate is per generator; its latencies and
    # batch statistics are what we want.)
    run = merge_runs(runs, label="jpeg-224")
    return {
        "images_per_s": sum(r.images_per_s for r in runs),
        "p50_ms": run.p50_ms,
        "p99_ms": run.p99_ms,
        "mean_batch": run.mean_batch,
        "errors": run.errors,
        "concurrency": plan.server_clients * plan.server_concurrency,
        "ready_s": ready_s,
        "exit_status": status,
        "settings": {k: str(v) for k, v in overrides.items()},
    }


def section_decode_fidelity(plan: Plan) -> dict[str, Any]:
    """NAC scores of GPU- against CPU-decoded JPEGs (:mod:`loadtest.gpu_decode_fidelity`)."""
    from loadtest.gpu_decode_fidelity import decode_fidelity

    return decode_fidelity(plan.device, max(8, plan.fidelity_images // 2))


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "eager": section_eager,
    "decode": section_decode,
    "fidelity": section_fidelity,
    "decode_fidelity": section_decode_fidelity,
    "server": section_server,
}


# --------------------------------------------------------------------------------------------
# Orchestration and the table
# --------------------------------------------------------------------------------------------


COMPILED = ("compiled:forward", "compiled:nac4")


def _compiled_child(plan: Plan, out: Path) -> None:
    """Child process: the compiled sections in turn, each written to ``out`` as it completes
    (so a timeout during the second keeps the first)."""
    done: dict[str, Any] = {}
    for name in COMPILED:
        done[name] = section_compiled(plan, name.split(":")[1])
        out.write_text(json.dumps(done))


def _compiled_in_child(plan: Plan, timeout: float, smoke: bool) -> dict[str, dict[str, Any]]:
    """Run the compiled sections in one child process, killed at ``timeout`` seconds."""
    if timeout < (5 if smoke else 30):
        return {key: {"skipped": "no time left in the budget"} for key in COMPILED}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", "compiled"]
    cmd += ["--section-out", str(out), "--device", plan.device]
    if smoke:
        cmd.append("--cpu-smoke")
    failure: dict[str, Any] = {}
    try:
        done = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            failure = {"error": done.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        failure = {"skipped": f"did not finish within {timeout:.0f}s (compile time)"}
    try:
        text = out.read_text()
        results: dict[str, dict[str, Any]] = json.loads(text) if text else {}
    finally:
        out.unlink(missing_ok=True)
    return {name: results.get(name, failure or {"error": "no result"}) for name in COMPILED}


def run(plan: Plan, *, smoke: bool, skip_server: bool, no_compile: bool) -> dict[str, Any]:
    """Every section within ``plan.budget_s``; returns the JSON-able result."""
    start = time.perf_counter()
    deadline = start + plan.budget_s
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "device_name": torch.cuda.get_device_name(0) if plan.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "sections": {},
        "seconds": {},
    }
    for name in ["eager", "decode", "fidelity", "decode_fidelity", "server", "compiled"]:
        t0 = time.perf_counter()
        left = deadline - t0
        if name == "compiled":
            if no_compile:
                parts = {key: {"skipped": "--no-compile"} for key in COMPILED}
            else:
                parts = _compiled_in_child(plan, left - 2, smoke)
            result["sections"].update(parts)
            result["seconds"][name] = round(time.perf_counter() - t0, 1)
            continue
        if name == "server" and skip_server:
            section: dict[str, Any] = {"skipped": "--skip-server"}
        elif left < 5:
            section = {"skipped": "no time left in the budget"}
        else:
            try:
                section = SECTIONS[name](plan)
            except Exception as exc:  # a broken section must not lose the others' numbers
                log.exception("section %s failed", name)
                section = {"error": f"{type(exc).__name__}: {exc}"}
        result["sections"][name] = section
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        log.info("%s done in %.1fs", name, time.perf_counter() - t0)
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def _fmt(v: Any, spec: str = "{:,.0f}") -> str:
    return spec.format(v) if isinstance(v, int | float) else "-"


def render(result: dict[str, Any]) -> str:
    """The result as a markdown report."""
    plan, sec = result["plan"], result["sections"]
    eager = sec.get("eager", {}).get("images_per_s", {})
    comp: dict[str, float] = {}
    for key in COMPILED:
        comp.update(sec.get(key, {}).get("images_per_s", {}))
    lines = [
        f"{plan['model']} {plan['size']}x{plan['size']}, batch {plan['batch']}, "
        f"{plan['precision']}, channels_last={plan['channels_last']}, "
        f"{result['device_name']} (torch {result['torch']}), {result['total_s']}s total",
        "",
        "| path | eager img/s | compiled img/s |",
        "|---|---|---|",
    ]
    names = {
        "plain": "plain forward",
        "nac-avgpool": "NAC avgpool (analytic head)",
        "nac-4": "NAC layer1..3 + avgpool (one grad call / probes)",
        "reference": "reference style (param grads, grad per layer)",
    }
    for key, label in names.items():
        lines.append(f"| {label} | {_fmt(eager.get(key))} | {_fmt(comp.get(key))} |")
    for key in COMPILED:
        info = sec.get(key, {})
        if "skipped" in info or "error" in info:
            lines.append(f"\n{key}: {info.get('skipped') or info.get('error', '')[:300]}")
        elif info:
            lines.append(
                f"\n{key}: compiled in {info['compile_s']:.0f}s, NAC path {info['nac_path']}, "
                f"max |NAC - eager| {info['max_abs_nac_vs_eager']:.4f}"
            )
    if "fast_vs_reference_max_abs_fp32" in sec.get("eager", {}):
        lines.append(
            "fast path vs reference (fp32): max |diff| "
            f"{sec['eager']['fast_vs_reference_max_abs_fp32']:.2e}"
        )
    dec = sec.get("decode", {})
    lines += ["", "| JPEG decode | img/s |", "|---|---|"]
    lines.append(f"| Pillow, 1 CPU thread | {_fmt(dec.get('pil_decode_1_thread'))} |")
    lines.append(
        f"| Pillow + preprocess, 1 CPU thread | {_fmt(dec.get('pil_decode_preprocess_1_thread'))} |"
    )
    lines.append(f"| nvjpeg batch | {_fmt(dec.get('nvjpeg_decode'))} |")
    lines.append(
        f"| nvjpeg batch + device preprocess | {_fmt(dec.get('nvjpeg_decode_preprocess'))} |"
    )
    fid = sec.get("fidelity", {})
    if fid and "error" not in fid and "skipped" not in fid:
        lines += ["", "| fidelity vs fp32 | correlation | max AUROC delta |", "|---|---|---|"]
        for key, rep in fid.items():
            lines.append(f"| {key} | {rep['correlation']:.5f} | {rep['max_auroc_delta']:.4f} |")
    if "decode_fidelity" in sec:
        from loadtest.gpu_decode_fidelity import render as render_decode_fidelity

        lines += render_decode_fidelity(sec["decode_fidelity"])
    srv = sec.get("server", {})
    lines.append("")
    if "images_per_s" in srv:
        lines.append(
            f"server end-to-end ({plan['size']}x{plan['size']} JPEG uploads, "
            f"{srv['concurrency']} connections): {srv['images_per_s']:,.0f} img/s, "
            f"p50 {srv['p50_ms']:.1f} ms, p99 {srv['p99_ms']:.1f} ms, mean batch "
            f"{_fmt(srv['mean_batch'], '{:.1f}')}, errors {srv['errors']}, ready in "
            f"{srv['ready_s']:.1f}s"
        )
    else:
        lines.append(f"server: {srv.get('skipped') or srv.get('error', 'not run')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (< 1 minute)")
    p.add_argument("--device", help="override the device (default cuda; cpu with --cpu-smoke)")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--server-clients", type=int, help="load-generator processes")
    p.add_argument("--server-concurrency", type=int, help="connections per generator")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling
    plan = SMOKE if args.cpu_smoke else FULL
    if args.device:
        plan = replace(plan, device=args.device)
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    if args.server_clients:
        plan = replace(plan, server_clients=args.server_clients)
    if args.server_concurrency:
        plan = replace(plan, server_concurrency=args.server_concurrency)
    if args.cpu_smoke:
        torch.set_num_threads(1)
    if args.section:  # the child process of the compiled sections
        _compiled_child(plan, Path(args.section_out))
        return 0
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke (or --device cpu)", file=sys.stderr)
        return 2
    result = run(
        plan, smoke=args.cpu_smoke, skip_server=args.skip_server, no_compile=args.no_compile
    )
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
