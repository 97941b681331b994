"""Building a profile bundle: count NAC states on an InD subset, calibrate on held-out InD.

Run under ``torchrun`` with several processes, each process counts a shard of the subset and
the counts are all-reduced (gloo on CPU, nccl on CUDA); calibration scores are gathered. Per-image
states do not depend on batch-mates, so the result equals the single-process profile exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import distributed as dist
from torch import nn
from tqdm import tqdm

from nacguard.bundle import Calibration, save_bundle
from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac import LayerConfig, NacProfile, NacScorer, ProfileBuilder, threshold_at_tpr
from nacguard.nac.calibration import class_thresholds
from nacguard.nac.conformal import fused_calibration
from nacguard.nac.sanity import SanityReport, sanity_check
from nacguard.offline.datasets import ImageSource, class_balanced_indices

__all__ = ["BuildPlan", "batches", "build_bundle", "calibrate_columns",
           "score_columns", "split_indices"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class BuildPlan:
    """Everything ``profile build`` needs besides the model itself."""

    name: str
    model_ref: dict[str, Any]
    preprocess: PreprocessSpec
    classes: Sequence[str]
    layers: list[LayerConfig]
    samples: int = 1000
    calibration_samples: int = 2000
    tpr: float = 0.95
    seed: int = 0
    batch_size: int = 128
    #: "global" (one threshold) or "per-class" (one per predicted class with at least
    #: ``min_class_samples`` held-out images, the global one for the others)
    calibration: str = "global"
    min_class_samples: int = 200
    provenance: dict[str, Any] = field(default_factory=dict)


def split_indices(
    source: ImageSource, samples: int, calibration: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded subsets: a class-balanced one to count, a held-out one to calibrate.

    With ``calibration=0`` only the counting subset is drawn (the second array is empty).
    """
    n = len(source)
    if samples + calibration > n:
        raise ValueError(f"{source.name} has {n} images; need {samples} + {calibration}")
    if source.labels is not None and (source.labels >= 0).all():
        count_idx = class_balanced_indices(source.labels, samples, seed)
        rest = np.setdiff1d(np.arange(n), count_idx)
        cal_local = class_balanced_indices(source.labels[rest], calibration, seed + 1)
        cal_idx = np.sort(rest[cal_local])
    else:
        perm = np.random.default_rng(seed).permutation(n)
        count_idx, cal_idx = np.sort(perm[:samples]), np.sort(perm[samples : samples + calibration])
    return count_idx, cal_idx


def batches(
    images: Sequence[Image.Image], preprocess: PreprocessSpec, batch_size: int, desc: str = ""
) -> Iterator[torch.Tensor]:
    """Preprocessed batches, with a progress bar on a terminal."""
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc=desc, disable=not desc, unit="batch", leave=False):
        yield preprocess.batch([images[i] for i in range(s, min(s + batch_size, len(images)))])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def _reduce(profile: NacProfile, device: torch.device) -> NacProfile:
    """Sum the partial profiles of all ranks (identity without torch.distributed)."""
    if _world()[1] == 1:
        return profile
    layers = []
    for lp in profile.layers:
        counts = lp.counts.to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        layers.append(type(lp)(lp.config, lp.edges, counts.cpu()))
    total = torch.tensor([profile.samples], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return NacProfile(tuple(layers), int(total.item()))


def _gather_scores(scores: np.ndarray) -> np.ndarray:
    if _world()[1] == 1:
        return scores
    parts: list[Any] = [None] * _world()[1]
    dist.all_gather_object(parts, scores)
    return np.concatenate(parts)


def score_columns(
    scorer: NacScorer,
    images: Sequence[Image.Image],
    preprocess: PreprocessSpec,
    batch_size: int,
    device: torch.device,
    desc: str = "",
) -> np.ndarray:
    """[n, 4] NAC, MSP, energy and predicted class of each image (gathered over ranks)."""
    parts = []
    for x in batches(images, preprocess, batch_size, desc):
        r = scorer(x.to(device))
        cls = r.logits.argmax(dim=1).to(r.nac.dtype)
        parts.append(torch.stack([r.nac, r.msp, r.energy, cls], dim=1).cpu().numpy())
    local = np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, 4))
    return _gather_scores(local)


def calibrate_columns(
    columns: np.ndarray,
    source: str,
    *,
    n_classes: int,
    tpr: float = 0.95,
    mode: str = "global",
    min_class_samples: int = 200,
) -> Calibration:
    """The calibration of held-out InD images from their ``[n, 4]`` NAC, MSP, energy and
    predicted-class columns: TPR threshold (global, or per predicted class with at least
    ``min_class_samples`` images), and the sorted scores behind every detector's p-value."""
    nac, msp, energy, predicted = columns.T
    per_class: tuple[tuple[float, ...] | None, tuple[int, ...] | None] = (None, None)
    if mode == "per-class":
        per_class = class_thresholds(nac, predicted.astype(int), n_classes, tpr, min_class_samples)
    elif mode != "global":
        raise ValueError(f"calibration must be 'global' or 'per-class', not {mode!r}")
    return Calibration(
        tpr=tpr,
        threshold=threshold_at_tpr(nac, tpr),
        scores=np.sort(nac),
        source=source,
        msp=np.sort(msp),
        energy=np.sort(energy),
        fused=fused_calibration([nac, msp, energy]),
        class_thresholds=per_class[0],
        class_samples=per_class[1],
    )


def build_bundle(
    plan: BuildPlan,
    model: nn.Module,
    source: ImageSource,
    out: Path,
    *,
    calibration_source: ImageSource | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path | None:
    """Count, calibrate and write a bundle. Returns its path (None on non-zero ranks).

    Calibration images are held out of ``source`` unless ``calibration_source`` is given
    (e.g. images the model was not trained on), which must not overlap the counted images.
    """
    device = torch.device(device)
    owns_group = _maybe_init_distributed(device)
    try:
        rank, world = _world()
        model = model.eval().to(device)
        if calibration_source is None:
            cal_source = source
            count_idx, cal_idx = split_indices(
                source, plan.samples, plan.calibration_samples, plan.seed
            )
        else:
            cal_source = calibration_source
            count_idx, _ = split_indices(source, plan.samples, 0, plan.seed)
            n_cal = min(plan.calibration_samples, len(calibration_source))
            cal_idx, _ = split_indices(calibration_source, n_cal, 0, plan.seed + 1)
        shard_count, shard_cal = count_idx[rank::world], cal_idx[rank::world]
        show = progress and rank == 0
        prep, bs = plan.preprocess, plan.batch_size
        with torch.inference_mode():
            outputs = model(prep.batch([source.images[int(count_idx[0])]]).to(device)).shape[1]
        if outputs != len(plan.classes):
            raise ValueError(
                f"the model has {outputs} outputs but {len(plan.classes)} class names were given"
            )
        builder = ProfileBuilder(model, plan.layers)
        count_images = [source.images[int(i)] for i in shard_count]
        for x in batches(count_images, prep, bs, "counting" if show else ""):
            builder.update(x.to(device))
        profile = _reduce(builder.profile(), device)
        scorer = NacScorer(model, profile, device=device)
        cal_images = [cal_source.images[int(i)] for i in shard_cal]
        columns = score_columns(scorer, cal_images, prep, bs, device, "calibrating" if show else "")
        # The sanity check re-scores the counted images: does the profile know them better
        # than held-out InD images?
        counted = score_columns(scorer, count_images, prep, bs, device, "checking" if show else "")
        if rank != 0:
            return None
        calibration = calibrate_columns(
            columns,
            f"{cal_source.name} ({len(cal_idx)} images, none of them counted)",
            n_classes=len(plan.classes),
            tpr=plan.tpr,
            mode=plan.calibration,
            min_class_samples=plan.min_class_samples,
        )
        sanity: SanityReport = sanity_check(counted[:, 0], columns[:, 0])
        for warning in sanity.warnings:
            log.warning("profile sanity check: %s", warning)
        provenance = {
            "data": source.name,
            "seed": plan.seed,
            "profile_samples": len(count_idx),
            "calibration_samples": len(cal_idx),
            "processes": world,
            **plan.provenance,
        }
        return save_bundle(
            out,
            name=plan.name,
            model_ref=plan.model_ref,
            model=model,
            preprocess=plan.preprocess,
            classes=plan.classes,
            profile=profile,
            calibration=calibration,
            provenance=provenance,
            sanity=sanity.to_dict(),
        )
    finally:
        if owns_group:
            dist.destroy_process_group()
