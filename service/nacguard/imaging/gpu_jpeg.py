"""Batched JPEG decoding on the device, and preprocessing of the decoded tensors there.

:func:`decode_jpeg_batch` decodes a list of JPEG files in one batched nvjpeg call; anything it
should not or cannot decode (other formats, EXIF-rotated images, over-large images, corrupt
data) comes back as None for the CPU path. :func:`preprocess_tensors` then resizes, crops and
normalises the decoded uint8 tensors on the device with the same arithmetic as
:class:`~nacguard.imaging.preprocess.PreprocessSpec`.

Not wired into serving yet: the GPU benchmark and the tests use it.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nacguard.imaging.preprocess import PreprocessSpec

__all__ = [
    "JpegInfo",
    "decode_jpeg_batch",
    "is_jpeg",
    "jpeg_info",
    "preprocess_tensor",
    "preprocess_tensors",
]

log = logging.getLogger(__name__)

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG file (SOI marker followed by another marker)."""
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


@dataclass(frozen=True)
class JpegInfo:
    """What the headers of a JPEG say: size, components, EXIF orientation, coding."""

    width: int
    height: int
    components: int
    orientation: int
    baseline: bool


def _exif_orientation(payload: bytes) -> int:
    """The orientation tag (0x0112) of an APP1 Exif payload; 1 when absent or unreadable."""
    if not payload.startswith(b"Exif\x00\x00") or len(payload) < 14:
        return 1
    tiff = payload[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(min(count, 512)):
            tag, kind, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and kind == 3:  # SHORT
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)
                return int(value)
    except struct.error:
        return 1
    return 1


def jpeg_info(data: bytes) -> JpegInfo | None:
    """Parse a JPEG's markers up to its frame header; None if it is not a readable JPEG."""
    if not is_jpeg(data):
        return None
    pos, orientation = 2, 1
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            return None
        payload = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1:
            orientation = _exif_orientation(payload) if orientation == 1 else orientation
        elif marker in _SOF_MARKERS:
            if len(payload) < 6:
                return None
            _precision, height, width, components = struct.unpack_from(">BHHB", payload, 0)
            return JpegInfo(
                width=width,
                height=height,
                components=components,
                orientation=orientation,
                baseline=marker in (0xC0, 0xC1) and _precision == 8,
            )
        elif marker == 0xDA:  # scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def decode_jpeg_batch(
    datas: Sequence[bytes],
    device: torch.device | str,
    *,
    mode: str = "RGB",
    max_pixels: int | None = None,
) -> list[torch.Tensor | None]:
    """Decode JPEG files in one batched call on ``device`` (nvjpeg on CUDA).

    Returns one entry per input: a uint8 [C, H, W] tensor on ``device`` (C = 3 for ``"RGB"``,
    1 for ``"L"``), or None where the CPU path must take over: not a JPEG, an EXIF orientation
    other than "normal" (the CPU path rotates it), more than ``max_pixels`` pixels (the CPU path
    refuses it with the proper error), CMYK/YCCK or non-8-bit coding, or a decode failure.

    Args:
        datas: encoded files.
        device: where to decode ("cpu" uses libjpeg-turbo, "cuda[:N]" nvjpeg).
        mode: ``"RGB"`` or ``"L"``.
        max_pixels: refuse (return None for) larger images, read from the header.
    """
    with warnings.catch_warnings():
        # torchvision >= 0.29 announces that its image codecs move to TorchCodec; the decoder is
        # still there and still the batched nvjpeg entry point.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(datas)
    picked: list[int] = []
    for i, data in enumerate(datas):
        info = jpeg_info(data)
        if (
            info is None
            or info.orientation != 1
            or info.components not in (1, 3)
            or not info.baseline
            or info.width * info.height == 0
            or (max_pixels is not None and info.width * info.height > max_pixels)
        ):
            continue
        picked.append(i)
    if not picked:
        return out
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in picked]
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(tensors, mode=read_mode, device=dev)
            if isinstance(decoded, torch.Tensor):
                decoded = [decoded]
            for i, t in zip(picked, decoded, strict=True):
                out[i] = t
        except Exception as exc:  # one bad file fails a batched call: decode one by one
            log.debug("batched JPEG decode failed (%s); decoding one by one", exc)
            for i, t in zip(picked, tensors, strict=True):
                try:
                    single = decode_jpeg(t, mode=read_mode, device=dev)
                except Exception:
                    continue
                out[i] = single if isinstance(single, torch.Tensor) else single[0]
    return out


def _to_mode(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [C, H, W] to 1 or 3 channels as Pillow converts (L: ITU-R 601-2 luma)."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 3 and c == 1:
        return img.expand(3, -1, -1)
    if channels == 1 and c >= 3:
        # Pillow: L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
        rgb = img[:3].to(torch.int32)
        luma = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16
        return luma.to(torch.uint8).unsqueeze(0)
    raise ValueError(f"cannot bring a {c}-channel image to {channels} channels")


def _resize_uint8(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with antialiasing of a uint8 [C, H, W] image, rounded back to uint8 as
    Pillow's BILINEAR does (its filter support widens when shrinking, like ``antialias=True``)."""
    x = img.unsqueeze(0).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def preprocess_tensor(img: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """One decoded uint8 [C, H, W] image (any device) to the model's normalised [C, h, w].

    Follows :meth:`PreprocessSpec.__call__`: mode conversion, the shorter side resized to
    ``spec.resize`` then a center crop (or a direct resize to ``spec.size``), scaling to [0, 1]
    and normalisation. Without a resize the result equals the PIL path bit for bit; resizing
    agrees with Pillow's to about one grey level.
    """
    img = _to_mode(img, spec.channels)
    h, w = spec.size
    height, width = int(img.shape[1]), int(img.shape[2])
    if spec.resize is not None:
        scale = spec.resize / min(width, height)
        new_w, new_h = max(w, round(width * scale)), max(h, round(height * scale))
        if (new_w, new_h) != (width, height):
            img = _resize_uint8(img, new_h, new_w)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        img = img[:, top : top + h, left : left + w]
    elif (width, height) != (w, h):
        img = _resize_uint8(img, h, w)
    t = img.to(torch.float32) / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    return (t - mean) / std


def preprocess_tensors(images: Sequence[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """Preprocess decoded uint8 images and stack them into [B, C, h, w] on their device."""
    return torch.stack([preprocess_tensor(img, spec) for img in images])
