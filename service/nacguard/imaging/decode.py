"""Safe decoding and preprocessing of received images, with one set of limits and one policy for
where the work runs.

Everything that can reject an image happens here, before anything is queued, so one bad image
fails its own request with a 4xx and never a batch it would have shared.

Where CPU-bound input work runs (body parsing in the adapters, decoding in the serving core) is
decided in one place: work on at most :data:`INLINE_BYTES` bytes (and, for decoding, at most
:data:`INLINE_PIXELS` pixels read from the headers) runs inline on the event loop, anything
larger in :class:`OffLoop`'s thread pool. A 28x28 PNG decodes and preprocesses in ~40 us, and
splitting and hashing a small body takes microseconds: less than the hop to a worker thread and
back costs under load (thread wake-ups, GIL hand-overs; measured: server CPU per request
0.87 -> 0.60 ms). The pixel bound keeps a small file that claims a large image off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import io
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image

from nacguard.errors import BadImage, NacguardError
from nacguard.imaging.gpu_decode import GpuJpegDecoder
from nacguard.imaging.preprocess import PreprocessSpec, decode_image
from nacguard.settings import Settings, available_cores

__all__ = [
    "INLINE_BYTES",
    "INLINE_PIXELS",
    "DecodedImage",
    "InputLimits",
    "OffLoop",
    "RawImage",
    "cheap_to_decode",
    "cheap_to_parse",
    "decode_images",
    "decode_pool_size",
    "open_if_cheap",
]

T = TypeVar("T")

#: At most this many bytes of input (a body, or a request's encoded images) are worked on inline.
INLINE_BYTES = 64 * 1024
#: At most this many pixels (width * height, summed over a request) are decoded inline.
INLINE_PIXELS = 128 * 128


@dataclass(frozen=True)
class InputLimits:
    """The request limits, from the settings."""

    max_body_bytes: int
    max_images: int
    max_image_bytes: int
    max_pixels: int
    allowed_formats: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        """The limits configured in ``settings``."""
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_images=settings.max_images_per_request,
            max_image_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            allowed_formats=tuple(f.upper() for f in settings.allowed_formats),
        )


@dataclass(frozen=True)
class RawImage:
    """One encoded image as received.

    Attributes:
        data: the encoded bytes.
        sha256: hex digest of ``data`` (the result-cache key).
    """

    data: bytes
    sha256: str


@dataclass(frozen=True)
class DecodedImage:
    """One image ready to queue.

    Attributes:
        tensor: the preprocessed model input [C, H, W] (CPU, float32).
        content_type: media type of the decoded format, e.g. ``image/png``.
    """

    tensor: torch.Tensor
    content_type: str


def cheap_to_parse(nbytes: int) -> bool:
    """Whether splitting and hashing a body of ``nbytes`` is cheap enough for the event loop."""
    return nbytes <= INLINE_BYTES


def cheap_to_decode(
    images: Sequence[RawImage],
    *,
    max_bytes: int = INLINE_BYTES,
    max_pixels: int = INLINE_PIXELS,
) -> bool:
    """Whether decoding ``images`` is cheap enough to do on the event loop.

    Reads only the headers. Anything unusual (unreadable header, a decompression-bomb warning)
    answers False, so the full checks of :func:`decode_images` run in the pool as for any
    large image, and report the error.

    Args:
        images: the encoded images.
        max_bytes: at most this many encoded bytes in all.
        max_pixels: at most this many pixels (width * height) in all.
    """
    opened = open_if_cheap(images, max_bytes=max_bytes, max_pixels=max_pixels)
    for left in opened or ():
        left.close()
    return opened is not None


def open_if_cheap(
    images: Sequence[RawImage],
    *,
    max_bytes: int = INLINE_BYTES,
    max_pixels: int = INLINE_PIXELS,
) -> list[Image.Image] | None:
    """The images opened (headers read, pixels not) when decoding them is cheap enough for the
    event loop (see :func:`cheap_to_decode`), else None.

    Hand them to :func:`decode_images` as ``opened``: the headers are parsed once.
    """
    if sum(len(raw.data) for raw in images) > max_bytes:
        return None
    pixels = 0
    opened: list[Image.Image] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for raw in images:
            try:
                image = Image.open(io.BytesIO(raw.data))
            except Exception:  # Pillow raises many types for corrupt data
                break
            opened.append(image)
            width, height = image.size
            pixels += width * height
            if pixels > max_pixels:
                break
        else:
            return opened
    for left in opened:
        left.close()
    return None


def decode_images(
    images: Sequence[RawImage],
    preprocess: PreprocessSpec,
    limits: InputLimits,
    positions: Sequence[int] | None = None,
    gpu: GpuJpegDecoder | None = None,
    opened: Sequence[Image.Image] | None = None,
) -> list[DecodedImage]:
    """Decode and preprocess every image, or fail on the first bad one.

    Args:
        images: the encoded images.
        preprocess: the bundle's preprocessing.
        limits: the request limits.
        positions: each image's index in its request, for error messages (default: 0, 1, ...).
        gpu: decode the JPEGs it takes on the GPU first (when JPEG is an allowed format); the
            rest, and every image it hands back, take the CPU path below.
        opened: every image as :func:`open_if_cheap` opened it (not with ``gpu``).

    Raises:
        BadImage: an image that does not decode.
        UnsupportedMediaType: a format outside ``allowed_formats``.
        PayloadTooLarge: an image over ``max_image_pixels``.
    """
    on_gpu: list[torch.Tensor | None] = [None] * len(images)
    if gpu is not None and "JPEG" in limits.allowed_formats:
        on_gpu = gpu.decode([raw.data for raw in images], preprocess)
    out: list[DecodedImage] = []
    for k, raw in enumerate(images):
        done = on_gpu[k]
        if done is not None:
            out.append(DecodedImage(tensor=done, content_type="image/jpeg"))
            continue
        where = f"image {positions[k] if positions is not None else k}"
        try:
            image = decode_image(
                raw.data,
                max_pixels=limits.max_pixels,
                allowed_formats=limits.allowed_formats,
                spec=preprocess,
                opened=opened[k] if opened is not None else None,
            )
            fmt = (image.format or "").lower()
            tensor = preprocess(image)
        except NacguardError as exc:
            raise type(exc)(f"{where}: {exc.message}") from None
        except Exception as exc:  # a decoded image that preprocessing cannot handle
            raise BadImage(f"{where}: cannot preprocess ({type(exc).__name__})") from None
        content_type = f"image/{fmt}" if fmt else "application/octet-stream"
        out.append(DecodedImage(tensor=tensor, content_type=content_type))
    return out


def decode_pool_size(settings: Settings) -> int:
    """``decode_threads``, or by default the cores this process may run on divided by the
    number of worker processes sharing them (at least one thread).

    Decoding is CPU-bound, so threads beyond the cores only add images in progress, and with
    them memory (each holds its decoded pixels until preprocessed).
    """
    if settings.decode_threads:
        return settings.decode_threads
    return max(1, available_cores() // settings.worker_count)


class OffLoop:
    """Runs CPU-bound input work inline when it is cheap, else in one thread pool.

    A plain executor rather than ``run_in_threadpool``: under load anyio's hop cost about 50 us
    of CPU per call against about 20 us, a visible share of a small request. As with anyio, a
    cancelled caller waits for work already running, so a request's admission covers the work it
    started. Threads start on demand.

    Args:
        threads: pool size (see :func:`decode_pool_size`); None: asyncio's default.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nacguard-decode")

    async def run(self, cheap: bool, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: on the loop when ``cheap``, else in the pool (context variables kept).

        Args:
            cheap: the caller's :func:`cheap_to_parse` / :func:`cheap_to_decode` answer.
            fn: the work.
            args: its arguments.
        """
        if cheap:
            return fn(*args)
        job = self._pool.submit(functools.partial(contextvars.copy_context().run, fn, *args))
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if not job.cancel():  # already running: let it finish first
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(job)
            raise

    def close(self) -> None:
        """Stop the pool (queued work is cancelled, running work finishes on its own)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
