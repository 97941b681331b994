"""The concurrency sweep of ``bench.py``: batching against ``max_batch_size=1`` at every load.

Closed loops at 1, 2, 4, ... 64 clients on each swept configuration, side by side: within a
round every concurrency runs every configuration back to back, the order reversed from one
concurrency to the next and from one round to the next, so that whatever else the machine does
hits them alike; rounds are pooled. The table puts each concurrency's figures and the
batching / ``max_batch_size=1`` ratios on one row, with the targets of issue 21: at every
concurrency batching's p50 within 1.1x and its throughput at least 0.95x of
``max_batch_size=1``'s, and at 32 clients at least 3x the throughput.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loadtest.drivers import RunResult, merge_runs

__all__ = [
    "BASELINE",
    "SUBJECT",
    "render_sweep",
    "run_sweep",
    "sweep_rows",
    "sweep_targets",
]

SUBJECT = "batching"
BASELINE = "no-batching"
P50_BOUND = 1.1
THROUGHPUT_BOUND = 0.95
HIGH_LOAD_CLIENTS = 32
HIGH_LOAD_BOUND = 3.0


def run_sweep(
    run: Callable[[str, int], RunResult],
    configs: Sequence[str],
    concurrencies: Sequence[int],
    rounds: int,
) -> dict[str, dict[int, RunResult]]:
    """Drive every configuration at every concurrency, interleaved; pool the rounds.

    Args:
        run: measures one closed loop: ``run(config, clients) -> RunResult``.
        configs: the configurations, e.g. ``("batching", "no-batching")``.
        concurrencies: client counts.
        rounds: how many times each (configuration, clients) pair runs.

    Returns:
        ``{config: {clients: pooled result}}``.
    """
    runs: dict[str, dict[int, list[RunResult]]] = {c: {} for c in configs}
    for rnd in range(rounds):
        for i, clients in enumerate(concurrencies):
            order = list(configs) if (rnd + i) % 2 == 0 else list(configs)[::-1]
            for config in order:
                runs[config].setdefault(clients, []).append(run(config, clients))
    return {
        config: {clients: merge_runs(rs) for clients, rs in by_clients.items()}
        for config, by_clients in runs.items()
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def sweep_rows(merged: Mapping[str, Mapping[int, RunResult]]) -> list[dict[str, Any]]:
    """One row per concurrency: each configuration's figures and the batching ratios."""
    subject, baseline = merged.get(SUBJECT, {}), merged.get(BASELINE, {})
    rows = []
    for clients in sorted(set(subject) & set(baseline)):
        s, b = subject[clients], baseline[clients]
        row: dict[str, Any] = {
            "clients": clients,
            "p50_ratio": _ratio(s.p50_ms, b.p50_ms),
            "throughput_ratio": _ratio(s.images_per_s, b.images_per_s),
        }
        for config, by_clients in merged.items():
            r = by_clients.get(clients)
            if r is not None:
                row[config] = {
                    "p50_ms": r.p50_ms,
                    "p99_ms": r.p99_ms,
                    "images_per_s": r.images_per_s,
                    "mean_batch": r.mean_batch,
                    "errors": r.errors,
                    "sent": r.sent,
                }
        row["met"] = bool(
            row["p50_ratio"] <= P50_BOUND and row["throughput_ratio"] >= THROUGHPUT_BOUND
        )
        rows.append(row)
    return rows


def sweep_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's targets as ``bench.Target`` fields (name, value, threshold, ...)."""
    if not rows:
        return []
    worst_p50 = max(rows, key=lambda r: r["p50_ratio"])
    worst_tput = min(rows, key=lambda r: r["throughput_ratio"])
    out = [
        {
            "name": f"batching p50 <= {P50_BOUND}x max_batch_size=1 at every concurrency",
            "value": worst_p50["p50_ratio"],
            "threshold": P50_BOUND,
            "higher_is_better": False,
            "detail": f"worst at {worst_p50['clients']} clients; closed-loop sweep",
        },
        {
            "name": f"batching throughput >= {THROUGHPUT_BOUND}x max_batch_size=1 at every "
            "concurrency",
            "value": worst_tput["throughput_ratio"],
            "threshold": THROUGHPUT_BOUND,
            "higher_is_better": True,
            "detail": f"worst at {worst_tput['clients']} clients; closed-loop sweep",
        },
    ]
    high = next((r for r in rows if r["clients"] == HIGH_LOAD_CLIENTS), None)
    if high is not None:
        out.append(
            {
                "name": f"batching throughput >= {HIGH_LOAD_BOUND:g}x max_batch_size=1 at "
                f"{HIGH_LOAD_CLIENTS} clients",
                "value": high["throughput_ratio"],
                "threshold": HIGH_LOAD_BOUND,
                "higher_is_better": True,
                "detail": "closed-loop sweep, images/s ratio",
            }
        )
    return out


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def render_sweep(rows: Sequence[Mapping[str, Any]], configs: Sequence[str]) -> list[str]:
    """Markdown lines of the sweep table (values may be ``None`` after the JSON round trip)."""
    head = "| clients |"
    rule = "|---|"
    for config in configs:
        head += f" {config} p50 ms | {config} p99 ms | {config} images/s | {config} batch |"
        rule += "---|---|---|---|"
    head += f" p50 {SUBJECT} / {BASELINE} | images/s {SUBJECT} / {BASELINE} | met |"
    rule += "---|---|---|"
    lines = [head, rule]
    for row in rows:
        line = f"| {row['clients']} |"
        for config in configs:
            x = row.get(config) or {}
            line += (
                f" {_f(x.get('p50_ms'))} | {_f(x.get('p99_ms'))} | {_f(x.get('images_per_s'), '{:.0f}')}"
                f" | {_f(x.get('mean_batch'))} |"
            )
        p50, tput = row["p50_ratio"], row["throughput_ratio"]
        line += (
            f" {_f(p50, '{:.2f}')}x | {_f(tput, '{:.2f}')}x | {'yes' if row['met'] else '**no**'} |"
        )
        lines.append(line)
    return lines
