"""What a device runner computes: a batch of preprocessed images -> one result per image.

One :class:`DeviceCompute` per device wraps that device's bundle. It runs only on the device's
runner thread (see :mod:`nacguard.engine.runner`), so per-thread torch state (intra-op threads,
current CUDA device) is set there, on the first call.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from nacguard.models.bundle import Bundle, Prediction
from nacguard.settings import Settings

__all__ = ["BatchInfo", "DeviceCompute", "ImageResult", "warm_up_sizes"]

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


def warm_up_sizes(settings: Settings) -> list[int]:
    """Batch sizes run before the server reports ready: 1, every bucket and the largest."""
    return sorted({1, settings.max_batch_size, *settings.batch_buckets})


class DeviceCompute:
    """The runner's compute function for one device's bundle.

    Args:
        bundle: the bundle loaded on this device.
        settings: ``scoring``, ``torch_threads``, ``batch_buckets`` and ``channels_last``.
    """

    def __init__(self, bundle: Bundle, settings: Settings) -> None:
        self.bundle = bundle
        self.device = str(bundle.device)
        self._scoring = settings.scoring
        self._threads = settings.torch_threads
        self._buckets = list(settings.batch_buckets)
        self._channels_last = settings.channels_last
        self._seq = itertools.count()
        self._thread_ready = False

    def _prepare_thread(self) -> None:
        # Intra-op thread counts and the current CUDA device are per-thread settings: they must
        # be made on the thread that runs the model.
        if self._threads:
            torch.set_num_threads(self._threads)
        if self.bundle.device.type == "cuda" and self.bundle.device.index is not None:
            torch.cuda.set_device(self.bundle.device)
        if self._channels_last:
            self.bundle.model.to(memory_format=torch.channels_last)
        self._thread_ready = True

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` with zero images to the smallest bucket that holds it."""
        n = x.shape[0]
        size = next((b for b in self._buckets if b >= n), n)
        if size == n:
            return x
        return torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])

    def __call__(self, items: list[torch.Tensor]) -> list[ImageResult]:
        """Compute one batch; results in item order."""
        if not self._thread_ready:
            self._prepare_thread()
        started = time.monotonic()
        x = self._padded(torch.stack(items))
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Padding images are scored too (their rows are dropped): per-image scores do not depend
        # on batch-mates, since the model runs in eval mode.
        predictions = self.bundle.predict_batch(x, scoring=self._scoring)[: len(items)]
        info = BatchInfo(
            device=self.device,
            seq=next(self._seq),
            size=len(items),
            started=started,
            compute_s=time.monotonic() - started,
        )
        return [ImageResult(prediction=p, batch=info) for p in predictions]
