"""Which requests are decoded on the event loop: small files of few pixels, nothing else.

``cheap_to_decode`` only chooses where decoding runs; a wrong "yes" would put a large decode on
the event loop, a wrong "no" only costs a thread hop. Errors are reported by the full decode
either way (the /predict error tests cover both paths with their small bad images).
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nacguard.errors import BadImage
from nacguard.imaging.decode import (
    INLINE_BYTES,
    INLINE_PIXELS,
    InputLimits,
    RawImage,
    cheap_to_decode,
    decode_images,
    open_if_cheap,
)
from nacguard.imaging.preprocess import PreprocessSpec
from tests.fixtures.hostile import encode, png_header_only

SPEC = PreprocessSpec(mode="L", size=(28, 28), resize=None, mean=(0.5,), std=(0.25,))
LIMITS = InputLimits(
    max_body_bytes=1 << 20,
    max_images=8,
    max_image_bytes=1 << 20,
    max_pixels=1 << 20,
    allowed_formats=("PNG", "JPEG"),
)


def _raw(data: bytes) -> RawImage:
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def _png(side: int) -> RawImage:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)
    return _raw(encode(Image.fromarray(pixels, "L"), "PNG"))


def test_small_images_are_cheap() -> None:
    assert cheap_to_decode([_png(28)])
    assert cheap_to_decode([_png(28)] * 8)


def test_pixel_bound_counts_the_whole_request() -> None:
    side = int(INLINE_PIXELS**0.5)
    assert cheap_to_decode([_png(side)])
    assert not cheap_to_decode([_png(side + 1)])
    assert not cheap_to_decode([_png(side), _png(2)])


def test_small_file_claiming_many_pixels_is_not_cheap() -> None:
    assert not cheap_to_decode([_raw(png_header_only(4000, 4000))])
    # Past Pillow's decompression-bomb warning: refused without a warning escaping.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cheap_to_decode([_raw(png_header_only(60_000, 60_000))])


def test_byte_bound_and_unreadable_headers() -> None:
    big = _raw(b"\x89PNG" + b"\0" * INLINE_BYTES)
    assert not cheap_to_decode([big])
    assert not cheap_to_decode([_raw(b"not an image")])
    assert not cheap_to_decode([_png(28), _raw(b"")])


def test_opened_headers_decode_as_the_bytes_do() -> None:
    """The inline path decodes from the images ``open_if_cheap`` opened: the same tensors as
    decoding the bytes afresh, and the same errors for a file that opens but does not decode."""
    images = [_png(28), _png(9), _raw(encode(Image.new("RGB", (20, 30), (9, 80, 200)), "JPEG"))]
    opened = open_if_cheap(images)
    assert opened is not None and len(opened) == len(images)
    got = decode_images(images, SPEC, LIMITS, opened=opened)
    fresh = decode_images(images, SPEC, LIMITS)
    assert [d.content_type for d in got] == ["image/png", "image/png", "image/jpeg"]
    for a, b in zip(got, fresh, strict=True):
        assert a.tensor.std() > 0 and torch.equal(a.tensor, b.tensor)
    truncated = [images[1], _raw(images[0].data[: len(images[0].data) // 2])]
    opened = open_if_cheap(truncated)
    assert opened is not None  # the header reads; the pixels do not
    with pytest.raises(BadImage, match="image 1: cannot decode"):
        decode_images(truncated, SPEC, LIMITS, opened=opened)
    with pytest.raises(BadImage, match="image 1: cannot decode"):
        decode_images(truncated, SPEC, LIMITS)


def test_open_if_cheap_answers_as_cheap_to_decode() -> None:
    side = int(INLINE_PIXELS**0.5)
    cases = [[_png(28)], [_png(side), _png(2)], [_raw(b"not an image")], [_png(28), _raw(b"")]]
    for images in cases:
        assert (open_if_cheap(images) is not None) == cheap_to_decode(images)
