"""What a device runner computes: a batch of preprocessed images -> one result per image.

One :class:`DeviceCompute` per device wraps that device's bundle. It runs only on the device's
runner thread (see :mod:`nacguard.engine.runner`), so per-thread torch state (intra-op threads,
current CUDA device) is set there, on the first call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from nacguard.bundle import Bundle, Prediction
from nacguard.bundle.shadow import predict_pair
from nacguard.settings import Settings

__all__ = ["BatchInfo", "DeviceCompute", "ImageResult", "ShadowPlan", "ShadowSink"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchInfo:
    """One computed batch, as seen by the images in it.

    Attributes:
        device: the runner's device.
        seq: the batch's number on that device (with ``device``, identifies the batch).
        size: images computed (padding to a bucket not counted).
        started: ``time.monotonic()`` when compute began.
        compute_s: seconds of compute.
    """

    device: str
    seq: int
    size: int
    started: float
    compute_s: float


class ShadowSink(Protocol):
    """Who records a shadow profile's predictions (:class:`nacguard.serving.shadow.Shadow`)."""

    def counted(self, forward: str) -> None:
        """One batch scored, ``forward`` = ``shared`` (the primary's states) or ``separate``
        (a forward of its own); called on the runner thread."""

    def observe(self, predictions: Sequence[Prediction]) -> None:
        """Record the shadow's predictions (on the event loop)."""


@dataclass(frozen=True)
class ShadowPlan:
    """How a device runner also scores its batches against a shadow profile.

    Attributes:
        bundle: the shadow's bundle on the runner's device.
        lock: the lock of the shadow's model (for a forward of its own).
        shared: score the primary's layer states (equal weights, same layers): no forward.
        sink: where the shadow's predictions go.
    """

    bundle: Bundle
    lock: threading.Lock
    shared: bool
    sink: ShadowSink


@dataclass(frozen=True)
class ImageResult:
    """One image's prediction and the batch it ran in (and the shadow's, when one scores)."""

    prediction: Prediction
    batch: BatchInfo
    shadow: tuple[ShadowSink, Prediction] | None = None


class DeviceCompute:
    """The runner's compute function for one device's bundle.

    The first call (the service's warm-up, before readiness) prepares the runner thread and runs
    :meth:`Bundle.warmup` there: every batch-size bucket once, so compilation, CUDA graph capture
    and cuDNN autotuning happen on the thread that will compute, before the first request.
    Bucket padding, channels_last and pinned host staging happen inside the bundle.

    Args:
        bundle: the bundle loaded on this device.
        settings: ``scoring``, ``torch_threads`` and ``max_batch_size``.
        lock: held while computing; bundles that share one model (a profile-only update of
            the model repository, old and new version both live during the swap) share it,
            because the NAC state hooks are attached to the model for the length of a call.
    """

    def __init__(
        self, bundle: Bundle, settings: Settings, lock: threading.Lock | None = None
    ) -> None:
        self.bundle = bundle
        self._lock = lock if lock is not None else threading.Lock()
        self.device = str(bundle.device)
        self._scoring = settings.scoring
        self._threads = settings.torch_threads
        self._max_batch_size = settings.max_batch_size
        self._seq = itertools.count()
        self._thread_ready = False
        #: The shadow profile scoring this runner's batches too (set on the event loop, read
        #: once per batch); None keeps the plain path.
        self.shadow: ShadowPlan | None = None

    def _prepare_thread(self) -> None:
        # Intra-op thread counts, the current CUDA device and CUDA graphs are per-thread: they
        # must be set up on the thread that runs the model.
        if self._threads:
            torch.set_num_threads(self._threads)
        if self.bundle.device.type == "cuda" and self.bundle.device.index is not None:
            torch.cuda.set_device(self.bundle.device)
        report = self.bundle.warmup(self._max_batch_size, scoring=self._scoring)
        log.info("warmed up %s: %s", self.device, report)
        self._thread_ready = True

    def __call__(self, items: list[torch.Tensor]) -> list[ImageResult]:
        """Compute one batch; results in item order."""
        shadow = self.shadow if self._scoring else None
        shadowed: list[Prediction] = []
        with self._locks(shadow):
            if not self._thread_ready:
                self._prepare_thread()
            started = time.monotonic()
            if shadow is None:
                predictions = self.bundle.predict_batch(torch.stack(items), scoring=self._scoring)
            else:
                predictions, shadowed = self._with_shadow(torch.stack(items), shadow)
        info = BatchInfo(
            device=self.device,
            seq=next(self._seq),
            size=len(items),
            started=started,
            compute_s=time.monotonic() - started,
        )
        if shadow is None:
            return [ImageResult(prediction=p, batch=info) for p in predictions]
        sink = shadow.sink
        return [
            ImageResult(prediction=p, batch=info, shadow=(sink, q))
            for p, q in zip(predictions, shadowed, strict=True)
        ]

    def _with_shadow(
        self, x: torch.Tensor, shadow: ShadowPlan
    ) -> tuple[list[Prediction], list[Prediction]]:
        """The batch's predictions and the shadow's: one forward when it shares the states,
        else a second forward on the shadow's model (its lock, unless it is this one's)."""
        if shadow.shared:
            pair = predict_pair(self.bundle, shadow.bundle, x)
            shadow.sink.counted("shared")
            return pair
        predictions = self.bundle.predict_batch(x)
        shadowed = shadow.bundle.predict_batch(x)  # its model's lock is held: see _locks
        shadow.sink.counted("separate")
        return predictions, shadowed

    @contextlib.contextmanager
    def _locks(self, shadow: ShadowPlan | None) -> Iterator[None]:
        """Hold this model's lock, and the shadow's when its own forward runs.

        Both are taken in one global order (by identity), never one inside the other as they
        come: model A shadowed by B's weights while B is shadowed by A's would otherwise have
        each runner hold one lock and wait for the other's.
        """
        if shadow is None or shadow.shared or shadow.lock is self._lock:
            with self._lock:
                yield
            return
        first, second = sorted((self._lock, shadow.lock), key=id)
        with first, second:
            yield
