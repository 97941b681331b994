"""Profile bundles: a directory holding everything needed to serve a screened classifier.

::

    bundle.json         schema version, name, model reference, preprocessing, classes, NAC
                        layer settings, calibration summary, provenance, sha256 of both files
    model.safetensors   the classifier's weights
    nac.safetensors     per layer ``<name>.edges`` (float32 [M]) and ``<name>.counts``
                        (int64 [M-1, N]); ``calibration.scores`` (sorted held-out InD scores)

Nothing is pickled. The weights' and tables' sha256 are checked on load.

A loaded :class:`Bundle` lives on one device; load it once per device for several runners. The
acceleration options (``channels_last``, ``compile``, ``batch_buckets``; see
:mod:`nacguard.models.accel`) are all off by default, and off they change no number.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
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
from nacguard.models.accel import (
    AcceleratedPaths,
    CompileConfig,
    HostStager,
    accelerate,
    bucket_for,
    normalize_buckets,
    plan_chunks,
)
from nacguard.models.demo import DEMO_ARCHITECTURE
from nacguard.models.loading import build_model, sha256_file
from nacguard.models.preprocess import PreprocessSpec
from nacguard.nac import LayerConfig, LayerProfile, NacProfile, NacScorer, ScoreBatch

__all__ = [
    "SCHEMA_VERSION",
    "Bundle",
    "Calibration",
    "Prediction",
    "WarmupReport",
    "load_bundle",
    "save_bundle",
]

log = logging.getLogger(__name__)

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
        p = self.probabilities
        # The order of a stable argsort of -p (ties keep class order, NaN last), in plain Python:
        # for a handful of classes numpy's array round trip costs more than the sort.
        order = sorted(range(len(p)), key=lambda i: (p[i] != p[i], -p[i]))[:k]
        return [(self.classes[i], float(p[i])) for i in order]

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


@dataclass(frozen=True)
class WarmupReport:
    """What :meth:`Bundle.warmup` ran.

    Attributes:
        sizes: batch sizes run (each bucket in use, smallest first).
        seconds: wall time of the whole warm-up.
        compiled: whether every compiled path still runs compiled afterwards (False also when
            compilation is off).
    """

    sizes: tuple[int, ...]
    seconds: float
    compiled: bool


class Bundle:
    """A loaded profile bundle: model on its device, preprocessing, profile and calibration.

    Build it with :func:`load_bundle`. ``predict`` is the whole pipeline for notebooks;
    ``predict_batch`` is what the server's device runner calls on preprocessed tensors. One
    thread at a time may compute with a bundle (the device's runner thread); load one bundle per
    device.

    Args:
        channels_last: keep the model and its inputs in channels-last memory format (faster
            convolutions on tensor-core GPUs; also valid on CPU).
        compile: torch.compile the plain forward and the NAC paths (True, or a
            :class:`~nacguard.models.accel.CompileConfig`); a failure falls back to eager.
        compile_mode: ``torch.compile`` mode when ``compile`` is True (``None``/"default", or
            e.g. "reduce-overhead" for CUDA graphs; see ``Settings.compile_mode``).
        batch_buckets: pad batches to these sizes (see :mod:`nacguard.models.accel`).
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
        channels_last: bool = False,
        compile: bool | CompileConfig = False,
        compile_mode: str | None = None,
        batch_buckets: Iterable[int] = (),
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
        self.channels_last = channels_last
        self.batch_buckets = normalize_buckets(batch_buckets)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if device.type == "cuda" and self.autocast_dtype is None:
            # fp32 means fp32: cuDNN's default TF32 convolutions keep 10 mantissa bits, which
            # moves NAC states like fp16 would (process-wide flag; the matmul one is off by
            # default). For speed, choose fp16 and its fp32 islands instead.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if device.type == "cuda" and self.batch_buckets:
            # Fixed shapes: let cuDNN time its algorithms once per bucket (process-wide flag;
            # with free batch sizes it would re-time for every new size instead).
            torch.backends.cudnn.benchmark = True
        self.scorer = NacScorer(
            self.model, profile, device=device, autocast_dtype=self.autocast_dtype
        )
        self._stager = HostStager(device)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        self.accel: AcceleratedPaths | None = None
        config: CompileConfig | None = None
        if isinstance(compile, CompileConfig):
            config = compile
        elif compile:
            config = CompileConfig(mode=None if compile_mode in (None, "default") else compile_mode)
        if config is not None:
            if not self.batch_buckets:
                log.warning(
                    "compile without batch_buckets: every new batch size is compiled when it "
                    "first arrives (seconds to minutes each); set batch_buckets"
                )
            self.accel = accelerate(
                self.model,
                self.scorer,
                self._input(torch.zeros(1, preprocess.channels, *preprocess.size)),
                config,
                max_shapes=max(len(self.batch_buckets), 2),
            )
            self._forward = self.accel.plain
            if self.accel.states is not None:
                self.scorer.states_fn = self.accel.states

    @property
    def name(self) -> str:
        """The bundle's name."""
        return str(self.meta.get("name", "unnamed"))

    @property
    def model_name(self) -> str:
        """A short name of the classifier architecture."""
        ref = self.meta.get("model", {})
        if ref.get("kind") == "demo":
            return DEMO_ARCHITECTURE
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

    def _input(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``x`` on the device (padded to ``rows``; pinned + non-blocking from the CPU to a GPU),
        in the model's memory format."""
        x = self._stager(x, rows)
        if self.channels_last and x.dim() == 4:
            # Converted on the device: a CPU-side transpose would cost more than the copy.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward of a batch on the device, under inference mode and autocast."""
        with torch.inference_mode():
            if self.autocast_dtype is None:
                return self._forward(x)
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                return self._forward(x)

    def score(self, x: torch.Tensor) -> ScoreBatch:
        """Raw NAC/MSP/energy scores of a preprocessed batch (moved to the device)."""
        return self.scorer(self._input(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Plain classification (no NAC): softmax probabilities [B, C] on the CPU."""
        logits = self._logits(self._input(x))
        with torch.inference_mode():
            return torch.softmax(logits.float(), dim=1).cpu()

    def _table(self, x: torch.Tensor, scoring: bool) -> torch.Tensor:
        """[B, C + 3] on the device: probabilities, NAC, MSP, energy (NaN when not scoring).

        One tensor, so the results cross to the host in one copy.
        """
        if not scoring:
            logits = self._logits(x)
            with torch.inference_mode():
                probs = torch.softmax(logits.float(), dim=1)
                return torch.cat([probs, probs.new_full((probs.shape[0], 3), math.nan)], dim=1)
        result = self.scorer(x)
        with torch.inference_mode():
            extra = torch.stack([result.nac, result.msp, result.energy], dim=1)
            return torch.cat([result.probs, extra.to(result.probs.dtype)], dim=1)

    def predict_batch(self, x: torch.Tensor, *, scoring: bool = True) -> list[Prediction]:
        """Predictions for a preprocessed batch [B, C, H, W].

        With ``batch_buckets`` the batch is padded with zero images to the next bucket (cut into
        largest-bucket chunks when larger) and the padded rows' results are dropped; each
        image's result does not depend on its batch-mates.

        Args:
            x: the batch (any device; moved to the bundle's).
            scoring: False = plain classification; NAC fields are NaN and ``ood`` False.
        """
        parts = []
        for chunk in plan_chunks(int(x.shape[0]), self.batch_buckets):
            xs = self._input(x[chunk.start : chunk.stop], chunk.size)
            parts.append(self._table(xs, scoring)[: chunk.rows])
        if not parts:
            return []
        table = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()
        n_classes = table.shape[1] - 3
        # One tolist() for the whole table: indexing a tensor per image and field (float(t[i]))
        # costs microseconds each, a visible share of a small model's per-image time.
        rows = table.tolist()
        threshold = self.threshold
        classes = self.classes
        columns = range(n_classes)
        out = []
        for row in rows:
            probs = row[:n_classes]
            idx = max(columns, key=probs.__getitem__)
            score = row[n_classes]
            out.append(
                Prediction(
                    class_index=idx,
                    label=classes[idx],
                    confidence=probs[idx],
                    nac_score=score,
                    ood=bool(score < threshold),
                    threshold=threshold,
                    msp=row[n_classes + 1],
                    energy=row[n_classes + 2],
                    probabilities=probs,
                    classes=classes,
                )
            )
        return out

    def warmup_sizes(self, max_batch_size: int) -> list[int]:
        """Batch sizes :meth:`warmup` runs: every bucket a batch of at most ``max_batch_size``
        images can be padded to (without buckets: 1 and ``max_batch_size``)."""
        if not self.batch_buckets:
            return sorted({1, max_batch_size})
        if max_batch_size > self.batch_buckets[-1]:  # computed in largest-bucket chunks
            return list(self.batch_buckets)
        top = bucket_for(max_batch_size, self.batch_buckets)
        return [b for b in self.batch_buckets if b <= top]

    def warmup(self, max_batch_size: int, *, scoring: bool = True) -> WarmupReport:
        """Run every batch size in use once, so that compilation, CUDA graph capture, cuDNN
        autotuning and allocator growth happen before the first request.

        Call it on the thread that will compute (the device runner's): CUDA graphs are
        recorded per thread.

        Args:
            max_batch_size: the largest batch the caller will send.
            scoring: warm the NAC path (True) or plain classification (False).
        """
        started = time.monotonic()
        sizes = self.warmup_sizes(max_batch_size)
        # CUDA graph trees record on the second call of a shape; run twice so that happens now.
        repeats = 2 if self.accel is not None and self._cudagraphs else 1
        shape = (self.preprocess.channels, *self.preprocess.size)
        for size in sizes:
            # Contiguous, like the batches that follow: compiled graphs are specialised on
            # strides, and an expanded dummy would be compiled for the wrong layout.
            dummy = torch.zeros(size, *shape)
            for _ in range(repeats):
                self.predict_batch(dummy, scoring=scoring)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report = WarmupReport(
            sizes=tuple(sizes),
            seconds=time.monotonic() - started,
            compiled=self.accel is not None and self.accel.active,
        )
        log.info(
            "warmed up %s on %s: batch sizes %s in %.1fs%s",
            self.name,
            self.device,
            list(report.sizes),
            report.seconds,
            " (compiled)" if report.compiled else "",
        )
        return report

    @property
    def _cudagraphs(self) -> bool:
        return self.accel is not None and any(
            c.config.cudagraphs for c in self.accel.compiled.values()
        )

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
            "acceleration": {
                "channels_last": self.channels_last,
                "compiled": self.accel is not None and self.accel.active,
                "nac_path": self.accel.states.path
                if self.accel is not None and self.accel.states is not None
                else "eager",
                "batch_buckets": list(self.batch_buckets),
            },
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
    channels_last: bool = False,
    compile: bool | CompileConfig = False,
    compile_mode: str | None = None,
    batch_buckets: Iterable[int] = (),
) -> Bundle:
    """Load a profile bundle onto a device (call once per device; bundles share nothing).

    Args:
        path: the bundle directory.
        device: torch device for the model and tables.
        precision: "fp32", "bf16" or "fp16" autocast for the forward (states stay fp32).
        channels_last: channels-last memory format for the model and its inputs.
        compile: torch.compile the forward and NAC paths (falls back to eager on failure).
        compile_mode: torch.compile mode: None/"default", "reduce-overhead" (CUDA graphs), ...
        batch_buckets: pad batches up to these sizes (warm them with :meth:`Bundle.warmup`).

    Raises:
        BundleError: missing files, bad schema, failed sha256 check, or a model/profile mismatch.
    """
    path = Path(path)
    meta = _read_meta(path)
    batch_buckets = normalize_buckets(batch_buckets)  # a ValueError here is the caller's
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
            channels_last=channels_last,
            compile=compile,
            compile_mode=compile_mode,
            batch_buckets=batch_buckets,
        )
    except BundleError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise BundleError(f"{path}: incompatible or malformed bundle: {exc}") from exc
