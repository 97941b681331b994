"""Image decoding and preprocessing: bytes -> PIL image -> normalised tensor.

Decoding refuses oversized images from the header alone (before pixels are decompressed), so a
decompression bomb costs nothing. Every mode Pillow can open is normalised to the model's mode:
EXIF orientation applied, palette and alpha flattened onto the background, 16-bit and float
images rescaled to 8 bits, CMYK converted, animated images reduced to their first frame.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from nacguard.errors import BadImage, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "DECODE_MODES",
    "INTERPOLATIONS",
    "PRESETS",
    "REDUCING_GAP",
    "PreprocessSpec",
    "decode_image",
    "normalize_mode",
]

#: Resampling filters by name (the names timm and Hugging Face configs use).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: How an encoded image is decoded before the resize (the bundle records one):
#: ``"full"`` decodes every pixel, then resizes (bundles written before the field existed);
#: ``"scaled"`` lets the decoder shrink a large image first (see :meth:`PreprocessSpec.draft`).
DECODE_MODES = ("full", "scaled")
#: In ``"scaled"`` mode a resize first shrinks by whole factors with a box filter while the image
#: stays at least this many times the target, then resamples with the spec's filter (Pillow's
#: ``reducing_gap``; 2.0 is what its ``thumbnail`` uses). For formats without decoder scaling.
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input tensor.

    Attributes:
        mode: "L" (1 channel) or "RGB" (3 channels).
        size: final (height, width).
        resize: if set, first resize so the shorter side has this length, then center-crop to
            ``size`` (the ImageNet recipe); if None, resize directly to ``size``.
        mean, std: per-channel normalisation after scaling pixels to [0, 1].
        background: gray level (0-255) that transparent pixels are composited onto.
        interpolation: resampling filter of the resize steps (a key of ``INTERPOLATIONS``).
        decode: a key of ``DECODE_MODES``. ``"scaled"`` (the default for new specs) decodes a
            JPEG at the largest DCT scale (1/2, 1/4, 1/8) that still covers the resize target
            and shrinks other formats with ``REDUCING_GAP``; ``"full"`` (what a record without
            the field means, so older bundles score as they did) decodes every pixel.
    """

    mode: Literal["L", "RGB"] = "RGB"
    size: tuple[int, int] = (224, 224)
    resize: int | None = 256
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    background: int = 0
    interpolation: str = "bilinear"
    decode: str = "scaled"
    _mean_a: np.ndarray = field(init=False, repr=False, compare=False)
    _std_a: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        channels = 1 if self.mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mode {self.mode} needs {channels} mean/std values")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; use one of {sorted(INTERPOLATIONS)}"
            )
        if self.decode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {self.decode!r}; use one of {DECODE_MODES}")
        object.__setattr__(self, "size", tuple(self.size))
        # float32, as the pixels are: the normalisation is float32 arithmetic.
        object.__setattr__(self, "_mean_a", np.asarray(self.mean, dtype=np.float32))
        object.__setattr__(self, "_std_a", np.asarray(self.std, dtype=np.float32))

    @property
    def channels(self) -> int:
        """Number of input channels."""
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d.pop("_mean_a")
        d.pop("_std_a")
        d["size"] = list(self.size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Inverse of ``to_dict``."""
        return cls(
            mode=d["mode"],
            size=(int(d["size"][0]), int(d["size"][1])),
            resize=d.get("resize"),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            background=int(d.get("background", 0)),
            interpolation=str(d.get("interpolation", "bilinear")),
            decode=str(d.get("decode", "full")),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the resize step brings a ``width`` x ``height`` image to (before
        the crop): the least an image must have for the resize only to shrink it."""
        h, w = self.size
        if self.resize is None:
            return w, h
        scale = self.resize / min(width, height)
        return max(w, round(width * scale)), max(h, round(height * scale))

    def draft(self, image: Image.Image) -> Image.Image:
        """Configure a not yet decoded JPEG to decode at the largest reduced DCT scale whose
        result still covers :meth:`resized_size` in both directions (``"scaled"`` mode only).

        A no-op for ``"full"`` mode, other formats and images already decoded. The target is
        taken in the EXIF-oriented frame, as the resize sees it. Pillow picks the scale
        ``s`` in {1, 2, 4, 8} as the largest not above ``min(W // w, H // h)``, so the drafted
        image (``ceil(W / s)`` x ``ceil(H / s)``) is never smaller than the target.

        Args:
            image: as returned by ``Image.open`` (header read, pixels not yet decoded).
        """
        if self.decode != "scaled" or image.format != "JPEG" or not getattr(image, "tile", None):
            return image
        width, height = image.size
        transposed = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        if transposed:
            width, height = height, width
        tw, th = self.resized_size(width, height)
        image.draft(image.mode, (th, tw) if transposed else (tw, th))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one PIL image into a float32 tensor [C, H, W].

        An image not yet decoded is decoded here, the way :meth:`draft` says, so a file opened
        lazily preprocesses exactly as the same bytes do through :func:`decode_image`.
        """
        img = normalize_mode(self.draft(image), self.mode, self.background)
        h, w = self.size
        gap = REDUCING_GAP if self.decode == "scaled" else None
        new = self.resized_size(img.width, img.height)
        if new != img.size:
            img = img.resize(new, INTERPOLATIONS[self.interpolation], reducing_gap=gap)
        if self.resize is not None:
            left, top = (img.width - w) // 2, (img.height - h) // 2
            img = img.crop((left, top, left + w, top + h))
        # In numpy, on [H, W(, C)] (a channel's mean and std broadcast over the last axis),
        # then viewed as [C, H, W]: the same float32 operations as in torch, without torch's
        # per-operation dispatch (a few microseconds each, most of a 28x28 image's cost).
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr -= self._mean_a
        arr /= self._std_a
        return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and stack images into [B, C, H, W]."""
        return torch.stack([self(img) for img in images])


PRESETS: dict[str, PreprocessSpec] = {
    "imagenet": PreprocessSpec(),
    "fashion-mnist": PreprocessSpec(
        mode="L", size=(28, 28), resize=None, mean=(0.2863,), std=(0.3532,)
    ),
}


def normalize_mode(image: Image.Image, mode: str, background: int = 0) -> Image.Image:
    """Bring any Pillow image to mode "L" or "RGB" (see module docstring)."""
    # tell(), not n_frames: counting the frames of an animated GIF walks all of them (a 8 MB
    # GIF of 1x1 frames has hundreds of thousands), and only the first one is used.
    if image.tell() != 0:
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    src = image.mode
    if src in {"1", "L", "RGB"} and "transparency" in image.info:
        # A tRNS colour key (PNG): those pixels are transparent, like palette transparency.
        image = image.convert("LA" if src == "L" else "RGBA")
        src = image.mode
    elif src in {"La", "RGBa"}:  # premultiplied alpha (TIFF "associated alpha")
        image = image.convert("LA" if src == "La" else "RGBA")
        src = image.mode
    if src in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if src.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif src == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    elif src == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif src not in {"L", "RGB", "RGBA", "LA", "1"}:
        image = image.convert("RGBA" if "A" in src else "RGB")  # CMYK, YCbCr, LAB, HSV, PA...
    if image.mode in {"RGBA", "LA", "PA"}:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert(mode) if image.mode != mode else image


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: Sequence[str] | None = None,
    spec: PreprocessSpec | None = None,
    opened: Image.Image | None = None,
) -> Image.Image:
    """Decode image bytes, enforcing format and size limits before full decoding.

    With ``spec``, a JPEG is decoded at the reduced scale :meth:`PreprocessSpec.draft` picks
    (the limits still apply to the size the header declares). ``opened``: what
    ``Image.open(io.BytesIO(data))`` already returned for these bytes (headers read, pixels
    not), so they are not parsed twice; the checks are the same.

    Raises:
        BadImage: not a decodable image.
        UnsupportedMediaType: a format outside ``allowed_formats``.
        PayloadTooLarge: more than ``max_pixels`` pixels (checked from the header).
    """
    if not data:
        raise BadImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = opened if opened is not None else Image.open(io.BytesIO(data))
            fmt = image.format or "unknown"
            if allowed_formats is not None and fmt.upper() not in {
                f.upper() for f in allowed_formats
            }:
                raise UnsupportedMediaType(f"image format {fmt} is not accepted")
            width, height = image.size
            if width <= 0 or height <= 0:
                raise BadImage("image has no pixels")
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            if spec is not None:
                spec.draft(image)
            image.load()
    except (BadImage, UnsupportedMediaType, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own bomb check (far above any sane limit) fired first; its message names
        # Pillow's threshold, not the one the client is held to.
        raise PayloadTooLarge(
            f"image too large: more than the limit of {max_pixels} pixels ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise BadImage(f"cannot decode image: {type(exc).__name__}") from None
    return image
