"""The GPU JPEG path of serving (:class:`~nacguard.imaging.gpu_decode.GpuJpegDecoder` through
``decode_images``), run on the CPU: torchvision's batched ``decode_jpeg`` on libjpeg-turbo takes
the place of nvjpeg, and everything around it (which files it takes, the CPU fallback with the
proper errors, batching across threads, device errors) is the code that runs on CUDA."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nacguard.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from nacguard.imaging.decode import InputLimits, RawImage, decode_images, decode_pool_size
from nacguard.imaging.gpu_decode import MAX_DECODE_BATCH, GpuJpegDecoder
from nacguard.imaging.gpu_jpeg import decode_jpeg_batch
from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.settings import Settings, available_cores

SPEC = PreprocessSpec(size=(64, 64), resize=72)
LIMITS = InputLimits(
    max_body_bytes=1 << 24,
    max_images=64,
    max_image_bytes=1 << 22,
    max_pixels=500 * 500,
    allowed_formats=("JPEG", "PNG"),
)


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)


def _raw(image: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> RawImage:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    data = buf.getvalue()
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def _rotated(seed: int) -> RawImage:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _raw(_photo(120, 80, seed), exif=exif.tobytes())


def test_jpegs_it_takes_match_the_cpu_path_and_the_rest_fall_back() -> None:
    gpu = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels)
    images = [
        _raw(_photo(160, 120, 1), quality=95),  # taken
        _raw(_photo(90, 90, 2), "PNG"),  # not a JPEG
        _rotated(3),  # EXIF-rotated: Pillow rotates it
        _raw(_photo(100, 100, 4), progressive=True),  # progressive
        _raw(_photo(200, 150, 5), quality=95),  # taken
    ]
    got = decode_images(images, SPEC, LIMITS, gpu=gpu)
    cpu = decode_images(images, SPEC, LIMITS)
    assert (gpu.decoded, gpu.passed, gpu.batches) == (2, 3, 1)
    assert [d.content_type for d in got] == [d.content_type for d in cpu]
    level = 1.0 / 255.0 / min(SPEC.std)
    for k, (a, b) in enumerate(zip(got, cpu, strict=True)):
        assert a.tensor.shape == b.tensor.shape == (3, 64, 64)
        assert a.tensor.device.type == "cpu" and a.tensor.dtype == torch.float32
        if k in (1, 2, 3):  # the CPU path itself
            assert torch.equal(a.tensor, b.tensor)
        else:  # another decoder and resize: close, not equal
            assert float(b.tensor.std()) > 0.1
            assert float((a.tensor - b.tensor).abs().mean()) < 2 * level


def test_refused_files_get_the_cpu_paths_errors() -> None:
    gpu = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels)
    good = _raw(_photo(64, 64, 6))
    too_big = _raw(Image.new("RGB", (600, 600), (10, 20, 30)))
    truncated = RawImage(data=good.data[:40], sha256="x")
    with pytest.raises(PayloadTooLarge, match=r"image 1: .*600x600"):
        decode_images([good, too_big], SPEC, LIMITS, gpu=gpu)
    with pytest.raises(BadImage, match="image 0"):
        decode_images([truncated, good], SPEC, LIMITS, gpu=gpu)
    no_jpeg = InputLimits(**{**LIMITS.__dict__, "allowed_formats": ("PNG",)})
    before = gpu.batches
    with pytest.raises(UnsupportedMediaType):
        decode_images([good], SPEC, no_jpeg, gpu=gpu)
    assert gpu.batches == before  # JPEG not accepted: the GPU is not even asked


def test_a_device_error_sends_everything_to_the_cpu() -> None:
    def broken(*args: Any, **kwargs: Any) -> list[torch.Tensor | None]:
        raise RuntimeError("CUDA error: out of memory")

    gpu = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels, decode_batch=broken)
    images = [_raw(_photo(80, 60, s)) for s in range(3)]
    got = decode_images(images, SPEC, LIMITS, gpu=gpu)
    assert (gpu.decoded, gpu.passed) == (0, 3)
    for a, b in zip(got, decode_images(images, SPEC, LIMITS), strict=True):
        assert torch.equal(a.tensor, b.tensor)


class _SignallingQueue(list):  # type: ignore[type-arg]
    """The decoder's queue, telling the test when a call has joined it (no polling)."""

    def __init__(self) -> None:
        super().__init__()
        self.joined = threading.Semaphore(0)

    def append(self, item: Any) -> None:
        super().append(item)
        self.joined.release()


def test_concurrent_callers_share_one_device_batch() -> None:
    # The first call holds the device until two more calls are queued; the next device call
    # must then take both (one batch of 2 + 3 files), and every caller gets its own results.
    on_device, queued = threading.Event(), threading.Event()
    sizes: list[int] = []

    def gated(datas: list[bytes], *args: Any, **kwargs: Any) -> list[torch.Tensor | None]:
        sizes.append(len(datas))
        if len(sizes) == 1:
            on_device.set()
            assert queued.wait(30)
        return decode_jpeg_batch(datas, *args, **kwargs)

    gpu = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels, decode_batch=gated)
    queue = gpu._queue = _SignallingQueue()
    calls = {
        n: [_raw(_photo(48 + 8 * k, 40, 10 * n + k)).data for k in range(n)] for n in (1, 2, 3)
    }
    results: dict[int, list[torch.Tensor | None]] = {}

    def call(n: int) -> None:
        results[n] = gpu.decode(calls[n], SPEC)

    threads = [threading.Thread(target=call, args=(n,)) for n in (1, 2, 3)]
    threads[0].start()
    assert on_device.wait(30)
    for t in threads[1:]:
        t.start()
    for _ in range(3):  # the first call's own entry, then the two others
        assert queue.joined.acquire(timeout=30)
    queued.set()
    for t in threads:
        t.join(30)
    assert sizes == [1, 5]
    assert gpu.batches == 2
    for n, datas in calls.items():
        alone = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels).decode(datas, SPEC)
        assert len(results[n]) == n
        assert all(
            a is not None and b is not None and torch.equal(a, b)
            for a, b in zip(results[n], alone, strict=True)
        )


def test_a_device_call_holds_at_most_max_decode_batch_files() -> None:
    sizes: list[int] = []

    def counting(datas: list[bytes], *args: Any, **kwargs: Any) -> list[torch.Tensor | None]:
        sizes.append(len(datas))
        return [None] * len(datas)

    gpu = GpuJpegDecoder("cpu", max_pixels=LIMITS.max_pixels, decode_batch=counting)
    assert gpu.decode([b"x"] * (MAX_DECODE_BATCH + 5), SPEC) == [None] * (MAX_DECODE_BATCH + 5)
    assert sizes == [MAX_DECODE_BATCH + 5]  # one call is never split (its files go together)
    assert gpu.decode([], SPEC) == []


def test_decode_pool_is_sized_from_the_cores_and_the_workers() -> None:
    cores = available_cores()
    assert decode_pool_size(Settings(workers=1)) == cores
    # Worker processes share the cores: each gets its share of decode threads, at least one.
    assert decode_pool_size(Settings(workers=2)) == max(1, cores // 2)
    assert decode_pool_size(Settings(workers=cores + 1)) == 1
    auto = Settings()
    assert decode_pool_size(auto) == max(1, cores // auto.worker_count)
    assert decode_pool_size(Settings(decode_threads=7)) == 7
