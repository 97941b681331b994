"""Decoding limits and mode normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nacguard.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from nacguard.imaging.preprocess import PRESETS, PreprocessSpec, decode_image, normalize_mode


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_refuses_garbage_empty_and_formats() -> None:
    with pytest.raises(BadImage):
        decode_image(b"", max_pixels=100)
    with pytest.raises(BadImage):
        decode_image(b"not an image at all", max_pixels=100)
    png = _encode(Image.new("L", (8, 8)), "PNG")
    with pytest.raises(BadImage):
        decode_image(png[:30], max_pixels=1000)
    with pytest.raises(UnsupportedMediaType):
        decode_image(png, max_pixels=1000, allowed_formats=["JPEG"])


def test_decode_checks_pixels_from_the_header() -> None:
    big = _encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(PayloadTooLarge):
        decode_image(big, max_pixels=300 * 299)
    assert decode_image(big, max_pixels=300 * 300).size == (300, 300)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (10, 10), (255, 255, 255, 0)),
        lambda: Image.new("P", (10, 10)),
        lambda: Image.new("CMYK", (10, 10), (0, 0, 0, 0)),
        lambda: Image.new("I;16", (10, 10)),
        lambda: Image.new("I", (10, 10)),
        lambda: Image.new("F", (10, 10)),
        lambda: Image.new("1", (10, 10)),
        lambda: Image.new("LA", (10, 10)),
        lambda: Image.new("YCbCr", (10, 10)),
    ],
)
def test_every_mode_normalises(make) -> None:  # type: ignore[no-untyped-def]
    for mode in ("L", "RGB"):
        assert normalize_mode(make(), mode).mode == mode


def test_transparent_pixels_take_the_background() -> None:
    img = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert np.asarray(normalize_mode(img, "L", background=0)).max() == 0
    assert np.asarray(normalize_mode(img, "L", background=255)).min() == 255


def test_sixteen_bit_is_rescaled() -> None:
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert np.asarray(normalize_mode(img, "L")).min() == 255


def test_exif_orientation_is_applied() -> None:
    img = Image.new("L", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    data = _encode(img, "JPEG", exif=exif.tobytes())
    out = normalize_mode(decode_image(data, max_pixels=10_000), "L")
    assert out.size == (10, 20)


def test_preprocess_shapes_and_normalisation() -> None:
    spec = PRESETS["fashion-mnist"]
    t = spec(Image.new("L", (56, 40), 255))
    assert t.shape == (1, 28, 28)
    assert torch.allclose(t, torch.full_like(t, (1.0 - 0.2863) / 0.3532))
    rgb = PRESETS["imagenet"](Image.new("RGB", (500, 375)))
    assert rgb.shape == (3, 224, 224)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
