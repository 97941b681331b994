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

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac.config import LayerConfig
from nacguard.nac.me import nac_me
from nacguard.nac.profile import NacProfile, ProfileBuilder
from nacguard.nac.states import resolve_modules
from nacguard.offline.build import batches
from nacguard.offline.checkpoints import (
    DEFAULT_LAYER,
    Checkpoint,
    default_layers,
    load_checkpoint,
    parse_checkpoint,
)
from nacguard.offline.datasets import ImageSource
from nacguard.offline.ranking_results import (
    PREDICTORS,
    CheckpointResult,
    ModelEvalResult,
    spearman,
    write_report,
)

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
