"""GPU JPEG decoding and on-device tensor preprocessing (:mod:`nacguard.imaging.gpu_jpeg`):
header parsing, the CPU (libjpeg-turbo) batch path and its fallbacks, the tensor path against
the PIL path. The nvjpeg test is marked ``gpu`` and skipped without a device."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nacguard.imaging.gpu_jpeg import (
    decode_jpeg_batch,
    is_jpeg,
    jpeg_info,
    preprocess_tensor,
    preprocess_tensors,
)
from nacguard.imaging.preprocess import PRESETS, PreprocessSpec, decode_image

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth random content (JPEG-friendly, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return image.convert(mode)


def _pil_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def test_jpeg_headers_are_read() -> None:
    data = _encode(_photo(40, 30))
    assert is_jpeg(data) and not is_jpeg(_encode(_photo(4, 4), "PNG"))
    info = jpeg_info(data)
    assert info is not None
    assert (info.width, info.height, info.components, info.orientation) == (40, 30, 3, 1)
    assert info.baseline
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = jpeg_info(_encode(_photo(40, 30), exif=exif.tobytes()))
    assert rotated is not None and rotated.orientation == 6
    progressive = jpeg_info(_encode(_photo(40, 30), progressive=True))
    assert progressive is not None and not progressive.baseline
    assert jpeg_info(b"\xff\xd8\xff\xe0\x00") is None
    assert jpeg_info(b"not a jpeg") is None


def test_cpu_jpeg_batch_decodes_and_leaves_the_rest_to_pil() -> None:
    rgb = _encode(_photo(48, 32, seed=1))
    gray = _encode(_photo(20, 24, seed=2, mode="L"))
    exif = Image.Exif()
    exif[0x0112] = 3
    upside_down = _encode(_photo(16, 16, seed=3), exif=exif.tobytes())
    cmyk = _encode(_photo(16, 16, seed=4).convert("CMYK"))
    datas = [
        rgb,
        _encode(_photo(8, 8), "PNG"),
        gray,
        rgb[: len(rgb) // 3],  # truncated
        upside_down,
        cmyk,
        _encode(_photo(64, 64, seed=5), progressive=True),
        _encode(_photo(300, 300, seed=6)),
    ]
    out = decode_jpeg_batch(datas, "cpu", mode="RGB", max_pixels=200 * 200)
    assert [t is not None for t in out] == [True, False, True, False, False, False, False, False]
    assert out[0] is not None and out[2] is not None
    assert out[0].shape == (3, 32, 48) and out[0].dtype == torch.uint8
    assert out[2].shape == (3, 24, 20)  # grayscale expanded to RGB
    # libjpeg-turbo via torchvision vs via Pillow: the same decoder family, within a level or two.
    pil = _pil_tensor(Image.open(io.BytesIO(rgb)).convert("RGB"))
    assert (out[0].int() - pil.int()).abs().max() <= 2
    gray_out = decode_jpeg_batch([gray, rgb], "cpu", mode="L")
    assert [t.shape[0] if t is not None else None for t in gray_out] == [1, 1]
    assert decode_jpeg_batch([], "cpu") == []


def test_truncated_file_does_not_fail_its_batch_mates() -> None:
    good = [_encode(_photo(24, 24, seed=s)) for s in range(3)]
    broken = good[1][:-200]
    out = decode_jpeg_batch([good[0], broken, good[2]], "cpu")
    assert out[0] is not None and out[2] is not None
    assert out[1] is None or out[1].shape == (3, 24, 24)  # libjpeg may pad a short scan


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        (PRESETS["fashion-mnist"], (28, 28)),  # 1-channel, no resize
        (PreprocessSpec(size=(32, 32), resize=None), (32, 32)),  # RGB, no resize
        (PreprocessSpec(size=(28, 28), resize=32), (40, 32)),  # shorter side 32: crop only
    ],
)
def test_tensor_path_equals_pil_path_without_resizing(
    spec: PreprocessSpec, size: tuple[int, int]
) -> None:
    images = [_photo(*size, seed=s, mode=spec.mode) for s in range(3)]
    expected = spec.batch(images)
    got = preprocess_tensors([_pil_tensor(im) for im in images], spec)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_tensor_path_converts_rgb_to_luma_like_pillow() -> None:
    image = _photo(28, 28, seed=9)
    spec = PRESETS["fashion-mnist"]
    assert torch.equal(preprocess_tensor(_pil_tensor(image), spec), spec(image))


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        (PreprocessSpec(), (500, 375)),  # ImageNet recipe: shrink then center crop
        (PreprocessSpec(size=(64, 64), resize=None), (90, 50)),  # direct resize, aspect change
        (PreprocessSpec(size=(64, 64), resize=72), (40, 30)),  # enlarging
        (PRESETS["fashion-mnist"], (56, 56)),
    ],
)
def test_tensor_path_resizes_close_to_pil(spec: PreprocessSpec, size: tuple[int, int]) -> None:
    images = [_photo(*size, seed=s, mode=spec.mode) for s in range(2)]
    expected = spec.batch(images)
    got = preprocess_tensors([_pil_tensor(im) for im in images], spec)
    assert got.shape == expected.shape
    level = 1.0 / 255.0 / min(spec.std)  # one grey level in normalised units
    diff = (got - expected).abs()
    assert float(diff.max()) <= 3 * level + 1e-6
    assert float(diff.mean()) <= 0.5 * level


def test_decoded_jpegs_preprocess_like_the_cpu_pipeline() -> None:
    spec = PreprocessSpec()
    datas = [_encode(_photo(320, 240, seed=s), quality=95) for s in range(3)]
    decoded = decode_jpeg_batch(datas, "cpu")
    assert all(t is not None for t in decoded)
    got = preprocess_tensors([t for t in decoded if t is not None], spec)
    expected = spec.batch([decode_image(d, max_pixels=10**7) for d in datas])
    level = 1.0 / 255.0 / min(spec.std)
    assert float((got - expected).abs().mean()) <= 0.5 * level


@pytest.mark.gpu
@cuda
def test_nvjpeg_batch_matches_cpu_decode() -> None:
    datas = [_encode(_photo(500, 375, seed=s)) for s in range(4)] + [_encode(_photo(8, 8), "PNG")]
    on_gpu = decode_jpeg_batch(datas, "cuda")
    on_cpu = decode_jpeg_batch(datas, "cpu")
    assert on_gpu[-1] is None
    for g, c in zip(on_gpu[:-1], on_cpu[:-1], strict=True):
        assert g is not None and c is not None and g.is_cuda
        # nvjpeg and libjpeg-turbo differ in IDCT and chroma upsampling details.
        assert (g.cpu().int() - c.int()).abs().float().mean() < 3.0
    spec = PreprocessSpec()
    x = preprocess_tensors([t for t in on_gpu if t is not None], spec)
    assert x.is_cuda and x.shape == (4, 3, 224, 224)
