"""What a device runner computes: a batch of preprocessed images -> one result per image.

One :class:`DeviceCompute` per device wraps that device's bundle. It runs only on the device's
runner thread (see :mod:`nacguard.engine.runner`), so per-thread torch state (intra-op threads,
current CUDA device) is set there, on the first call.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from nacguard.bundle import Bundle, Prediction
from nacguard.settings import Settings

__all__ = ["BatchInfo", "DeviceCompute", "ImageResult"]

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


@dataclass(frozen=True)
class ImageResult:
    """One image's prediction and the batch it ran in."""

    prediction: Prediction
    batch: BatchInfo


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
        with self._lock:
            if not self._thread_ready:
                self._prepare_thread()
            started = time.monotonic()
            predictions = self.bundle.predict_batch(torch.stack(items), scoring=self._scoring)
        info = BatchInfo(
            device=self.device,
            seq=next(self._seq),
            size=len(items),
            started=started,
            compute_s=time.monotonic() - started,
        )
        return [ImageResult(prediction=p, batch=info) for p in predictions]
