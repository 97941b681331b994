"""The batcher's own cost per request, in-process: no HTTP, a compute function that does nothing.

What a lone request pays for going through the engine, against a bare
:class:`~nacguard.engine.Runner` (one thread hop there and back), with ``max_batch_size=1``,
with the adaptive policy and with the fixed 2 ms window, interleaved round by round, median of
the rounds::

    python loadtest/engine_bench.py                 # 1 and 8 concurrent submitters
    python loadtest/engine_bench.py --clients 1 --requests 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
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
