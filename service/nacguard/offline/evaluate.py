"""Offline evaluation of a bundle: NAC against MSP, energy and their fusion on InD vs OOD sources.

Beside AUROC/FPR95/AUPR per detector: the calibrated fusion of the three p-values (Fisher's, what
the server's ``fused`` detector uses) and the minimum p-value, the false-alarm rate of the
bundle's p-values on the InD source at several alphas (a reliability table and plot), the
per-class thresholds against the global one where the bundle has them, and the build's sanity
report. AUROC and FPR95 depend only on the order of a statistic, so the fused statistics are
compared as they are; the calibration decides only where a flag falls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nacguard.bundle import Bundle
from nacguard.nac.conformal import (
    FalseAlarm,
    false_alarms,
    fisher_statistic,
    min_p_statistic,
    p_values,
)
from nacguard.nac.detection import detection_metrics, roc_curve
from nacguard.offline.build import batches
from nacguard.offline.datasets import ImageSource

__all__ = ["METHODS", "EvalResult", "evaluate", "score_source", "write_report"]

#: Single detectors, then the fusions (present when the bundle stores baseline calibration).
METHODS = ("nac", "msp", "energy")
FUSED = ("fused", "min_p")
#: Nominal false-alarm rates of the reliability table.
RELIABILITY_ALPHAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def score_source(
    bundle: Bundle, source: ImageSource, batch_size: int = 256, progress: bool = False
) -> dict[str, np.ndarray]:
    """NAC, MSP and energy scores (higher = InD) of every image of a source."""
    parts: dict[str, list[np.ndarray]] = {m: [] for m in (*METHODS, "class")}
    desc = f"scoring {source.name}" if progress else ""
    for x in batches(source.images, bundle.preprocess, batch_size, desc):
        result = bundle.score(x)
        parts["nac"].append(result.nac.cpu().numpy())
        parts["msp"].append(result.msp.cpu().numpy())
        parts["energy"].append(result.energy.cpu().numpy())
        parts["class"].append(result.logits.argmax(dim=1).cpu().numpy())
    out = {m: np.concatenate(v).astype(np.float64) for m, v in parts.items()}
    out.update(_fused(bundle, out))
    return out


def _fused(bundle: Bundle, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NAC p-values, and with baseline calibration the fused and min-p statistics."""
    cal = bundle.calibration
    if cal is None:
        return {}
    out = {"p_nac": p_values(cal.scores, scores["nac"])}
    if cal.msp is None or cal.energy is None or cal.fused is None:
        return out
    p = np.stack(
        [out["p_nac"], p_values(cal.msp, scores["msp"]), p_values(cal.energy, scores["energy"])],
        axis=-1,
    )
    out["fused"] = p_values(cal.fused, fisher_statistic(p))
    out["min_p"] = min_p_statistic(p)
    return out


@dataclass(frozen=True)
class EvalResult:
    """Scores per source and metrics per method and OOD set (plus their mean)."""

    ind_name: str
    scores: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, dict[str, dict[str, float]]]
    false_alarms: tuple[FalseAlarm, ...] = ()
    per_class: dict[str, dict[str, float]] | None = None
    sanity: dict[str, Any] | None = None
    calibration_source: str = ""

    def to_json(self) -> dict[str, Any]:
        """``{"methods": {method: {ood_name | "mean": {auroc, fpr95, aupr}}}, "ind": name,
        "false_alarms": [...], "per_class": {...} | None, "sanity": {...} | None}``."""
        return {
            "ind": self.ind_name,
            "methods": self.metrics,
            "false_alarms": [f.to_dict() for f in self.false_alarms],
            "per_class": self.per_class,
            "sanity": self.sanity,
        }

    def table(self) -> str:
        """Markdown table: one row per OOD set (and the mean), AUROC/FPR95 per method, in %."""
        methods = list(self.metrics)
        names = list(next(iter(self.metrics.values())))
        head = "| OOD set | " + " | ".join(
            f"{m.upper()} AUROC | {m.upper()} FPR95" for m in methods
        )
        lines = [head + " |", "|---" * (1 + 2 * len(methods)) + "|"]
        for name in names:
            cells = []
            for m in methods:
                r = self.metrics[m][name]
                cells += [f"{100 * r['auroc']:.2f}", f"{100 * r['fpr95']:.2f}"]
            label = f"**{name}**" if name == "mean" else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def calibration_table(self) -> str:
        """Markdown: observed false-alarm rate of the NAC p-values per alpha on the InD source,
        its 95% interval, and the range exchangeable data would give."""
        if not self.false_alarms:
            return ""
        same = self.calibration_source.startswith(f"{self.ind_name} ")
        lines = [
            f"False alarms on {self.ind_name} (NAC p-value < alpha)"
            + (": these ARE the calibration images, so this is no check" if same else ":"),
            "",
            "| alpha | flagged | observed | 95% CI | expected if exchangeable | consistent |",
            "|---|---|---|---|---|---|",
        ]
        for f in self.false_alarms:
            lines.append(
                f"| {f.alpha:g} | {f.flagged}/{f.total} | {f.rate:.4f} | {f.low:.4f}-{f.high:.4f}"
                f" | {f.expected_low / f.total:.4f}-{f.expected_high / f.total:.4f}"
                f" | {'yes' if f.consistent else '**no**'} |"
            )
        return "\n".join(lines)

    def per_class_table(self) -> str:
        """Markdown: TPR on InD and FPR per OOD set, global threshold vs per-class thresholds."""
        if not self.per_class:
            return ""
        lines = ["| decision | " + " | ".join(self.per_class["global"]) + " |"]
        lines.append("|---" * (1 + len(self.per_class["global"])) + "|")
        for rule, row in self.per_class.items():
            lines.append(f"| {rule} | " + " | ".join(f"{100 * v:.2f}" for v in row.values()) + " |")
        return "TPR (InD kept) and FPR per OOD set, in %:\n\n" + "\n".join(lines)


def evaluate(
    bundle: Bundle,
    ind: ImageSource,
    oods: dict[str, ImageSource],
    batch_size: int = 256,
    progress: bool = False,
) -> EvalResult:
    """AUROC, FPR95 and AUPR of NAC, MSP, energy and their fusions for each OOD set, and their
    mean; the false-alarm table on ``ind``; per-class against global thresholds."""
    scores = {"__ind__": score_source(bundle, ind, batch_size, progress)}
    for name, src in oods.items():
        scores[name] = score_source(bundle, src, batch_size, progress)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for m in (*METHODS, *(f for f in FUSED if f in scores["__ind__"])):
        per = {
            name: detection_metrics(scores["__ind__"][m], scores[name][m]).to_dict()
            for name in oods
        }
        per["mean"] = {
            k: float(np.mean([v[k] for v in per.values()])) for k in ("auroc", "fpr95", "aupr")
        }
        metrics[m] = per
    cal = bundle.calibration
    alarms: tuple[FalseAlarm, ...] = ()
    if cal is not None:
        alarms = tuple(
            false_alarms(
                scores["__ind__"]["p_nac"], RELIABILITY_ALPHAS, n_calibration=cal.scores.size
            )
        )
    return EvalResult(
        ind.name,
        scores,
        metrics,
        alarms,
        _per_class(bundle, scores),
        bundle.meta.get("sanity"),
        cal.source if cal is not None else "",
    )


def _per_class(
    bundle: Bundle, scores: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, float]] | None:
    """Kept share of InD (TPR) and passed share of each OOD set (FPR): global vs per-class."""
    cal = bundle.calibration
    if cal is None or not cal.class_thresholds:
        return None
    per = np.array([cal.threshold if t != t else t for t in cal.class_thresholds])
    out: dict[str, dict[str, float]] = {"global": {}, "per-class": {}}
    for name, s in scores.items():
        label = "TPR InD" if name == "__ind__" else f"FPR {name}"
        out["global"][label] = float(np.mean(s["nac"] >= cal.threshold))
        out["per-class"][label] = float(np.mean(s["nac"] >= per[s["class"].astype(int)]))
    return out


def write_report(result: EvalResult, out: Path, threshold: float | None = None) -> list[Path]:
    """Write report.md, metrics.json, and per OOD set a score histogram and ROC curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "metrics.json"]
    (out / "metrics.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md = [f"# OOD evaluation (InD: {result.ind_name})", "", result.table(), ""]
    for extra in (result.calibration_table(), result.per_class_table()):
        if extra:
            md += [extra, ""]
    if result.sanity:
        md += [
            f"Profile sanity (at build): counted vs held-out InD AUROC "
            f"{result.sanity['memorisation_auroc']:.3f} "
            f"({'ok' if result.sanity.get('ok') else 'WARNING'}).",
            "",
        ]
    if result.false_alarms:
        written.append(_reliability_plot(result, out, plt))
        md += ["![reliability](reliability.png)", ""]
    ind = result.scores["__ind__"]
    for name in (n for n in result.scores if n != "__ind__"):
        ood = result.scores[name]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        bins = np.linspace(
            min(ind["nac"].min(), ood["nac"].min()), max(ind["nac"].max(), ood["nac"].max()), 60
        )
        ax1.hist(ind["nac"], bins=bins, alpha=0.6, density=True, label="InD")
        ax1.hist(ood["nac"], bins=bins, alpha=0.6, density=True, label=name)
        if threshold is not None:
            ax1.axvline(threshold, color="k", linestyle="--", label="threshold")
        ax1.set(title="NAC score", xlabel="score (higher = InD)", ylabel="density")
        ax1.legend()
        for m in result.metrics:
            fpr, tpr = roc_curve(ind[m], ood[m])
            ax2.plot(fpr, tpr, label=f"{m} ({100 * result.metrics[m][name]['auroc']:.1f})")
        ax2.plot([0, 1], [0, 1], color="gray", linewidth=0.5)
        ax2.set(title=f"ROC: InD vs {name}", xlabel="FPR", ylabel="TPR")
        ax2.legend()
        fig.tight_layout()
        png = out / f"{name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        written.append(png)
        md.append(f"![{name}]({png.name})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return written


def _reliability_plot(result: EvalResult, out: Path, plt: Any) -> Path:
    """Observed false-alarm rate against alpha, with intervals and the exchangeable range."""
    rows = result.false_alarms
    a = np.array([f.alpha for f in rows])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.fill_between(
        a,
        [f.expected_low / f.total for f in rows],
        [f.expected_high / f.total for f in rows],
        color="gray",
        alpha=0.25,
        label="95% range if exchangeable",
    )
    rate = np.array([f.rate for f in rows])
    err = np.array([[f.rate - f.low for f in rows], [f.high - f.rate for f in rows]])
    ax.errorbar(a, rate, yerr=err, marker="o", capsize=3, label=f"observed ({result.ind_name})")
    ax.plot([0, a.max()], [0, a.max()], color="k", linewidth=0.7, label="nominal")
    ax.set(xlabel="alpha", ylabel="share of InD flagged", title="NAC p-value reliability")
    ax.legend()
    fig.tight_layout()
    png = out / "reliability.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
