"""``nacguard profile calibrate``: recalibrate an existing bundle on held-out InD images.

The weights and the counted NAC tables stay; what changes is everything a decision reads: the
TPR threshold (global, or per predicted class), the sorted NAC, MSP and energy scores behind the
p-values, and the calibrated Fisher statistics of the fused detector. The calibration images
must be InD images that played no other part in building the model or the profile (not trained
on, not counted, not used to choose settings); only then are the p-values' false-alarm rates
what they promise on fresh images (docs/calibration.md).

When the bundle's provenance names the counted images (``data``, ``seed``, ``profile_samples``,
as ``profile build`` and ``profile tune`` record them) and that source loads, the counted images
are re-scored for the sanity check against the new calibration images; otherwise the build's
sanity report is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nacguard.bundle import load_bundle, write_calibration
from nacguard.nac.calibration import Calibration
from nacguard.nac.sanity import sanity_check
from nacguard.offline.build import calibrate_columns, score_columns, split_indices
from nacguard.offline.datasets import ImageSource, load_source

__all__ = ["Recalibration", "recalibrate_bundle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    """What :func:`recalibrate_bundle` wrote."""

    path: Path
    calibration: Calibration
    previous_threshold: float | None
    sanity: dict[str, Any] | None


def _counted_images(meta: dict[str, Any]) -> ImageSource | None:
    prov = meta.get("provenance") or {}
    try:
        source = load_source(str(prov["data"]), seed=int(prov["seed"]))
        idx, _ = split_indices(source, int(prov["profile_samples"]), 0, int(prov["seed"]))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        log.info("counted images not reproducible from the provenance (%s): sanity kept", exc)
        return None
    return source.subset(idx)


def recalibrate_bundle(
    path: str | Path,
    source: ImageSource,
    *,
    samples: int | None = None,
    mode: str = "global",
    tpr: float = 0.95,
    min_class_samples: int = 200,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> Recalibration:
    """Score ``source`` (all of it, or a seeded class-balanced ``samples`` of it) with the
    bundle at ``path`` and write the new calibration into the bundle (atomically per file).

    Raises:
        ValueError: a bad mode, tpr or sample count, or a source with no images.
        BundleError: the path is not a loadable bundle.
    """
    path = Path(path)
    if mode not in ("global", "per-class"):
        raise ValueError(f"--calibration must be 'global' or 'per-class', not {mode!r}")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"--tpr must be in (0, 1], got {tpr}")
    n = len(source)
    if samples is not None and not 0 < samples <= n:
        raise ValueError(f"{source.name} has {n} images; cannot calibrate on {samples}")
    if n == 0:
        raise ValueError(f"{source.name} has no images to calibrate on")
    bundle = load_bundle(path, device)
    meta = bundle.meta
    if source.name == (meta.get("provenance") or {}).get("data"):
        raise ValueError(
            f"{source.name} is the data this profile was counted on: calibrate on held-out images"
        )
    idx = np.arange(n)
    if samples is not None and samples < n:
        idx = split_indices(source, samples, 0, seed)[0]
    images = [source.images[int(i)] for i in idx]
    columns = score_columns(
        bundle.scorer, images, bundle.preprocess, batch_size, bundle.device,
        "calibrating" if progress else "",
    )  # fmt: skip
    calibration = calibrate_columns(
        columns,
        f"{source.name} ({len(idx)} images, none of them counted)",
        n_classes=len(bundle.classes),
        tpr=tpr,
        mode=mode,
        min_class_samples=min_class_samples,
    )
    sanity = meta.get("sanity")
    counted = _counted_images(meta)
    if counted is not None:
        counted_scores = score_columns(
            bundle.scorer, list(counted.images), bundle.preprocess, batch_size, bundle.device,
            "checking" if progress else "",
        )  # fmt: skip
        report = sanity_check(counted_scores[:, 0], columns[:, 0])
        for warning in report.warnings:
            log.warning("profile sanity check: %s", warning)
        sanity = report.to_dict()
    provenance = {
        **(meta.get("provenance") or {}),
        "calibration_data": source.name,
        "calibration_samples": len(idx),
        "calibration_seed": seed,
        "recalibrated": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    previous = (meta.get("calibration") or {}).get("threshold")
    write_calibration(path, bundle.profile, calibration, provenance=provenance, sanity=sanity)
    return Recalibration(path, calibration, previous, sanity)
