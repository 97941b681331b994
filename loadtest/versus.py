"""This tree against an older commit (or against other settings): the same client, side by side.

Absolute numbers move by 2x between machines and by more on a shared one, so "the hot path got
cheaper" is a ratio measured in one run: the older commit is checked out into a temporary
folder (``git worktree``, removed afterwards), one server is started from each tree with the
same settings, each in a session of its own, and the same closed loop of
:func:`loadtest.drivers.closed_loop` drives them in interleaved rounds (the order reversed
every other round)::

    python loadtest/versus.py --against b070289 --out versus-out
    python loadtest/versus.py --against HEAD~5 --set max_batch_size=1 --rounds 6
    python loadtest/versus.py --older-set batch_wait=fixed
    python loadtest/versus.py --against b070289 --older-profile   # the code alone, one bundle

Without ``--against`` both servers run this tree, and ``--older-set`` gives the second one
its own settings (on top of ``--set``): a side-by-side run of one setting.

Reported per tree: images/s, p50/p99 and server CPU milliseconds per request (the server's
whole process tree), and the ratios this / older. Settings: the benchmark defaults
(``batching_bench.BENCH_DEFAULTS``: one worker process, which commits from before workers
ignore, result cache off, warning-level logs, one torch thread on 2 cores) plus ``--set``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.batching_bench import BENCH_DEFAULTS, RunningServer, setting, start_server
from loadtest.bench import _clean
from loadtest.drivers import interleaved_rounds, merge_runs
from loadtest.protocols import v2_rest_payloads
from loadtest.workload import build_payloads

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of ``rev`` in a temporary folder, removed on exit."""
    folder = Path(tempfile.mkdtemp(prefix="nacguard-versus-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), rev],
        check=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False
        )


def _commit(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def run_versus(
    against: str | None,
    *,
    overrides: Mapping[str, object],
    older_overrides: Mapping[str, object],
    profile: Path | None = None,
    older_profile: bool = False,
    rounds: int,
    duration_s: float,
    concurrency: int,
    log_dir: Path,
    v2_model: str | None = None,
) -> dict[str, Any]:
    """Run both servers in interleaved rounds; the report (JSON-able).

    With ``v2_model``, the requests are the same single raw images as Open Inference Protocol
    REST calls to that model (binary tensor data, as ``tritonclient.http`` sends them).
    """
    settings = dict(BENCH_DEFAULTS)  # older commits without `workers` ignore it (one process)
    settings.update({k: str(v) for k, v in overrides.items()})
    older_settings = {**settings, **{k: str(v) for k, v in older_overrides.items()}}
    if v2_model is None:
        payloads = build_payloads(1024, seed=0)
    else:
        payloads = v2_rest_payloads(build_payloads(1024, encodings=("raw",), seed=0), v2_model)
    checkout = _checkout(against) if against else contextlib.nullcontext(ROOT)
    with checkout as older:
        if older_profile:  # the code is compared, not the bundled profiles
            profile = older / "profiles" / "fashion-mnist"
        servers: dict[str, RunningServer] = {}
        try:
            for name, source in (("this", ROOT), ("older", older)):
                servers[name] = start_server(
                    profile,
                    overrides=settings if name == "this" else older_settings,
                    log_path=log_dir / f"versus-{name}.log",
                    own_session=True,
                    source=source,
                )
            runs = interleaved_rounds(
                {name: (s.url, s.process.pid) for name, s in servers.items()},
                payloads,
                rounds=rounds,
                concurrency=concurrency,
                duration_s=duration_s,
            )
        finally:
            for server in servers.values():
                server.stop()
        commits = {"this": _commit(ROOT), "older": _commit(older)}
    merged = {name: merge_runs(rs) for name, rs in runs.items()}
    this, old = merged["this"], merged["older"]
    return {
        "commits": commits,
        "settings": settings,
        "older_settings": older_settings,
        "profile": (
            "the older tree's demo profile for both"
            if older_profile
            else str(profile)
            if profile
            else "each tree's demo profile"
        ),
        "plan": {
            "rounds": rounds,
            "duration_s": duration_s,
            "concurrency": concurrency,
            "requests": "/predict" if v2_model is None else f"/v2/models/{v2_model}/infer",
        },
        "load_average_at_end": list(os.getloadavg()),
        "results": {name: r.to_dict() for name, r in merged.items()},
        "ratios": {
            "images_per_s": this.images_per_s / old.images_per_s,
            "server_cpu_ms_per_request": this.server_cpu_ms_per_request
            / old.server_cpu_ms_per_request,
            "p50_ms": this.p50_ms / old.p50_ms,
        },
    }


def write_report(out: Path, stem: str, report: Mapping[str, Any], markdown: str) -> None:
    """``OUT/STEM.json`` (strict JSON: NaN as null) and ``OUT/STEM.md``; the markdown printed."""
    (out / f"{stem}.json").write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def render(report: Mapping[str, Any]) -> str:
    """The markdown table of a report."""
    c, s, o = report["commits"], report["settings"], report["older_settings"]
    others = "" if o == s else f"; the older one with {o}"
    lines = [
        f"This tree ({c['this']}) against {c['older']}: closed loop, "
        f"{report['plan']['concurrency']} clients of {report['plan']['requests']}, "
        f"{report['plan']['rounds']} interleaved rounds "
        f"of {report['plan']['duration_s']:g} s; profile {report['profile']}; "
        f"settings {s}{others}.",
        "",
        "| tree | commit | images/s | p50 ms | p99 ms | server CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {c[name]} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['server_cpu_ms_per_request']:.3f} | {r['errors']} |"
        )
    q = report["ratios"]
    lines += [
        "",
        f"this / older: images/s **{q['images_per_s']:.2f}x**, server CPU per request "
        f"**{q['server_cpu_ms_per_request']:.2f}x**, p50 {q['p50_ms']:.2f}x "
        f"(load average at the end: {', '.join(f'{x:.1f}' for x in report['load_average_at_end'])}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", help="the older commit (any git revision; default: this tree)")
    p.add_argument("--out", type=Path, default=Path("versus-out"), help="output folder")
    p.add_argument(
        "--profile", type=Path,
        help="one bundle for both servers (default: each tree's own demo profile)",
    )  # fmt: skip
    p.add_argument(
        "--older-profile", action="store_true",
        help="both servers serve the older tree's demo profile (compares the code alone)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (4)")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per run (4)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (32)")
    p.add_argument(
        "--v2-model", metavar="MODEL",
        help="send the images as v2 REST inference calls to MODEL (default: POST /predict)",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], type=setting, metavar="NAME=VALUE",
        help="a server setting",
    )  # fmt: skip
    p.add_argument(
        "--older-set", action="append", default=[], type=setting, metavar="NAME=VALUE",
        help="a setting of the older (second) server only",
    )  # fmt: skip
    args = p.parse_args(argv)
    overrides = dict(args.set)
    older_overrides = dict(args.older_set)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_versus(
        args.against,
        overrides=overrides,
        older_overrides=older_overrides,
        profile=args.profile,
        older_profile=args.older_profile,
        rounds=args.rounds,
        duration_s=args.duration,
        concurrency=args.concurrency,
        log_dir=args.out,
        v2_model=args.v2_model,
    )
    write_report(args.out, "versus", report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
