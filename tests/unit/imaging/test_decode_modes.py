"""Every image Pillow can open becomes a correct L/RGB image, or a 4xx error; nothing else.

Complements test_preprocess.py (which checks that each mode *converts*) with pixel values:
modes written by real encoders (PNG, TIFF, JPEG, WebP, GIF, BMP), alpha of every kind composited
onto the background, 16-bit and float rescaling, CMYK, all eight EXIF orientations, first frames
of animations, header-declared sizes refused before decoding, formats outside the allowed list,
odd TIFF layouts, and mutated files (hypothesis).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nacguard.errors import BadImage, NacguardError, PayloadTooLarge, UnsupportedMediaType
from nacguard.imaging.decode import InputLimits, RawImage, decode_images
from nacguard.imaging.preprocess import PRESETS, decode_image, normalize_mode
from tests.fixtures.hostile import (
    bmp_header_only,
    encode,
    gif_header_only,
    jpeg_header_only,
    png_header_only,
    tiff_image,
    webp_header_only,
)

ALLOWED = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
LIMITS = InputLimits(
    max_body_bytes=1 << 20,
    max_images=8,
    max_image_bytes=1 << 20,
    max_pixels=1_000_000,
    allowed_formats=ALLOWED,
)


def _gray(data: bytes, background: int = 0) -> np.ndarray:
    image = decode_image(data, max_pixels=1_000_000, allowed_formats=ALLOWED)
    return np.asarray(normalize_mode(image, "L", background), dtype=np.int16)


def _rgb(data: bytes, background: int = 0) -> np.ndarray:
    image = decode_image(data, max_pixels=1_000_000, allowed_formats=ALLOWED)
    return np.asarray(normalize_mode(image, "RGB", background), dtype=np.int16)


# --- opaque modes keep their gray level ---------------------------------------------------------

V = 150  # a mid gray: every mode can represent it (mode "1" excepted)


def _uniform(mode: str) -> Image.Image:
    """An 8x8 image of gray level V in ``mode`` (built from its channel values)."""
    if mode in {"I;16", "I;16B"}:
        dtype = "<u2" if mode == "I;16" else ">u2"
        return Image.frombytes(mode, (8, 8), np.full((8, 8), V * 257, dtype).tobytes())
    if mode == "P":
        image = Image.new("P", (8, 8), 1)
        image.putpalette([0, 0, 0, V, V, V])
        return image
    if mode == "I":
        return Image.fromarray(np.full((8, 8), V * 257, np.int32), "I")
    if mode == "F":
        return Image.fromarray(np.full((8, 8), V / 255, np.float32), "F")
    return Image.new("RGB", (8, 8), (V, V, V)).convert(mode)


# (format, mode, tolerance): what real encoders write; lossy formats get a tolerance.
OPAQUE = [
    ("PNG", "L", 0),
    ("PNG", "RGB", 0),
    ("PNG", "P", 0),
    ("PNG", "I;16", 1),
    ("PNG", "I;16B", 1),
    ("PNG", "LA", 0),
    ("PNG", "RGBA", 0),
    ("TIFF", "L", 0),
    ("TIFF", "RGB", 0),
    ("TIFF", "CMYK", 1),
    ("TIFF", "YCbCr", 2),
    ("TIFF", "LAB", 2),
    ("TIFF", "I;16", 1),
    ("TIFF", "I;16B", 1),
    ("TIFF", "I", 1),
    ("TIFF", "F", 1),
    ("TIFF", "RGBX", 0),
    ("JPEG", "L", 2),
    ("JPEG", "RGB", 2),
    ("JPEG", "CMYK", 2),
    ("WEBP", "RGB", 3),
    ("GIF", "L", 0),
    ("GIF", "P", 0),
    ("BMP", "L", 0),
    ("BMP", "RGB", 0),
    ("BMP", "P", 0),
]


@pytest.mark.parametrize(("fmt", "mode", "tol"), OPAQUE, ids=[f"{f}-{m}" for f, m, _ in OPAQUE])
def test_opaque_modes_keep_the_gray_level(fmt: str, mode: str, tol: int) -> None:
    data = encode(_uniform(mode), fmt)
    gray = _gray(data)
    assert gray.shape == (8, 8)
    assert np.abs(gray - V).max() <= tol, (Image.open(io.BytesIO(data)).mode, gray[0, 0])
    rgb = _rgb(data)
    assert rgb.shape == (8, 8, 3)
    assert np.abs(rgb - V).max() <= tol


def test_bilevel_images() -> None:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((3, 3), 1)
    for fmt in ("PNG", "TIFF", "BMP"):
        gray = _gray(encode(img, fmt))
        assert gray[3, 3] == 255 and gray.sum() == 255, fmt


def test_cmyk_jpeg_colours() -> None:
    # Adobe CMYK JPEGs store inverted ink values; white (no ink) and black (full K) must survive.
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (8, 0, 16, 8))
    rgb = _rgb(encode(img, "JPEG", quality=95))
    assert rgb[:, :4].min() >= 250
    assert rgb[:, 12:].max() <= 5


def test_sixteen_bit_scaling() -> None:
    arr = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16)
    for fmt in ("PNG", "TIFF"):
        gray = _gray(encode(Image.fromarray(arr), fmt))
        assert gray.tolist() == [[0, 64, 128, 255]], fmt
    # 32-bit integer images: 16-bit range when values exceed 8 bits, else taken as 8-bit.
    wide = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    assert _gray(encode(wide, "TIFF")).tolist() == [[0, 255]]
    narrow = Image.fromarray(np.array([[0, 200]], np.int32), "I")
    assert _gray(encode(narrow, "TIFF")).tolist() == [[0, 200]]
    # Float images in [0, 1]; NaN becomes 0.
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), "F")
    assert _gray(encode(floats, "TIFF")).tolist() == [[0, 127, 255, 0]]


# --- alpha of every kind is composited onto the background ------------------------------------


def _half_transparent(mode: str) -> Image.Image:
    """Left half: opaque gray V; right half: fully transparent (colour 10)."""
    rgba = Image.new("RGBA", (8, 4), (10, 10, 10, 0))
    rgba.paste((V, V, V, 255), (0, 0, 4, 4))
    return rgba.convert(mode)


ALPHA = [
    ("PNG", "RGBA", {}),
    ("PNG", "LA", {}),
    ("TIFF", "RGBA", {}),
    ("TIFF", "LA", {}),
    ("WEBP", "RGBA", {"lossless": True}),
    ("GIF", "P", {"transparency": 0}),
]


@pytest.mark.parametrize(("fmt", "mode", "kw"), ALPHA, ids=[f"{f}-{m}" for f, m, _ in ALPHA])
def test_transparent_pixels_take_the_background(fmt: str, mode: str, kw: dict[str, int]) -> None:
    img = _half_transparent(mode)
    if fmt == "GIF":
        # A palette image whose index 0 is the transparent colour.
        img = Image.new("P", (8, 4), 0)
        img.putpalette([10, 10, 10, V, V, V] + [0] * 762)
        img.paste(1, (0, 0, 4, 4))
    data = encode(img, fmt, **kw)
    for background in (0, 255):
        gray = _gray(data, background)
        assert np.abs(gray[:, :4] - V).max() <= 1, (fmt, background)
        assert (gray[:, 4:] == background).all(), (fmt, background)


@pytest.mark.parametrize("mode", ["1", "L", "RGB"])
def test_png_colour_key_transparency(mode: str) -> None:
    # tRNS on a non-palette PNG: pixels of that exact value are transparent.
    key: int | tuple[int, int, int] = (7, 7, 7) if mode == "RGB" else (1 if mode == "1" else 7)
    img = Image.new(mode, (4, 2), key)
    img.paste(0 if mode != "RGB" else (0, 0, 0), (0, 0, 2, 2))
    data = encode(img, "PNG", transparency=key)
    for background in (0, 255):
        gray = _gray(data, background)
        assert (gray[:, :2] == 0).all()
        assert (gray[:, 2:] == background).all(), (mode, background, gray)


def test_palette_with_alpha_and_premultiplied_alpha() -> None:
    pa = _half_transparent("PA")
    rgba_a = Image.new("RGBa", (2, 1), (100, 100, 100, 128))  # premultiplied: straight ~199
    la = Image.new("La", (2, 1), (100, 128))
    for background, want in ((0, 100), (255, 227)):
        assert np.asarray(normalize_mode(rgba_a, "L", background)).tolist() == [[want] * 2]
        assert np.asarray(normalize_mode(la, "L", background)).tolist() == [[want] * 2]
        gray = np.asarray(normalize_mode(pa, "L", background))
        assert (gray[:, 4:] == background).all()


# --- EXIF orientation --------------------------------------------------------------------------

# How a viewer turns the stored pixels into the displayed image, per EXIF orientation (written
# with numpy from the EXIF spec, independently of Pillow's table).
DISPLAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP", "JPEG"])
@pytest.mark.parametrize("orientation", sorted(DISPLAY))
def test_exif_orientation(fmt: str, orientation: int) -> None:
    # 2x3 blocks of 8x8 pixels, each its own gray level: block positions survive JPEG.
    levels = np.array([[0, 50, 100], [150, 200, 250]], np.uint8)
    stored = np.kron(levels, np.ones((8, 8), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "WEBP":
        kw["lossless"] = True
    if fmt == "JPEG":
        kw["quality"] = 95
    data = encode(Image.fromarray(stored, "L"), fmt, **kw)
    gray = _gray(data)
    want = DISPLAY[orientation](stored)
    assert gray.shape == want.shape
    assert np.abs(gray - want).max() <= (8 if fmt == "JPEG" else 0)


# --- animations: the first frame ---------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kw"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animations_give_their_first_frame(fmt: str, kw: dict[str, object]) -> None:
    frames = [Image.new("L", (8, 8), v).convert("RGB") for v in (30, 140, 250)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert (_gray(data) == 30).all()


def test_first_frame_only_even_when_later_frames_are_cut_off() -> None:
    # Counting frames would walk (and trip over) the damaged tail; the first frame is all we use.
    frames = [Image.new("L", (32, 32), v) for v in (30, 140, 250)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)
    cut = data[: int(len(data) * 0.8)]
    assert (_gray(cut) == 30).all()


def test_a_seeked_image_is_rewound() -> None:
    frames = [Image.new("L", (4, 4), v) for v in (30, 140)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image = Image.open(io.BytesIO(data))
    image.seek(1)
    assert np.asarray(normalize_mode(image, "L")).max() == 30


# --- sizes refused from the header -------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [png_header_only, gif_header_only, jpeg_header_only, bmp_header_only, tiff_image],
    ids=["png", "gif", "jpeg", "bmp", "tiff"],
)
@pytest.mark.parametrize("side", [30_000, 65_000])
def test_huge_declared_sizes_are_refused_before_decoding(
    make: Callable[[int, int], bytes], side: int
) -> None:
    # The files are a few hundred bytes: decoding 65000^2 pixels would need gigabytes. The limit
    # is checked on the header; with a limit above Pillow's own bomb check, that one answers.
    data = make(side, side) if make is not tiff_image else tiff_image(side, side, data=b"\0" * 64)
    assert len(data) < 2000
    for max_pixels in (25_000_000, 10**10):
        with pytest.raises(PayloadTooLarge):
            decode_image(data, max_pixels=max_pixels, allowed_formats=ALLOWED)


def test_a_webp_canvas_beyond_any_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_image(webp_header_only(16_384, 16_384), max_pixels=25_000_000)


def test_the_100000_square_png() -> None:
    data = png_header_only(100_000, 100_000)
    with pytest.raises(PayloadTooLarge, match="25000000 pixels"):
        decode_image(data, max_pixels=25_000_000)
    # Below Pillow's own bomb threshold (89M pixels), our check names the declared size.
    with pytest.raises(PayloadTooLarge, match="6000x6000"):
        decode_image(png_header_only(6_000, 6_000), max_pixels=25_000_000)


# --- everything else is a 4xx -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICO", "SGI", "IM", "DDS", "SPIDER", "EPS"])
def test_formats_outside_the_list_are_415(fmt: str) -> None:
    data = encode(Image.new("L", (8, 8)), fmt)
    with pytest.raises(UnsupportedMediaType, match=fmt):
        decode_image(data, max_pixels=10_000, allowed_formats=ALLOWED)


# Layouts a TIFF can declare: some Pillow reads, some it refuses; none may escape as a 5xx.
ODD_TIFFS = {
    "float32-gray": {"bits": 32, "sample_format": 3},
    "float64-gray": {"bits": 64, "sample_format": 3},
    "int16-signed": {"bits": 16, "sample_format": 2},
    "int32-signed": {"bits": 32, "sample_format": 2},
    "12-bit": {"bits": 12},
    "4-bit": {"bits": 4},
    "float-rgb": {"samples": 3, "bits": 32, "sample_format": 3, "photometric": 2},
    "16-bit-rgb": {"samples": 3, "bits": 16, "photometric": 2},
    "16-bit-rgba": {"samples": 4, "bits": 16, "photometric": 2, "extra_samples": 2},
    "rgb-premultiplied": {"samples": 4, "photometric": 2, "extra_samples": 1},
    "gray-premultiplied": {"samples": 2, "extra_samples": 1},
    "two-samples-no-extra": {"samples": 2},
    "five-samples": {"samples": 5, "photometric": 2},
    "cmyk-16": {"samples": 4, "bits": 16, "photometric": 5},
    "lab": {"samples": 3, "photometric": 8},
    "ycbcr": {"samples": 3, "photometric": 6},
    "palette-no-map": {"photometric": 3},
    "unknown-photometric": {"photometric": 99},
    "undefined-format": {"sample_format": 4},
    "short-strip": {"data": b"\x01\x02"},
}


@pytest.mark.parametrize("name", sorted(ODD_TIFFS))
def test_odd_tiff_layouts_decode_or_4xx(name: str) -> None:
    data = tiff_image(6, 5, **ODD_TIFFS[name])  # type: ignore[arg-type]
    _decodes_or_4xx(data)


def _decodes_or_4xx(data: bytes) -> None:
    """The server's path for one image: a [1, 28, 28] finite tensor, or a 4xx domain error."""
    try:
        (decoded,) = decode_images([RawImage(data, "x")], PRESETS["fashion-mnist"], LIMITS)
    except NacguardError as exc:
        assert 400 <= exc.status < 500, exc
        assert isinstance(exc, BadImage | UnsupportedMediaType | PayloadTooLarge)
        return
    assert decoded.tensor.shape == (1, 28, 28)
    assert bool(decoded.tensor.isfinite().all())


def _seeds() -> list[bytes]:
    """Small valid files of every allowed format, including odd modes, to mutate."""
    img = Image.new("RGB", (12, 9), (40, 90, 200))
    img.paste((250, 10, 10), (3, 2, 9, 7))
    frames = [img, img.rotate(90)]
    return [
        encode(img, "PNG"),
        encode(img.convert("P"), "PNG", transparency=3),
        encode(_uniform("I;16"), "PNG"),
        encode(img, "JPEG", quality=80),
        encode(img.convert("CMYK"), "JPEG"),
        encode(img, "WEBP", lossless=True),
        encode(img, "GIF", save_all=True, append_images=frames[1:]),
        encode(img, "BMP"),
        encode(img.convert("RGBA"), "TIFF", compression="tiff_lzw"),
        encode(_uniform("F"), "TIFF"),
    ]


SEEDS = _seeds()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["set", "cut"])),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_files_decode_or_4xx(seed: bytes, edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(seed)
    for position, value, kind in edits:
        if not data:
            break
        at = position % len(data)
        if kind == "set":
            data[at] = value
        else:
            del data[at:]
    _decodes_or_4xx(bytes(data))
