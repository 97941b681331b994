"""What ``explain`` costs, in-process (no HTTP), on the demo profile, measured side by side.

Variants, each the whole per-batch work of a prediction up to its JSON text:

* ``no-layers``        ``predict_batch(per_layer=False)`` + ``to_dict()`` + ``json.dumps``: the
                       path without the per-layer columns (what a prediction cost before them);
* ``explain-off``      ``predict_batch()`` + ``to_dict()``: what the server does for a request
                       without ``explain`` (per-layer scores carried, not serialised);
* ``explain-on``       the same with ``to_dict(explain=True)``: ``layers``,
                       ``least_covered_layer``, ``p_values`` in the answer;
* ``explain-neurons``  ``explain_batch(top=5)`` + ``to_dict(explain=True)``: also the five least
                       covered neurons per image (one more state pass; offline / CLI only).

Variants run round-robin over the same preprocessed Fashion-MNIST test images, so machine noise
hits all of them alike. The table gives images/s from each variant's fastest round (on a shared
machine the other rounds measure the neighbours as much as the code) and the ratio against
``explain-off``; the median rounds' ratios are in the JSON.

    python loadtest/explain_bench.py --out loadtest/results      # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nacguard.bundle import load_bundle
from nacguard.offline.datasets import load_source
from nacguard.settings import DEMO_PROFILE


def run(batches: list[int], rounds: int, repeat: int, threads: int) -> dict[str, object]:
    """Measure every variant at every batch size; returns the JSON-able result."""
    torch.set_num_threads(threads)
    bundle = load_bundle(DEMO_PROFILE)
    source = load_source("fashion-mnist:test", limit=max(batches), seed=0)
    images = bundle.preprocess.batch(list(source.images))

    def variants(x: torch.Tensor) -> dict[str, Callable[[], str]]:
        return {
            "no-layers": lambda: json.dumps(
                [p.to_dict(3) for p in bundle.predict_batch(x, per_layer=False)]
            ),
            "explain-off": lambda: json.dumps([p.to_dict(3) for p in bundle.predict_batch(x)]),
            "explain-on": lambda: json.dumps(
                [p.to_dict(3, explain=True) for p in bundle.predict_batch(x)]
            ),
            "explain-neurons": lambda: json.dumps(
                [p.to_dict(3, explain=True) for p in bundle.explain_batch(x, top=5)]
            ),
        }

    rows = []
    for b in batches:
        x = images[:b].contiguous()
        fns = variants(x)
        sizes = {name: len(fn()) / b for name, fn in fns.items()}  # also the warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(repeat):
                    fn()
                times[name].append(time.perf_counter() - t0)
        base = min(times["explain-off"])
        base_med = statistics.median(times["explain-off"])
        for name, ts in times.items():
            best = min(ts)
            rows.append(
                {
                    "batch": b,
                    "variant": name,
                    "images_per_s": b * repeat / best,
                    "us_per_image": 1e6 * best / (b * repeat),
                    "json_bytes_per_image": sizes[name],
                    "time_vs_explain_off": best / base,
                    "median_time_vs_explain_off": statistics.median(ts) / base_med,
                }
            )
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch thread(s), Python {platform.python_version()}, torch {torch.__version__}",
        "rounds": rounds,
        "repeat": repeat,
        "rows": rows,
    }


def markdown(result: dict[str, object]) -> str:
    """The table of one run."""
    lines = [
        f"In-process, demo profile, {result['machine']}; fastest of {result['rounds']} "
        f"interleaved rounds of {result['repeat']} calls per variant.",
        "",
        "| batch | variant | images/s | µs/image | JSON bytes/image | time vs explain-off "
        "| (median rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['images_per_s']:.0f} | "
            f"{r['us_per_image']:.1f} | {r['json_bytes_per_image']:.0f} | "
            f"**{r['time_vs_explain_off']:.2f}x** | {r['median_time_vs_explain_off']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write explain_bench.json and explain_bench.md here")
    args = ap.parse_args()
    result = run(args.batches, args.rounds, args.repeat, args.threads)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "explain_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "explain_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
