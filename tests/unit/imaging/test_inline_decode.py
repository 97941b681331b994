"""Which requests are decoded on the event loop: small files of few pixels, nothing else.

``cheap_to_decode`` only chooses where decoding runs; a wrong "yes" would put a large decode on
the event loop, a wrong "no" only costs a thread hop. Errors are reported by the full decode
either way (the /predict error tests cover both paths with their small bad images).
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from PIL import Image

from nacguard.imaging.decode import (
    INLINE_BYTES,
    INLINE_PIXELS,
    RawImage,
    cheap_to_decode,
)
from tests.fixtures.hostile import encode, png_header_only


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
