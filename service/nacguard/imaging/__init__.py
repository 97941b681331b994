"""Images in: safe decoding and preprocessing (:mod:`~nacguard.imaging.preprocess`), the request
limits and the one inline-or-pool policy (:mod:`~nacguard.imaging.decode`), and batched GPU JPEG
decoding (:mod:`~nacguard.imaging.gpu_jpeg`, imported on demand: it loads torchvision's codecs).
"""

from nacguard.imaging.decode import (
    DecodedImage,
    InputLimits,
    OffLoop,
    RawImage,
    cheap_to_decode,
    cheap_to_parse,
    decode_images,
    open_if_cheap,
)
from nacguard.imaging.preprocess import PRESETS, PreprocessSpec, decode_image, normalize_mode

__all__ = [
    "PRESETS",
    "DecodedImage",
    "InputLimits",
    "OffLoop",
    "PreprocessSpec",
    "RawImage",
    "cheap_to_decode",
    "cheap_to_parse",
    "decode_image",
    "decode_images",
    "normalize_mode",
    "open_if_cheap",
]
