"""The profile bundle on disk: a directory holding everything needed to serve a screened
classifier.

::

    bundle.json         schema version, name, model reference, preprocessing, classes, NAC
                        layer settings, calibration summary, provenance, sha256 of both files
    model.safetensors   the classifier's weights
    nac.safetensors     per layer ``<name>.edges`` (float32 [M]) and ``<name>.counts``
                        (int64 [M-1, N]); ``calibration.scores`` (sorted held-out InD scores)
                        and, in bundles built with p-values, ``calibration.msp``,
                        ``calibration.energy`` (sorted baseline scores of the same images) and
                        ``calibration.fused`` (their sorted Fisher statistics); older bundles
                        load without them (no baseline p-values, no fused detector)

Nothing is pickled. The weights' and tables' sha256 are checked on load.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nacguard
from nacguard.accel import CompileConfig, normalize_buckets
from nacguard.bundle.refs import build_model
from nacguard.bundle.refs.common import sha256_file
from nacguard.bundle.runtime import PRECISIONS, Bundle
from nacguard.errors import BundleError
from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac import Calibration, LayerConfig, LayerProfile, NacProfile

__all__ = [
    "BUNDLE_FILE",
    "MODEL_FILE",
    "NAC_FILE",
    "SCHEMA_VERSION",
    "load_bundle",
    "save_bundle",
    "sha256_file",
    "write_calibration",
]

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.safetensors"
NAC_FILE = "nac.safetensors"


def save_bundle(
    out: Path,
    *,
    name: str,
    model_ref: dict[str, Any],
    model: nn.Module,
    preprocess: PreprocessSpec,
    classes: Sequence[str],
    profile: NacProfile,
    calibration: Calibration | None,
    provenance: dict[str, Any] | None = None,
    sanity: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle directory (created if needed) and return its path.

    ``sanity`` is the build's profile sanity report
    (:meth:`~nacguard.nac.sanity.SanityReport.to_dict`), kept in bundle.json.
    """
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not _same_tensors(out / MODEL_FILE, state):
        # Rewritten only when the weights changed, so rebuilding a profile in place keeps the
        # weights file (and its sha256, part of the bundle identity) byte for byte.
        save_file(state, str(out / MODEL_FILE))
    _save_tables(out / NAC_FILE, profile, calibration)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "nacguard_version": nacguard.__version__,
        "model": {**model_ref, "weights": MODEL_FILE, "sha256": sha256_file(out / MODEL_FILE)},
        "preprocess": preprocess.to_dict(),
        "classes": list(classes),
        "nac": {
            "file": NAC_FILE,
            "sha256": sha256_file(out / NAC_FILE),
            "samples": profile.samples,
            "layers": [lp.config.to_dict() for lp in profile.layers],
        },
        "calibration": _calibration_meta(calibration),
        "provenance": provenance or {},
    }
    if sanity is not None:
        meta["sanity"] = sanity
    _replace_text(out / BUNDLE_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def write_calibration(
    path: Path,
    profile: NacProfile,
    calibration: Calibration,
    *,
    provenance: dict[str, Any],
    sanity: dict[str, Any] | None = None,
) -> Path:
    """Replace a bundle's calibration (and its ``provenance`` / ``sanity`` entries) in place.

    The weights and the counted tables stay as they are. ``nac.safetensors`` and then
    ``bundle.json`` are each written to a temporary file and renamed over the old one, so no
    reader ever sees a half-written file; a load between the two renames fails its sha256 check
    instead of mixing old and new calibration.
    """
    meta = _read_meta(path)
    _save_tables(path / meta["nac"]["file"], profile, calibration)
    meta["nac"]["sha256"] = sha256_file(path / meta["nac"]["file"])
    meta["calibration"] = _calibration_meta(calibration)
    meta["provenance"] = provenance
    if sanity is not None:
        meta["sanity"] = sanity
    _replace_text(path / BUNDLE_FILE, json.dumps(meta, indent=2) + "\n")
    return path


def _save_tables(file: Path, profile: NacProfile, calibration: Calibration | None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for lp in profile.layers:
        tensors[f"{lp.name}.edges"] = lp.edges.cpu().float().contiguous()
        tensors[f"{lp.name}.counts"] = lp.counts.cpu().to(torch.int64).contiguous()
    if calibration is not None:
        stored = {
            "scores": calibration.scores,
            "msp": calibration.msp,
            "energy": calibration.energy,
            "fused": calibration.fused,
        }
        for key, values in stored.items():
            if values is not None:
                # fused statistics are sums of logs: float64, so their ties stay ties
                dtype = np.float64 if key == "fused" else np.float32
                tensors[f"calibration.{key}"] = torch.from_numpy(np.sort(values).astype(dtype))
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_text(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _calibration_meta(calibration: Calibration | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {
        k: v
        for k, v in calibration.summary().items()
        if k not in {"score_quantiles", "alpha", "detector"}
    }


def _same_tensors(file: Path, state: dict[str, torch.Tensor]) -> bool:
    if not file.is_file():
        return False
    try:
        existing = load_file(str(file))
    except Exception:  # unreadable: overwrite it
        return False
    return existing.keys() == state.keys() and all(
        existing[k].dtype == v.dtype and torch.equal(existing[k], v) for k, v in state.items()
    )


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise BundleError(f"{path} is not a profile bundle (no {BUNDLE_FILE})")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{file}: invalid JSON ({exc})") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{file}: schema version {version!r} is not supported (expected {SCHEMA_VERSION})"
        )
    return meta


def _checked(path: Path, entry: dict[str, Any], key: str) -> Path:
    file = path / entry[key]
    if not file.is_file():
        raise BundleError(f"bundle file missing: {file}")
    expected = entry.get("sha256")
    if expected and sha256_file(file) != expected:
        raise BundleError(f"{file}: sha256 does not match bundle.json (corrupt or replaced)")
    return file


def _calibration(
    cal_meta: dict[str, Any] | None,
    tables: dict[str, torch.Tensor],
    alpha: float | None,
    detector: str,
) -> Calibration | None:
    if not cal_meta:
        return None

    def stored(key: str) -> np.ndarray | None:
        t = tables.get(f"calibration.{key}")
        return None if t is None else t.numpy().astype(np.float64)

    per_class = cal_meta.get("class_thresholds")
    try:
        return Calibration(
            tpr=float(cal_meta["tpr"]),
            threshold=float(cal_meta["threshold"]),
            scores=tables["calibration.scores"].numpy().astype(np.float64),
            source=str(cal_meta.get("source", "")),
            msp=stored("msp"),
            energy=stored("energy"),
            fused=stored("fused"),
            class_thresholds=(
                tuple(math.nan if t is None else float(t) for t in per_class) if per_class else None
            ),
            class_samples=tuple(int(n) for n in cal_meta.get("class_samples", ())) or None,
            alpha=alpha,
            detector=detector,
        )
    except ValueError as exc:  # the decision rule refused these settings: say which
        raise BundleError(str(exc)) from None


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool | CompileConfig = False,
    compile_mode: str | None = None,
    batch_buckets: Iterable[int] = (),
    ood_alpha: float | None = None,
    ood_detector: str = "nac",
    model: nn.Module | None = None,
) -> Bundle:
    """Load a profile bundle onto a device (call once per device; bundles share nothing
    unless given ``model``).

    Args:
        path: the bundle directory.
        device: torch device for the model and tables.
        precision: "fp32", "bf16" or "fp16" autocast for the forward (states stay fp32).
        channels_last: channels-last memory format for the model and its inputs.
        compile: torch.compile the forward and NAC paths (falls back to eager on failure).
        compile_mode: torch.compile mode: None/"default", "reduce-overhead" (CUDA graphs), ...
        batch_buckets: pad batches up to these sizes (warm them with :meth:`Bundle.warmup`).
        ood_alpha: flag images whose p-value is below it (None: the calibrated threshold).
        ood_detector: "nac", or "fused" (the calibrated Fisher fusion of NAC, MSP and energy
            p-values; needs a bundle that stores their calibration scores).
        model: the classifier already loaded (on ``device``) from weights with the sha256 this
            bundle records: a profile-only update shares it instead of reading the weights
            again. The weights file is still checked against its sha256.

    Raises:
        BundleError: missing files, bad schema, failed sha256 check, or a model/profile mismatch.
    """
    path = Path(path)
    meta = _read_meta(path)
    batch_buckets = normalize_buckets(batch_buckets)  # a ValueError here is the caller's
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}")
    try:
        weights = _checked(path, meta["model"], "weights")
        if model is None:
            model = build_model(meta["model"], path)
            model.load_state_dict(load_file(str(weights)), strict=True)
        tables = load_file(str(_checked(path, meta["nac"], "file")))
        layers = []
        for cfg in meta["nac"]["layers"]:
            config = LayerConfig(**cfg)
            layers.append(
                LayerProfile(
                    config, tables[f"{config.name}.edges"], tables[f"{config.name}.counts"]
                )
            )
        profile = NacProfile(tuple(layers), int(meta["nac"]["samples"]))
        calibration = _calibration(meta.get("calibration"), tables, ood_alpha, ood_detector)
        return Bundle(
            path=path,
            meta=meta,
            model=model,
            preprocess=PreprocessSpec.from_dict(meta["preprocess"]),
            classes=list(meta["classes"]),
            profile=profile,
            calibration=calibration,
            device=torch.device(device),
            precision=precision,
            channels_last=channels_last,
            compile=compile,
            compile_mode=compile_mode,
            batch_buckets=batch_buckets,
        )
    except BundleError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise BundleError(f"{path}: incompatible or malformed bundle: {exc}") from exc
