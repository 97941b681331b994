"""What a shadow profile costs per batch, in-process (no HTTP): the primary alone, the primary
with a shadow on the same weights (one forward, two table lookups:
:func:`nacguard.bundle.shadow.predict_pair`), and with a shadow on other weights (a second
forward), interleaved round-robin on the same inputs.

    python loadtest/shadow_bench.py --out loadtest/results/shadow --rounds 5 --threads 1

The demo profile (or ``--profile``) and a copy of it with another threshold as the shadow;
CPU unless ``--device``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nacguard.bundle import load_bundle
from nacguard.bundle.format import BUNDLE_FILE
from nacguard.bundle.shadow import predict_pair, shares_states
from nacguard.settings import demo_profile


def _shadow_copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    meta = json.loads((out / BUNDLE_FILE).read_text())
    meta["calibration"]["threshold"] = float(meta["calibration"]["threshold"]) + 0.01
    (out / BUNDLE_FILE).write_text(json.dumps(meta))
    return out


def _images_per_s(fn: Callable[[], object], batch: int, min_s: float) -> float:
    fn()  # warm
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s:
        fn()
        n += 1
    return n * batch / elapsed


def run(profile: Path, device: str, batches: list[int], rounds: int, min_s: float) -> dict:
    """Images/s of each variant per batch size (median over rounds) and their ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        shadow_dir = _shadow_copy(profile, Path(tmp) / "shadow")
        primary = load_bundle(profile, device)
        shared = load_bundle(shadow_dir, device, model=primary.model)
        separate = load_bundle(shadow_dir, device)  # its own module: a forward of its own
        assert shares_states(primary, shared) and not shares_states(primary, separate)
        spec = primary.preprocess
        rows: list[dict[str, Any]] = []
        for batch in batches:
            x = torch.rand(batch, spec.channels, *spec.size)
            variants: dict[str, Callable[[], object]] = {
                "primary": lambda x=x: primary.predict_batch(x),
                "shadow_shared": lambda x=x: predict_pair(primary, shared, x),
                "shadow_separate": lambda x=x: (
                    primary.predict_batch(x),
                    separate.predict_batch(x),
                ),
            }
            seen: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    seen[name].append(_images_per_s(fn, batch, min_s))
            med = {k: sorted(v)[len(v) // 2] for k, v in seen.items()}
            rows.append(
                {
                    "batch": batch,
                    **{f"{k}_ips": v for k, v in med.items()},
                    "shared_over_primary": med["shadow_shared"] / med["primary"],
                    "separate_over_primary": med["shadow_separate"] / med["primary"],
                }
            )
    return {
        "settings": {"device": device, "rounds": rounds, "min_s": min_s,
                     "threads": torch.get_num_threads(), "profile": str(profile)},
        "rows": rows,
    }  # fmt: skip


def render(report: dict) -> str:
    """The rows as a markdown table."""
    lines = [
        "| batch | primary img/s | + shadow, same weights | ratio | + shadow, other weights "
        "| ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['batch']} | {r['primary_ips']:.0f} | {r['shadow_shared_ips']:.0f} | "
            f"{r['shared_over_primary']:.2f}x | {r['shadow_separate_ips']:.0f} | "
            f"{r['separate_over_primary']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run and write ``shadow_bench.json`` and ``shadow_bench.md`` to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("shadow-out"))
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-s", type=float, default=0.3, help="least seconds per measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(
        args.profile or demo_profile(),
        args.device,
        [int(b) for b in args.batches.split(",")],
        args.rounds,
        args.min_s,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (args.out / "shadow_bench.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
