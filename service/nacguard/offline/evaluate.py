"""Offline evaluation of a bundle: NAC against MSP and energy on InD vs OOD sources."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nacguard.bundle import Bundle
from nacguard.nac.detection import detection_metrics, roc_curve
from nacguard.offline.build import batches
from nacguard.offline.datasets import ImageSource

__all__ = ["METHODS", "EvalResult", "evaluate", "score_source", "write_report"]

METHODS = ("nac", "msp", "energy")


def score_source(
    bundle: Bundle, source: ImageSource, batch_size: int = 256, progress: bool = False
) -> dict[str, np.ndarray]:
    """NAC, MSP and energy scores (higher = InD) of every image of a source."""
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    desc = f"scoring {source.name}" if progress else ""
    for x in batches(source.images, bundle.preprocess, batch_size, desc):
        result = bundle.score(x)
        parts["nac"].append(result.nac.cpu().numpy())
        parts["msp"].append(result.msp.cpu().numpy())
        parts["energy"].append(result.energy.cpu().numpy())
    return {m: np.concatenate(v).astype(np.float64) for m, v in parts.items()}


@dataclass(frozen=True)
class EvalResult:
    """Scores per source and metrics per method and OOD set (plus their mean)."""

    ind_name: str
    scores: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, dict[str, dict[str, float]]]

    def to_json(self) -> dict[str, Any]:
        """``{"methods": {method: {ood_name | "mean": {auroc, fpr95, aupr}}}, "ind": name}``."""
        return {"ind": self.ind_name, "methods": self.metrics}

    def table(self) -> str:
        """Markdown table: one row per OOD set (and the mean), AUROC/FPR95 per method, in %."""
        names = list(next(iter(self.metrics.values())))
        head = "| OOD set | " + " | ".join(
            f"{m.upper()} AUROC | {m.upper()} FPR95" for m in METHODS
        )
        lines = [head + " |", "|---" * (1 + 2 * len(METHODS)) + "|"]
        for name in names:
            cells = []
            for m in METHODS:
                r = self.metrics[m][name]
                cells += [f"{100 * r['auroc']:.2f}", f"{100 * r['fpr95']:.2f}"]
            label = f"**{name}**" if name == "mean" else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate(
    bundle: Bundle,
    ind: ImageSource,
    oods: dict[str, ImageSource],
    batch_size: int = 256,
    progress: bool = False,
) -> EvalResult:
    """AUROC, FPR95 and AUPR of NAC, MSP and energy for each OOD set, and their mean."""
    scores = {"__ind__": score_source(bundle, ind, batch_size, progress)}
    for name, src in oods.items():
        scores[name] = score_source(bundle, src, batch_size, progress)
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for m in METHODS:
        per = {
            name: detection_metrics(scores["__ind__"][m], scores[name][m]).to_dict()
            for name in oods
        }
        per["mean"] = {
            k: float(np.mean([v[k] for v in per.values()])) for k in ("auroc", "fpr95", "aupr")
        }
        metrics[m] = per
    return EvalResult(ind.name, scores, metrics)


def write_report(result: EvalResult, out: Path, threshold: float | None = None) -> list[Path]:
    """Write report.md, metrics.json, and per OOD set a score histogram and ROC curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "metrics.json"]
    (out / "metrics.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md = [f"# OOD evaluation (InD: {result.ind_name})", "", result.table(), ""]
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
        for m in METHODS:
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
