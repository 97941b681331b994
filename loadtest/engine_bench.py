"""The batcher's own cost per request, in-process: no HTTP, a compute function that does nothing.

What a lone request pays for going through the engine, against a bare
:class:`~nacguard.engine.Runner` (one thread hop there and back), with ``max_batch_size=1``,
with the adaptive policy and with the fixed 2 ms window, interleaved round by round, median of
the rounds::

    python loadtest/engine_bench.py                 # 1 and 8 concurrent submitters
    python loadtest/engine_bench.py --clients 1 --requests 5000 --rounds 7

``--model`` computes the demo profile's model instead (one torch thread, preprocessed
tensors, no HTTP): closed loops of ``--clients`` submitters for ``--duration`` seconds per
variant and round, p50 latency and images/s per variant. One process runs every variant, so
other work on the machine hits them alike (servers in separate processes compete for CPU
shares instead)::

    python loadtest/engine_bench.py --model --clients 1,2,4,8,16,32,64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nacguard.engine import AdaptiveWait, Batcher, FixedWait, Runner

__all__ = ["main", "per_request_us"]

Submit = Callable[[], Awaitable[object]]


def _identity(items: list[int]) -> list[int]:
    return items


async def _measure(submit: Submit, clients: int, requests: int) -> float:
    async def client() -> None:
        for _ in range(requests // clients):
            await submit()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return (time.perf_counter() - t0) / requests * 1e6 * clients


async def per_request_us(variant: str, clients: int, requests: int) -> float:
    """Mean microseconds one submitter waits per request (wall time x clients / requests)."""
    runner: Runner[int, int] = Runner(_identity, name="cpu")
    if variant == "runner":
        try:
            return await _measure(lambda: runner.run([1]), clients, requests)
        finally:
            runner.close()
    policies = {
        "max_batch_size=1": (1, FixedWait(0.0)),
        "adaptive (bound 2 ms)": (64, AdaptiveWait(0.002)),
        "fixed 2 ms": (64, FixedWait(0.002)),
    }
    size, policy = policies[variant]
    batcher: Batcher[int, int] = Batcher(
        [runner], max_batch_size=size, max_queue=4096, policy=policy
    )
    await batcher.start()
    try:
        return await _measure(
            lambda: batcher.submit([1], time.monotonic() + 10.0), clients, requests
        )
    finally:
        await batcher.stop()


def _model_compute() -> Callable[[list[Any]], list[Any]]:
    import torch

    from nacguard.bundle import load_bundle
    from nacguard.settings import DEMO_PROFILE

    torch.set_num_threads(1)
    bundle = load_bundle(DEMO_PROFILE, "cpu")
    threads_set = False

    def compute(items: list[Any]) -> list[Any]:
        nonlocal threads_set
        if not threads_set:  # intra-op threads are per thread: set on the runner's
            torch.set_num_threads(1)
            threads_set = True
        return list(bundle.predict_batch(torch.stack(items), scoring=True))

    compute([torch.zeros(1, 28, 28)] * 64)  # warm up
    return compute


async def model_run(
    compute: Callable[[list[Any]], list[Any]], variant: str, clients: int, duration_s: float
) -> tuple[float, float]:
    """One closed loop on the model: ``(p50 ms, images/s)``."""
    import torch

    size, policy = _VARIANTS[variant]()
    runner: Runner[Any, Any] = Runner(compute, name="cpu")
    batcher: Batcher[Any, Any] = Batcher(
        [runner], max_batch_size=size, max_queue=4096, policy=policy
    )
    await batcher.start()
    image = torch.rand(1, 28, 28)
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await batcher.submit([image], time.monotonic() + 10.0)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await batcher.stop()
    return statistics.median(latencies) * 1e3, len(latencies) / elapsed


_VARIANTS: dict[str, Callable[[], tuple[int, Any]]] = {
    "max_batch_size=1": lambda: (1, FixedWait(0.0)),
    "adaptive": lambda: (64, AdaptiveWait(0.002)),
    "fixed 2 ms": lambda: (64, FixedWait(0.002)),
}


def _model_main(clients_list: Sequence[int], rounds: int, duration_s: float) -> None:
    compute = _model_compute()
    variants = list(_VARIANTS)
    print(
        "| clients | "
        + " | ".join(f"{v} p50 ms | {v} images/s" for v in variants)
        + " | p50 adaptive / mbs=1 | images/s adaptive / mbs=1 |"
    )
    print("|---|" + "---|---|" * len(variants) + "---|---|")
    for clients in clients_list:
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for rnd in range(rounds):
            for v in variants if rnd % 2 == 0 else variants[::-1]:
                got[v].append(asyncio.run(model_run(compute, v, clients, duration_s)))
        med = {
            v: (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r))
            for v, r in got.items()
        }
        base, ada = med["max_batch_size=1"], med["adaptive"]
        cells = " | ".join(f"{p50:.2f} | {ips:.0f}" for p50, ips in med.values())
        print(f"| {clients} | {cells} | {ada[0] / base[0]:.2f}x | {ada[1] / base[1]:.2f}x |")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", action="store_true", help="compute the demo model (see above)")
    p.add_argument("--duration", type=float, default=1.0, help="--model: seconds per run")
    args = p.parse_args(argv)
    if args.model:
        _model_main(args.clients, args.rounds, args.duration)
        return 0
    variants = ["runner", "max_batch_size=1", "adaptive (bound 2 ms)", "fixed 2 ms"]
    print("| submitters | " + " | ".join(f"{v} us/request" for v in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for clients in args.clients:
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rnd in range(args.rounds):
            for v in variants if rnd % 2 == 0 else variants[::-1]:
                if v == "runner" and clients > 1:
                    continue  # a bare runner has no queue: concurrent callers would just block
                times[v].append(asyncio.run(per_request_us(v, clients, args.requests)))
        cells = [f"{statistics.median(t):.1f}" if t else "–" for t in times.values()]
        print(f"| {clients} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
