"""Rank checkpoints by NAC-ME: InD coverage as a robustness estimate (the paper's second use).

For every checkpoint of a classifier this computes, in one pass over each data set:

* **NAC-ME** on labelled InD data: a profile with uniform edges ``linspace(0, 1, M)`` counted on
  the correctly classified samples only, then ``mean_n sum_k min(counts[k, n] / O, 1) / M``
  (``nacguard.nac.me.nac_me``), averaged over the monitored layers;
* the InD accuracy on the same data;
* optionally the accuracy on labelled *shifted* sets (rotated, noisy, blurred ... test images),
  and the Spearman rank correlation of NAC-ME, and of InD accuracy, with those accuracies.

The shifted sets are only ever used to *judge* the two predictors, never to compute them: the
point of NAC-ME is to pick a robust checkpoint without any shifted data.

Data are streamed batch by batch and every batch is preprocessed once and run through all
checkpoints (all models are held in memory at the same time), so a folder of images is decoded
once however many checkpoints are compared.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nacguard.datasets import ImageSource
from nacguard.models.build import batches
from nacguard.models.loading import build_model, load_state_dict, parse_model_spec
from nacguard.models.preprocess import PreprocessSpec
from nacguard.nac.config import LayerConfig
from nacguard.nac.me import nac_me
from nacguard.nac.profile import NacProfile, ProfileBuilder
from nacguard.nac.states import resolve_modules

__all__ = [
    "DEFAULT_LAYER",
    "PREDICTORS",
    "Checkpoint",
    "CheckpointResult",
    "ModelEvalResult",
    "default_layers",
    "evaluate_checkpoints",
    "load_checkpoint",
    "parse_checkpoint",
    "spearman",
    "write_report",
]

log = logging.getLogger(__name__)

#: The paper's NAC-ME settings (ResNet avgpool): O = 500, M = 50, beta = 0.1. ``LayerConfig.parse``
#: uses them for a bare layer name.
DEFAULT_LAYER = LayerConfig("avgpool", beta=0.1, saturation=500.0, n_edges=50)

#: The two checkpoint-selection signals that are compared: JSON keys of the correlations.
PREDICTORS = ("nac_me", "ind_accuracy")

_SCHEMA = "nacguard.model-eval/1"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A weights file and the architecture it belongs to.

    Attributes:
        name: label used in tables and the ranking (unique within one evaluation).
        path: ``.safetensors`` state dict, or a ``.pt``/``.pth`` one (loaded weights-only).
        spec: the ``--model`` text of the architecture (``demo:width=16``).
        model_ref: the parsed model reference (see ``nacguard.models.loading``).
    """

    name: str
    path: Path
    spec: str
    model_ref: dict[str, Any]


def parse_checkpoint(
    text: str, default_spec: str | None, num_classes: int | None = None
) -> Checkpoint:
    """Parse the CLI's ``PATH`` or ``PATH@SPEC`` checkpoint syntax.

    ``@SPEC`` names the architecture of that one file (checkpoints of different widths can be
    ranked together); without it the ``--model`` default applies. A path that exists as given is
    never split, so a file name containing ``@`` still works.

    Args:
        text: the checkpoint argument.
        default_spec: the ``--model`` value, or None.
        num_classes: optional class count forced onto the architecture.

    Raises:
        ValueError: no architecture for the file, or a malformed spec.
        FileNotFoundError: the weights file does not exist.
    """
    path, spec = Path(text), default_spec
    if not path.is_file() and "@" in text:
        head, _, spec = text.rpartition("@")
        path = Path(head)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not spec:
        raise ValueError(f"checkpoint {path}: give --model SPEC or write it as {path}@SPEC")
    ref = parse_model_spec(spec, num_classes)
    return Checkpoint(name=path.stem, path=path, spec=spec, model_ref=ref)


def load_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Build the architecture, load the state dict strictly, and return the model in eval mode.

    Raises:
        ValueError: the state dict does not fit the architecture (with a hint).
    """
    model = build_model(checkpoint.model_ref)
    state = load_state_dict(checkpoint.path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint {checkpoint.path} does not fit {checkpoint.spec!r} ({first}); "
            "give its architecture as PATH@SPEC"
        ) from None
    return model.eval()


def default_layers(model: nn.Module) -> list[LayerConfig]:
    """The paper's NAC-ME layer: ``avgpool`` with O = 500, M = 50, beta = 0.1.

    Raises:
        ValueError: the model has no ``avgpool`` module (name the layers with ``--layers``).
    """
    names = {name for name, _ in model.named_modules()}
    if DEFAULT_LAYER.name not in names:
        valid = ", ".join(n for n, _ in model.named_modules() if n)
        raise ValueError(
            f"the model has no {DEFAULT_LAYER.name!r} layer: give --layers NAME[:O:M:BETA]; "
            f"valid layer names: {valid}"
        )
    return [DEFAULT_LAYER]


# --------------------------------------------------------------------------------------------
# Rank correlation
# --------------------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they occupy."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of tie-averaged ranks).

    Returns:
        rho in [-1, 1], or NaN when it is undefined (fewer than two values, or one side has
        all values equal).

    Raises:
        ValueError: the sequences differ in length.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("spearman needs two 1-D sequences of the same length")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0.0:
        return math.nan
    return float(np.clip((rx * ry).sum() / denom, -1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _require_labels(source: ImageSource, role: str) -> np.ndarray:
    if source.labels is None or len(source.labels) != len(source) or (source.labels < 0).any():
        raise ValueError(
            f"{role} data {source.name!r} needs a label for every image "
            "(a folder with class sub-folders, or fashion-mnist:...)"
        )
    if len(source) == 0:
        raise ValueError(f"{role} data {source.name!r} is empty")
    return source.labels


def _labelled_batches(
    source: ImageSource, preprocess: PreprocessSpec, batch_size: int, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    labels = torch.from_numpy(np.asarray(source.labels, dtype=np.int64))
    for i, x in enumerate(batches(source.images, preprocess, batch_size, desc)):
        yield x, labels[i * batch_size : i * batch_size + x.shape[0]]


def _unique_names(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """File stems, or the full paths where two stems collide."""
    stems = [c.name for c in checkpoints]
    names = [c.name if stems.count(c.name) == 1 else str(c.path) for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError("the same checkpoint file was given twice")
    return names


def _me_per_layer(profile: NacProfile) -> dict[str, float]:
    return {lp.name: nac_me(NacProfile((lp,), profile.samples)) for lp in profile.layers}


def evaluate_checkpoints(
    checkpoints: Sequence[Checkpoint],
    ind: ImageSource,
    preprocess: PreprocessSpec,
    shifted: Mapping[str, ImageSource] | None = None,
    *,
    layers: Sequence[LayerConfig] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ModelEvalResult:
    """NAC-ME and InD accuracy of each checkpoint, and its accuracy on each shifted set.

    Args:
        checkpoints: the checkpoints to compare (at least one).
        ind: labelled InD data that none of the checkpoints was trained on (a held-out part of
            the training distribution).
        preprocess: how images become model inputs (the same for every checkpoint).
        shifted: labelled shifted sets by name; used only for the accuracies and correlations.
        layers: monitored layers; default :func:`default_layers` (``avgpool``, 500/50/0.1).
        batch_size: images per batch.
        device: where the models run.
        progress: show progress bars.

    Returns:
        The per-checkpoint results; ranking and correlations are properties of the result.

    Raises:
        ValueError: no checkpoints, unlabelled data, a layer a model lacks, or labels outside
            a model's outputs.
    """
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    shifted = dict(shifted or {})
    labels = [_require_labels(ind, "InD")]
    labels += [_require_labels(src, f"shifted set {name!r}") for name, src in shifted.items()]
    top_label = max(int(lab.max()) for lab in labels)
    names = _unique_names(checkpoints)
    device = torch.device(device)
    models = [load_checkpoint(c).to(device) for c in checkpoints]
    configs = list(layers) if layers else default_layers(models[0])
    for c, model in zip(checkpoints, models, strict=True):
        try:
            resolve_modules(model, [cfg.name for cfg in configs])
        except ValueError as exc:
            raise ValueError(f"checkpoint {c.path}: {exc}") from None

    builders = [ProfileBuilder(m, configs, uniform=True, correct_only=True) for m in models]
    correct = np.zeros(len(models), dtype=np.int64)
    checked = False
    for x, y in _labelled_batches(ind, preprocess, batch_size, "InD" if progress else ""):
        x = x.to(device)
        for k, builder in enumerate(builders):
            logits = builder.update(x, y)
            if not checked and logits.shape[1] <= top_label:
                raise ValueError(
                    f"checkpoint {checkpoints[k].path} has {logits.shape[1]} outputs but the "
                    f"data have labels up to {top_label}"
                )
            correct[k] += int((logits.argmax(dim=1).cpu() == y).sum())
        checked = True

    shifted_acc: list[dict[str, float]] = [{} for _ in models]
    with torch.inference_mode():
        for name, src in shifted.items():
            hits = np.zeros(len(models), dtype=np.int64)
            for x, y in _labelled_batches(src, preprocess, batch_size, name if progress else ""):
                x = x.to(device)
                for k, model in enumerate(models):
                    hits[k] += int((model(x).argmax(dim=1).cpu() == y).sum())
            for k in range(len(models)):
                shifted_acc[k][name] = float(hits[k] / len(src))

    results = []
    for k, c in enumerate(checkpoints):
        if builders[k].samples:
            profile = builders[k].profile()
            me, per_layer = nac_me(profile), _me_per_layer(profile)
        else:  # nothing classified right: no counts, no coverage
            me, per_layer = 0.0, {cfg.name: 0.0 for cfg in configs}
        results.append(
            CheckpointResult(
                name=names[k],
                path=str(c.path),
                spec=c.spec,
                nac_me=me,
                nac_me_layers=per_layer,
                ind_accuracy=float(correct[k] / len(ind)),
                ind_correct=int(correct[k]),
                shifted_accuracy=shifted_acc[k],
            )
        )
        log.info("%s: NAC-ME %.4f, InD accuracy %.4f", names[k], me, results[-1].ind_accuracy)
    return ModelEvalResult(
        layers=configs,
        ind_name=ind.name,
        ind_samples=len(ind),
        shifted_samples={n: len(s) for n, s in shifted.items()},
        checkpoints=results,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


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
