"""What checkpoint ranking reports: per-checkpoint results, the Spearman correlations of the
two predictors (NAC-ME, InD accuracy) with the shifted accuracies, the table, the JSON and the
report folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from nacguard.nac.config import LayerConfig

__all__ = ["PREDICTORS", "CheckpointResult", "ModelEvalResult", "spearman", "write_report"]

#: The two checkpoint-selection signals that are compared: JSON keys of the correlations.
PREDICTORS = ("nac_me", "ind_accuracy")

_SCHEMA = "nacguard.model-eval/1"


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, tie-averaged ranks).

    Returns:
        rho in [-1, 1], or NaN when it is undefined (fewer than two values, or one side has
        all values equal).

    Raises:
        ValueError: the sequences differ in length.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("spearman needs two 1-D sequences of the same length")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    rho = float(stats.spearmanr(x, y).statistic)
    return float(np.clip(rho, -1.0, 1.0)) if math.isfinite(rho) else math.nan


@dataclass(frozen=True)
class CheckpointResult:
    """What one checkpoint scored.

    Attributes:
        name: the checkpoint's label.
        path: its weights file.
        spec: its architecture.
        nac_me: NAC-ME averaged over the monitored layers (0 when nothing was classified right).
        nac_me_layers: NAC-ME of each layer.
        ind_accuracy: accuracy on the InD data.
        ind_correct: number of correctly classified InD samples (the ones NAC-ME counts).
        shifted_accuracy: accuracy on each shifted set, by name.
    """

    name: str
    path: str
    spec: str
    nac_me: float
    nac_me_layers: dict[str, float]
    ind_accuracy: float
    ind_correct: int
    shifted_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def mean_shifted_accuracy(self) -> float | None:
        """Plain mean of the shifted accuracies (None without shifted sets)."""
        if not self.shifted_accuracy:
            return None
        return float(np.mean(list(self.shifted_accuracy.values())))

    def to_json(self, rank: int) -> dict[str, Any]:
        """JSON form, with the checkpoint's 1-based NAC-ME rank."""
        return {
            "name": self.name,
            "path": self.path,
            "model": self.spec,
            "rank": rank,
            "nac_me": self.nac_me,
            "nac_me_layers": self.nac_me_layers,
            "ind_accuracy": self.ind_accuracy,
            "ind_correct": self.ind_correct,
            "shifted_accuracy": self.shifted_accuracy,
            "mean_shifted_accuracy": self.mean_shifted_accuracy,
        }


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class ModelEvalResult:
    """NAC-ME, accuracies, ranking and correlations of a set of checkpoints.

    Attributes:
        layers: the monitored layers and their settings.
        ind_name: the InD source.
        ind_samples: number of InD images.
        shifted_samples: number of images of each shifted set, by name.
        checkpoints: one result per checkpoint, in the order given.
    """

    layers: list[LayerConfig]
    ind_name: str
    ind_samples: int
    shifted_samples: dict[str, int]
    checkpoints: list[CheckpointResult]

    @property
    def ranking(self) -> list[CheckpointResult]:
        """Checkpoints by NAC-ME, best first (ties keep the order given)."""
        return sorted(self.checkpoints, key=lambda c: -c.nac_me)

    @property
    def targets(self) -> list[str]:
        """Names the correlations are computed for: each shifted set, then ``mean`` if >1 set."""
        names = list(self.shifted_samples)
        return [*names, "mean"] if len(names) > 1 else names

    def _target_values(self, target: str) -> list[float]:
        if target == "mean":
            return [c.mean_shifted_accuracy or 0.0 for c in self.checkpoints]
        return [c.shifted_accuracy[target] for c in self.checkpoints]

    def _predictor_values(self, predictor: str) -> list[float]:
        return [float(getattr(c, predictor)) for c in self.checkpoints]

    def correlations(self) -> dict[str, dict[str, float]]:
        """Spearman rho of each predictor with each target: ``{predictor: {target: rho}}``."""
        return {
            p: {
                t: spearman(self._predictor_values(p), self._target_values(t)) for t in self.targets
            }
            for p in PREDICTORS
        }

    def selected(self) -> dict[str, dict[str, Any]]:
        """The checkpoint each predictor would deploy, and the best one in hindsight (``oracle``).

        Each entry holds the checkpoint's name and its mean shifted accuracy; empty without
        shifted sets.
        """
        if not self.shifted_samples:
            return {}
        picks: dict[str, CheckpointResult] = {}
        for p in PREDICTORS:
            values = self._predictor_values(p)
            picks[p] = self.checkpoints[int(np.argmax(values))]  # first of equal maxima
        picks["oracle"] = max(self.checkpoints, key=lambda c: c.mean_shifted_accuracy or 0.0)
        return {
            k: {"name": c.name, "mean_shifted_accuracy": c.mean_shifted_accuracy}
            for k, c in picks.items()
        }

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (schema ``nacguard.model-eval/1``); undefined rho is ``null``."""
        ranks = {id(c): i + 1 for i, c in enumerate(self.ranking)}
        return {
            "schema": _SCHEMA,
            "ind": {"name": self.ind_name, "samples": self.ind_samples},
            "layers": [c.to_dict() for c in self.layers],
            "shifted": {n: {"samples": k} for n, k in self.shifted_samples.items()},
            "checkpoints": [c.to_json(ranks[id(c)]) for c in self.checkpoints],
            "ranking": [c.name for c in self.ranking],
            "spearman": {
                p: {t: _json_float(r) for t, r in per.items()}
                for p, per in self.correlations().items()
            },
            "selected": self.selected(),
        }

    def table(self) -> str:
        """Markdown: checkpoints by NAC-ME rank, then the correlation table (if shifted data)."""
        shifted = list(self.shifted_samples)
        head = ["rank", "checkpoint", "NAC-ME", "InD acc", *shifted]
        if len(shifted) > 1:
            head.append("mean shifted")
        lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for i, c in enumerate(self.ranking, 1):
            cells = [str(i), c.name, f"{c.nac_me:.4f}", f"{100 * c.ind_accuracy:.2f}"]
            cells += [f"{100 * c.shifted_accuracy[n]:.2f}" for n in shifted]
            if len(shifted) > 1:
                cells.append(f"{100 * (c.mean_shifted_accuracy or 0.0):.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        if not shifted:
            return "\n".join(lines)
        corr = self.correlations()
        lines += [
            "",
            "| Spearman rho with shifted accuracy | NAC-ME | InD accuracy |",
            "|---|---|---|",
        ]
        for t in self.targets:
            a, b = corr["nac_me"][t], corr["ind_accuracy"][t]
            label = f"**{t}**" if t == "mean" else t
            lines.append(f"| {label} | {_fmt_rho(a)} | {_fmt_rho(b)} |")
        return "\n".join(lines)


def _fmt_rho(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def write_report(result: ModelEvalResult, out: Path) -> list[Path]:
    """Write ``report.md``, ``results.json`` and, with shifted data, ``scatter.png``.

    The scatter plot shows mean shifted accuracy against NAC-ME and against InD accuracy.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md", out / "results.json"]
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    layers = ", ".join(
        f"{c.name} (O={c.saturation:g}, M={c.n_edges}, beta={c.beta:g})" for c in result.layers
    )
    md = [
        "# NAC-ME model evaluation",
        "",
        f"InD data: {result.ind_name} ({result.ind_samples} images); layers: {layers}.",
        "",
        result.table(),
        "",
    ]
    if result.shifted_samples:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        target = result.targets[-1]
        ys = [100 * v for v in result._target_values(target)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        corr = result.correlations()
        for ax, p, label in zip(axes, PREDICTORS, ("NAC-ME", "InD accuracy"), strict=True):
            xs = result._predictor_values(p)
            ax.scatter(xs, ys)
            for c, xv, yv in zip(result.checkpoints, xs, ys, strict=True):
                ax.annotate(c.name, (xv, yv), fontsize=7)
            ax.set(xlabel=label, title=f"{label}: Spearman {_fmt_rho(corr[p][target])}")
        axes[0].set_ylabel(f"{target} shifted accuracy (%)")
        fig.tight_layout()
        fig.savefig(out / "scatter.png", dpi=90)
        plt.close(fig)
        written.append(out / "scatter.png")
        md.append("![NAC-ME and InD accuracy against shifted accuracy](scatter.png)")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return written
