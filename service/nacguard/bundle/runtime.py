"""The runtime bundle: model on its device, preprocessing, profile and calibration.

A loaded :class:`Bundle` lives on one device; load it once per device for several runners. The
acceleration options (``channels_last``, ``compile``, ``batch_buckets``; see
:mod:`nacguard.accel`) are all off by default, and off they change no number. Process-wide torch
flags (TF32, cuDNN benchmark) are not set here: the service sets them once at start-up
(:func:`nacguard.accel.set_torch_flags`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from nacguard.accel import (
    AcceleratedPaths,
    CompileConfig,
    HostStager,
    accelerate,
    bucket_for,
    normalize_buckets,
    plan_chunks,
)
from nacguard.bundle.refs import model_name
from nacguard.bundle.types import Prediction, WarmupReport
from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac import Calibration, LayerProfile, NacProfile, NacScorer, ScoreBatch
from nacguard.nac.decision import Decision
from nacguard.nac.explain import UncoveredNeuron, uncovered_neurons

__all__ = ["PRECISIONS", "Bundle"]

log = logging.getLogger(__name__)

#: precision name -> autocast dtype (None: plain fp32).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


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
            :class:`~nacguard.accel.CompileConfig`); a failure falls back to eager.
        compile_mode: ``torch.compile`` mode when ``compile`` is True (``None``/"default", or
            e.g. "reduce-overhead" for CUDA graphs; see ``Settings.compile_mode``).
        batch_buckets: pad batches to these sizes (see :mod:`nacguard.accel.buckets`).
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
        self.autocast_dtype = PRECISIONS[precision]
        self.channels_last = channels_last
        self.batch_buckets = normalize_buckets(batch_buckets)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.scorer = NacScorer(
            self.model, profile, device=device, autocast_dtype=self.autocast_dtype
        )
        self._layer_names = tuple(lp.name for lp in profile.layers)
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
        return model_name(self.meta.get("model", {}))

    @property
    def identity(self) -> str:
        """Stable identity of model + profile (for cache keys): name@hash prefix."""
        digest = self.meta.get("nac", {}).get("sha256", "") + self.meta.get("model", {}).get(
            "sha256", ""
        )
        return f"{self.name}@{digest[:8]}{digest[64:72]}"

    @property
    def threshold(self) -> float:
        """OOD threshold on the NAC score (NaN for an uncalibrated profile or the fused
        detector; with ``alpha`` set, the score threshold equivalent to ``p < alpha``)."""
        return self.calibration.decision_threshold if self.calibration else math.nan

    def is_ood(self, score: float, class_index: int = -1) -> bool:
        """The NAC detector's OOD flag for a score (:meth:`Calibration.is_ood`; never for an
        uncalibrated profile). Predictions use :meth:`Calibration.decide`."""
        return self.calibration is not None and self.calibration.is_ood(score, class_index)

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

    def _table(self, x: torch.Tensor, scoring: bool, per_layer: bool) -> torch.Tensor:
        """[B, C + 3 (+ L)] on the device: probabilities, NAC, MSP, energy (NaN when not
        scoring), then the per-layer NAC scores when ``per_layer``.

        One tensor, so the results cross to the host in one copy.
        """
        extra_columns = 3 + (len(self.profile.layers) if per_layer else 0)
        if not scoring:
            logits = self._logits(x)
            with torch.inference_mode():
                probs = torch.softmax(logits.float(), dim=1)
                nan = probs.new_full((probs.shape[0], extra_columns), math.nan)
                return torch.cat([probs, nan], dim=1)
        return self.result_table(self.scorer(x), per_layer)

    def result_table(self, result: ScoreBatch, per_layer: bool = True) -> torch.Tensor:
        """One scored batch as the [B, C + 3 (+ L)] table :meth:`predictions` reads."""
        with torch.inference_mode():
            parts = [result.nac[:, None], result.msp[:, None], result.energy[:, None]]
            if per_layer:
                parts.append(result.layer_nac)
            extra = torch.cat(parts, dim=1)
            return torch.cat([result.probs, extra.to(result.probs.dtype)], dim=1)

    def prediction(
        self,
        probabilities: list[float],
        nac: float,
        msp: float,
        energy: float,
        layer_scores: Sequence[float] = (),
        uncovered: Sequence[UncoveredNeuron] = (),
    ) -> Prediction:
        """One image's prediction from its computed numbers (also rebuilds cached results):
        the class comes from here, the p-values and the OOD flag from
        :meth:`Calibration.decide`."""
        classes = self.classes
        idx = max(range(len(probabilities)), key=probabilities.__getitem__)
        cal = self.calibration
        if cal is None:
            decision = Decision(False, math.nan, math.nan, {})
        else:
            decision = cal.decide(nac, msp, energy, idx)
        return Prediction(
            class_index=idx,
            label=classes[idx],
            confidence=probabilities[idx],
            nac_score=nac,
            ood=decision.ood,
            threshold=decision.threshold,
            msp=msp,
            energy=energy,
            probabilities=probabilities,
            classes=classes,
            p_value=decision.p_value,
            p_values=decision.p_values,
            layer_scores=tuple(layer_scores),
            layer_names=self._layer_names,
            uncovered=tuple(uncovered),
        )

    def predict_batch(
        self, x: torch.Tensor, *, scoring: bool = True, per_layer: bool = True
    ) -> list[Prediction]:
        """Predictions for a preprocessed batch [B, C, H, W].

        With ``batch_buckets`` the batch is padded with zero images to the next bucket (cut into
        largest-bucket chunks when larger) and the padded rows' results are dropped; each
        image's result does not depend on its batch-mates.

        Args:
            x: the batch (any device; moved to the bundle's).
            scoring: False = plain classification; NAC fields are NaN and ``ood`` False.
            per_layer: keep the per-layer scores (``Prediction.layers``, what ``explain``
                shows). They are computed anyway (the score is their mean); False only drops
                the L extra columns, for comparisons.
        """
        parts = []
        for chunk in plan_chunks(int(x.shape[0]), self.batch_buckets):
            xs = self._input(x[chunk.start : chunk.stop], chunk.size)
            parts.append(self._table(xs, scoring, per_layer)[: chunk.rows])
        if not parts:
            return []
        table = (parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()
        # One tolist() for the whole table: indexing a tensor per image and field (float(t[i]))
        # costs microseconds each, a visible share of a small model's per-image time.
        return self.predictions(table.tolist())

    def predictions(self, rows: list[list[float]]) -> list[Prediction]:
        """Predictions from the rows of :meth:`result_table` (moved to the host as lists)."""
        make = self.prediction
        c = len(self.classes)
        return [make(row[:c], row[c], row[c + 1], row[c + 2], row[c + 3 :]) for row in rows]

    def explain_batch(self, x: torch.Tensor, top: int = 5) -> list[Prediction]:
        """Predictions with the ``top`` least covered neurons of each image (``uncovered``):
        one more state pass than :meth:`predict_batch`, so not for the serving hot path."""
        predictions = self.predict_batch(x)
        states = self.scorer.extractor(self._input(x)).states
        neurons = uncovered_neurons(states, self.scorer.tables, top)
        return [
            self.prediction(
                p.probabilities, p.nac_score, p.msp, p.energy, p.layer_scores, uncovered=u
            )
            for p, u in zip(predictions, neurons, strict=True)
        ]

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
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "calibration": self.calibration.summary() if self.calibration else None,
            "sanity": self.meta.get("sanity"),
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
