"""Scaled decoding (``PreprocessSpec.decode``): which reduced scale a JPEG is decoded at, that
profile building and serving preprocess the same bytes to the same tensor, and that the pixel
limit still refuses an oversized image before any pixel is decoded."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from nacguard.errors import PayloadTooLarge
from nacguard.imaging.decode import InputLimits, RawImage, decode_images
from nacguard.imaging.preprocess import PRESETS, PreprocessSpec, decode_image
from nacguard.offline.build import batches
from nacguard.offline.datasets import load_source

IMAGENET = PRESETS["imagenet"]
LIMITS = InputLimits(
    max_body_bytes=1 << 26,
    max_images=64,
    max_image_bytes=1 << 25,
    max_pixels=25_000_000,
    allowed_formats=("JPEG", "PNG", "WEBP"),
)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus a little noise: varied content that JPEG keeps."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 64, 2), max(w // 64, 2), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BILINEAR))
    noisy = base.astype(np.int16) + rng.integers(-8, 9, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _raw(data: bytes) -> RawImage:
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def _rotated(w: int, h: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(_photo(w, h), exif=exif.tobytes())


# --- which scale ------------------------------------------------------------------------------

TALL = PreprocessSpec(size=(224, 112), resize=None)  # h=224, w=112: orientation matters


@pytest.mark.parametrize(
    ("size", "spec", "decoded"),
    [
        ((4032, 3024), IMAGENET, (504, 378)),  # 12 MP into 256 then 224: 1/8
        ((1000, 750), IMAGENET, (500, 375)),  # 1000 // 341 = 2: 1/2
        ((700, 500), IMAGENET, (700, 500)),  # 1/2 would be smaller than 358x256: full
        ((300, 200), IMAGENET, (300, 200)),  # smaller than the target: full
        ((400, 300), PRESETS["fashion-mnist"], (50, 38)),  # direct resize to 28x28: 1/8, rounded up
        ((1200, 240), TALL, (1200, 240)),  # min(1200 // 112, 240 // 224) = 1: full
        ((4032, 3024), PreprocessSpec(decode="full"), (4032, 3024)),  # full mode never scales
    ],
)
def test_jpeg_decodes_at_the_largest_scale_covering_the_target(
    size: tuple[int, int], spec: PreprocessSpec, decoded: tuple[int, int]
) -> None:
    data = _encode(Image.new("RGB", size, (90, 120, 150)))
    image = decode_image(data, max_pixels=LIMITS.max_pixels, spec=spec)
    assert image.size == decoded
    tw, th = spec.resized_size(*size)
    if size[0] >= tw and size[1] >= th:
        assert image.width >= tw and image.height >= th  # still covers what the resize needs
    assert spec(image).shape == (spec.channels, *spec.size)


def test_the_target_is_taken_in_the_exif_oriented_frame() -> None:
    # Stored 4000x1000, orientation 6 (rotate 90): the model sees 1000 wide, 4000 high. Into a
    # 112-wide, 224-high input the stored frame needs 224x112: min(4000 // 224, 1000 // 112) = 8.
    # Reading the target unrotated (112x224 on the stored frame) would pick 1/4.
    image = decode_image(_rotated(4000, 1000, 6), max_pixels=LIMITS.max_pixels, spec=TALL)
    assert image.size == (500, 125)
    assert TALL(image).shape == (3, 224, 112)
    upright = decode_image(_rotated(4000, 1000, 1), max_pixels=LIMITS.max_pixels, spec=TALL)
    assert upright.size == (1000, 250)  # min(4000 // 112, 1000 // 224) = 4


def test_scaled_is_close_to_full_but_not_the_same() -> None:
    data = _encode(_photo(2400, 1800, seed=3), quality=90)
    scaled = decode_images([_raw(data)], IMAGENET, LIMITS)[0].tensor
    full = decode_images([_raw(data)], PreprocessSpec(decode="full"), LIMITS)[0].tensor
    assert float(full.std()) > 0.1  # the content varies, so agreement below means something
    assert not torch.equal(scaled, full)
    level = 1.0 / 255.0 / min(IMAGENET.std)
    assert float((scaled - full).abs().mean()) < 2 * level


# --- the record in the bundle -----------------------------------------------------------------


def test_decode_mode_round_trips_and_old_records_mean_full() -> None:
    assert PreprocessSpec().decode == "scaled"
    assert PreprocessSpec.from_dict(IMAGENET.to_dict()).decode == "scaled"
    old = IMAGENET.to_dict()
    del old["decode"]  # a bundle.json written before the field existed
    assert PreprocessSpec.from_dict(old).decode == "full"
    with pytest.raises(ValueError, match="decode mode"):
        PreprocessSpec(decode="fast")


# --- build time equals serve time -------------------------------------------------------------


@pytest.mark.parametrize("decode", ["scaled", "full"])
def test_build_and_serve_preprocess_the_same_bytes_identically(tmp_path: Path, decode: str) -> None:
    spec = PreprocessSpec(decode=decode)
    files = {
        "a.jpg": _encode(_photo(1600, 1200, seed=1), quality=90),
        "b.jpg": _rotated(1200, 900, 8),
        "c.png": _encode(_photo(900, 600, seed=2), "PNG"),
        "d.webp": _encode(_photo(1000, 800, seed=4), "WEBP", quality=90),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    source = load_source(str(tmp_path))
    assert len(source) == len(files)
    built = torch.cat(list(batches(source.images, spec, batch_size=3)))
    served = torch.stack(
        [d.tensor for d in decode_images([_raw(b) for b in files.values()], spec, LIMITS)]
    )
    assert built.shape == (4, 3, 224, 224)
    assert all(float(t.std()) > 0.1 for t in built)  # real content in every image
    assert torch.equal(built, served)


# --- the pixel limit still comes first --------------------------------------------------------


def test_pixel_limit_refuses_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A complete, valid, highly compressible JPEG of 2400x2000 pixels (a few KB) against a
    # 4-megapixel limit: refused from the header, before the decoder runs (no load() at all).
    bomb = _encode(Image.new("RGB", (2400, 2000), (128, 128, 128)), quality=50)
    assert len(bomb) < 100_000
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    limits = InputLimits(**{**LIMITS.__dict__, "max_pixels": 4_000_000})
    with pytest.raises(PayloadTooLarge, match="2400x2000"):
        decode_images([_raw(bomb)], IMAGENET, limits)
    assert loads == []
    assert decode_images([_raw(bomb)], IMAGENET, LIMITS)[0].tensor.shape == (3, 224, 224)
    assert loads  # the counter does see a decode
