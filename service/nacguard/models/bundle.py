"""Profile bundles: a directory holding everything needed to serve a screened classifier.

::

    bundle.json         schema version, name, model reference, preprocessing, classes, NAC
                        layer settings, calibration summary, provenance, sha256 of both files
    model.safetensors   the classifier's weights
    nac.safetensors     per layer ``<name>.edges`` (float32 [M]) and ``<name>.counts``
                        (int64 [M-1, N]); ``calibration.scores`` (sorted held-out InD scores)

Nothing is pickled. The weights' and tables' sha256 are checked on load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import nacguard
from nacguard.errors import BundleError
from nacguard.models.loading import build_model, sha256_file
from nacguard.models.preprocess import PreprocessSpec
from nacguard.nac import LayerConfig, LayerProfile, NacProfile, NacScorer, ScoreBatch

__all__ = ["SCHEMA_VERSION", "Bundle", "Calibration", "Prediction", "load_bundle", "save_bundle"]

SCHEMA_VERSION = 1
BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.safetensors"
NAC_FILE = "nac.safetensors"
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Calibration:
    """The OOD threshold and the InD score distribution it was fitted on.

    Attributes:
        tpr: target share of InD inputs that pass (score >= threshold).
        threshold: inputs scoring below it are flagged OOD.
        scores: sorted held-out InD scores (never the images that were counted).
        source: where the held-out images came from.
    """

    tpr: float
    threshold: float
    scores: np.ndarray
    source: str = ""

    @property
    def expected_ood_rate(self) -> float:
        """Share of InD inputs flagged OOD, as measured on the calibration scores."""
        return float(np.mean(self.scores < self.threshold))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: threshold, TPR, sample count and score quantiles."""
        qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
        return {
            "tpr": self.tpr,
            "threshold": self.threshold,
            "samples": int(self.scores.size),
            "expected_ood_rate": self.expected_ood_rate,
            "source": self.source,
            "score_quantiles": {str(q): float(np.quantile(self.scores, q)) for q in qs},
        }


@dataclass(frozen=True)
class Prediction:
    """One image's answer: class, confidence, NAC score and OOD flag (plus baselines)."""

    class_index: int
    label: str
    confidence: float
    nac_score: float
    ood: bool
    threshold: float
    msp: float
    energy: float
    probabilities: list[float] = field(repr=False)
    classes: Sequence[str] = field(repr=False, compare=False)

    def top_k(self, k: int) -> list[tuple[str, float]]:
        """The k most probable classes, most probable first."""
        order = np.argsort(-np.asarray(self.probabilities), kind="stable")[:k]
        return [(self.classes[i], float(self.probabilities[i])) for i in order]

    def to_dict(self, top_k: int = 0) -> dict[str, Any]:
        """JSON-able form (the API's prediction object)."""
        return {
            "label": self.label,
            "class_index": self.class_index,
            "confidence": self.confidence,
            "nac_score": self.nac_score,
            "ood": self.ood,
            "threshold": self.threshold,
            "top_k": [{"label": lab, "confidence": c} for lab, c in self.top_k(top_k)],
        }


class Bundle:
    """A loaded profile bundle: model on its device, preprocessing, profile and calibration.

    Build it with :func:`load_bundle`. ``predict`` is the whole pipeline for notebooks;
    ``predict_batch`` is what the server's device runner calls on preprocessed tensors.
    """

    def __init__(
        self,
        *,
        path: Path | None,
        meta: dict[str, Any],
        model: nn.Module,
        preprocess: PreprocessSpec,
        classes: list[str],
        profile: NacProfile,
        calibration: Calibration | None,
        device: torch.device,
        precision: str = "fp32",
    ) -> None:
        self.path = path
        self.meta = meta
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.classes = classes
        self.profile = profile
        self.calibration = calibration
        self.device = device
        self.precision = precision
        self.autocast_dtype = _DTYPES[precision]
        self.scorer = NacScorer(
            self.model, profile, device=device, autocast_dtype=self.autocast_dtype
        )

    @property
    def name(self) -> str:
        """The bundle's name."""
        return str(self.meta.get("name", "unnamed"))

    @property
    def model_name(self) -> str:
        """A short name of the classifier architecture."""
        ref = self.meta.get("model", {})
        return str(ref.get("name") or ref.get("arch") or ref.get("kind", "model"))

    @property
    def identity(self) -> str:
        """Stable identity of model + profile (for cache keys): name@hash prefix."""
        digest = self.meta.get("nac", {}).get("sha256", "") + self.meta.get("model", {}).get(
            "sha256", ""
        )
        return f"{self.name}@{digest[:8]}{digest[64:72]}"

    @property
    def threshold(self) -> float:
        """OOD threshold (NaN for an uncalibrated profile)."""
        return self.calibration.threshold if self.calibration else math.nan

    @property
    def layers(self) -> tuple[LayerProfile, ...]:
        """Per monitored layer: settings (name, beta, O, M), edges and counts."""
        return self.profile.layers

    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Raw NAC/MSP/energy scores of a preprocessed batch (moved to the device)."""
        return self.scorer(x.to(self.device, non_blocking=True))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Plain classification (no NAC): softmax probabilities [B, C] on the CPU."""
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.autocast_dtype is None:
                logits = self.model(x)
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                    logits = self.model(x)
            return torch.softmax(logits.float(), dim=1).cpu()

    def predict_batch(self, x: torch.Tensor, *, scoring: bool = True) -> list[Prediction]:
        """Predictions for a preprocessed batch [B, C, H, W].

        Args:
            x: the batch (any device; moved to the bundle's).
            scoring: False = plain classification; NAC fields are NaN and ``ood`` False.
        """
        if not scoring:
            probs = self.classify(x)
            nac = msp = energy = torch.full((x.shape[0],), math.nan)
        else:
            result = self.score(x)
            probs, nac = result.probs.cpu(), result.nac.cpu()
            msp, energy = result.msp.cpu(), result.energy.cpu()
        threshold = self.threshold
        out = []
        for i, row in enumerate(probs.tolist()):
            idx = max(range(len(row)), key=row.__getitem__)
            score = float(nac[i])
            out.append(
                Prediction(
                    class_index=idx,
                    label=self.classes[idx],
                    confidence=row[idx],
                    nac_score=score,
                    ood=bool(score < threshold),
                    threshold=threshold,
                    msp=float(msp[i]),
                    energy=float(energy[i]),
                    probabilities=row,
                    classes=self.classes,
                )
            )
        return out

    def predict(self, images: Sequence[Image.Image], batch_size: int = 256) -> list[Prediction]:
        """Preprocess PIL images and predict them in batches."""
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            batch = self.preprocess.batch(images[start : start + batch_size])
            out.extend(self.predict_batch(batch))
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (the API's ``/v1/profile`` and ``profile inspect``)."""
        return {
            "name": self.name,
            "model": self.meta.get("model", {}),
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "layers": [
                {**lp.config.to_dict(), "neurons": lp.neurons} for lp in self.profile.layers
            ],
            "profile_samples": self.profile.samples,
            "threshold": self.threshold,
            "calibration": self.calibration.summary() if self.calibration else None,
            "device": str(self.device),
            "precision": self.precision,
            "schema_version": self.meta.get("schema_version"),
            "provenance": self.meta.get("provenance", {}),
        }


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
) -> Path:
    """Write a bundle directory (created if needed) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not _same_tensors(out / MODEL_FILE, state):
        # Rewritten only when the weights changed, so rebuilding a profile in place keeps the
        # weights file (and its sha256, part of the bundle identity) byte for byte.
        save_file(state, str(out / MODEL_FILE))
    tensors: dict[str, torch.Tensor] = {}
    for lp in profile.layers:
        tensors[f"{lp.name}.edges"] = lp.edges.cpu().float().contiguous()
        tensors[f"{lp.name}.counts"] = lp.counts.cpu().to(torch.int64).contiguous()
    if calibration is not None:
        tensors["calibration.scores"] = torch.from_numpy(
            np.sort(calibration.scores).astype(np.float32)
        )
    save_file(tensors, str(out / NAC_FILE))
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
        "calibration": (
            {k: v for k, v in calibration.summary().items() if k != "score_quantiles"}
            if calibration
            else None
        ),
        "provenance": provenance or {},
    }
    (out / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


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


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    precision: str = "fp32",
) -> Bundle:
    """Load a profile bundle onto a device.

    Args:
        path: the bundle directory.
        device: torch device for the model and tables.
        precision: "fp32", "bf16" or "fp16" autocast for the forward (states stay fp32).

    Raises:
        BundleError: missing files, bad schema, failed sha256 check, or a model/profile mismatch.
    """
    path = Path(path)
    meta = _read_meta(path)
    if precision not in _DTYPES:
        raise BundleError(f"unknown precision {precision!r}; use one of {sorted(_DTYPES)}")
    try:
        model = build_model(meta["model"])
        weights = _checked(path, meta["model"], "weights")
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
        cal_meta = meta.get("calibration")
        calibration = (
            Calibration(
                tpr=float(cal_meta["tpr"]),
                threshold=float(cal_meta["threshold"]),
                scores=tables["calibration.scores"].numpy().astype(np.float64),
                source=str(cal_meta.get("source", "")),
            )
            if cal_meta
            else None
        )
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
        )
    except BundleError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise BundleError(f"{path}: incompatible or malformed bundle: {exc}") from exc
