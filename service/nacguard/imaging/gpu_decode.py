"""JPEG uploads decoded on the GPU, batched across concurrent requests, with the CPU path for
whatever the GPU does not take.

:class:`GpuJpegDecoder` is what the serving core's decode threads call (through
:func:`~nacguard.imaging.decode.decode_images`) when ``gpu_decode`` is on and the model runs on
CUDA. Batching needs no timer: one decode runs on the device at a time, and the thread that
takes the device next decodes everything the other threads queued meanwhile, in one nvjpeg call
(a group commit). Under light load a request's images decode alone, at once; under load the
batches grow with the queue.

Each image comes back as its preprocessed CPU tensor, or None: not a JPEG, EXIF-rotated,
progressive, CMYK, over the pixel limit, corrupt, or any device error. The caller decodes those
on the CPU, which also gives a bad image its proper 4xx, so the GPU path can never change an
answer's status, only (within the fidelity measured by ``loadtest/gpu_bench.py``) its score.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from nacguard.imaging.gpu_jpeg import decode_jpeg_batch, preprocess_tensor
from nacguard.imaging.preprocess import PreprocessSpec

__all__ = ["MAX_DECODE_BATCH", "GpuJpegDecoder"]

log = logging.getLogger(__name__)

#: At most this many files per nvjpeg call; more waiting files take the next call. 64 images of
#: 12 MP are ~2.3 GB of decoded pixels on the device, briefly.
MAX_DECODE_BATCH = 64

DecodeBatch = Callable[..., list[torch.Tensor | None]]


@dataclass
class _Job:
    datas: Sequence[bytes]
    spec: PreprocessSpec
    done: threading.Event = field(default_factory=threading.Event)
    out: list[torch.Tensor | None] = field(default_factory=list)


class GpuJpegDecoder:
    """Decodes and preprocesses JPEG files on one device, batching concurrent callers.

    Thread-safe; meant for the decode pool's threads (never the event loop: a call waits for
    the device).

    Args:
        device: where to decode (``"cuda:N"``; ``"cpu"`` runs the same logic on libjpeg-turbo,
            which is what the tests do).
        max_pixels: files declaring more pixels go to the CPU path (which refuses them).
        decode_batch: the batched decoder (default :func:`decode_jpeg_batch`).

    Attributes:
        decoded: images decoded here so far.
        passed: images handed back to the CPU path so far.
        batches: device calls so far.
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        max_pixels: int,
        decode_batch: DecodeBatch = decode_jpeg_batch,
    ) -> None:
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self._decode_batch = decode_batch
        self._lock = threading.Lock()  # guards the queue and the counters
        self._device = threading.Lock()  # one decode on the device at a time
        self._queue: list[_Job] = []
        self.decoded = self.passed = self.batches = 0

    @property
    def waiting(self) -> int:
        """Calls queued for the next device batch."""
        with self._lock:
            return len(self._queue)

    def decode(self, datas: Sequence[bytes], spec: PreprocessSpec) -> list[torch.Tensor | None]:
        """Preprocessed CPU float32 tensors [C, H, W] of ``spec``, or None per file for the CPU
        path. Blocks until the batch holding these files has run."""
        if not datas:
            return []
        job = _Job(datas, spec)
        with self._lock:
            self._queue.append(job)
        while not job.done.is_set():
            with self._device:
                if not job.done.is_set():
                    self._run_queue()
        return job.out

    def warmup(self) -> None:
        """Decode one small JPEG, so nvjpeg's set-up is not paid by the first request."""
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, format="JPEG")
        self._decode_batch([buf.getvalue()], self.device, mode="RGB", max_pixels=self.max_pixels)

    def _run_queue(self) -> None:
        # With the device lock held: the oldest queued calls, up to MAX_DECODE_BATCH files, in
        # one device call (the caller's own call may be among them or wait for the next one).
        with self._lock:
            jobs: list[_Job] = []
            size = 0
            while self._queue and (
                not jobs
                or (
                    size + len(self._queue[0].datas) <= MAX_DECODE_BATCH
                    and self._queue[0].spec == jobs[0].spec
                )
            ):
                jobs.append(self._queue.pop(0))
                size += len(jobs[-1].datas)
        flat = [d for job in jobs for d in job.datas]
        try:
            out = self._on_device(flat, jobs[0].spec)
        except Exception as exc:  # a device error must not fail the requests: CPU takes them
            log.warning(
                "GPU JPEG decoding failed for %d file(s) (%s); decoding on CPU", len(flat), exc
            )
            out = [None] * len(flat)
        with self._lock:
            self.batches += 1
            taken = sum(t is not None for t in out)
            self.decoded += taken
            self.passed += len(out) - taken
        start = 0
        for job in jobs:
            job.out = out[start : start + len(job.datas)]
            start += len(job.datas)
            job.done.set()

    def _on_device(self, datas: list[bytes], spec: PreprocessSpec) -> list[torch.Tensor | None]:
        decoded = self._decode_batch(datas, self.device, mode="RGB", max_pixels=self.max_pixels)
        picked = [(i, t) for i, t in enumerate(decoded) if t is not None]
        out: list[torch.Tensor | None] = [None] * len(datas)
        if picked:
            # One stack and one copy back: the runner threads expect CPU tensors, and a single
            # device-to-host copy of 224x224 inputs costs far less than decoding on the CPU.
            stacked = torch.stack([preprocess_tensor(t, spec) for _, t in picked]).cpu()
            for k, (i, _) in enumerate(picked):
                out[i] = stacked[k]
        return out
