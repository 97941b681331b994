"""Synthetic out-of-distribution *validation* data for tuning NAC hyperparameters, so that
tuning never touches an OOD test set (see docs/design/nac-method.md, section 5).

Deterministic for a given (kind, n, seed, size); grayscale 'L' images of size x size. Spec
``synthetic:KIND`` with optional query ``?n=1000&seed=0&size=28``
(:func:`nacguard.offline.datasets.load_source`). Kinds:

``gaussian``
    Per-pixel Gaussian noise; each image draws its own mean (0.2..0.8) and standard deviation
    (0.05..0.35) on a 0..1 scale, clipped.
``uniform``
    Per-pixel uniform noise over a random sub-range [lo, hi] of 0..255 per image.
``shapes``
    1..4 random circles/ellipses, rectangles, triangles and lines, filled or outlined, bright
    on a dark background, drawn with ``PIL.ImageDraw``.
``checkerboard``
    A rotated checkerboard with random cell period (3..12 px at 28 px), phase and angle, and
    random dark/bright levels.
``stripes``
    A rotated square- or sine-wave grating with random period, phase, angle and contrast.
``glyphs``
    One or two random characters (digits, letters, symbols) drawn with Pillow's built-in
    font, bright strokes on dark, random size, stroke width, slant and offset: digit- and
    letter-like shapes, the closest of these kinds to handwriting data sets.
``blobs``
    Gaussian-blurred noise (random blur radius), contrast-stretched to a random range: soft
    low-frequency shapes.
``fmnist-train-inverted``, ``fmnist-train-vflip``, ``fmnist-train-rot90``
    Seeded picks of Fashion-MNIST *train* images, inverted (255 - x), flipped upside down,
    or rotated by 90 degrees (alternating clockwise / counter-clockwise). Near-OOD: same
    pixel statistics, wrong semantics. Only the train split is ever used: the test split is
    reserved for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SYNTHETIC_KINDS", "synthetic_images"]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _gaussian(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    mean = rng.uniform(0.2, 0.8, size=(n, 1, 1))
    std = rng.uniform(0.05, 0.35, size=(n, 1, 1))
    return _to_uint8(mean + std * rng.standard_normal((n, size, size)))


def _uniform(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    ends = np.sort(rng.uniform(0.0, 1.0, size=(n, 2, 1, 1)), axis=1)
    lo, hi = ends[:, 0], ends[:, 1]
    return _to_uint8(lo + (hi - lo) * rng.uniform(0.0, 1.0, size=(n, size, size)))


def _grid(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    # Per-image rotated coordinates u, v (in pixels), each N x size x size.
    angle = rng.uniform(0.0, np.pi, size=(n, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    return c * xx + s * yy, -s * xx + c * yy


def _levels(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    dark = rng.uniform(0.0, 0.35, size=(n, 1, 1))
    bright = rng.uniform(0.55, 1.0, size=(n, 1, 1))
    return dark, bright


def _checkerboard(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    u, v = _grid(rng, n, size)
    period = rng.uniform(3.0, 12.0, size=(n, 1, 1)) * size / 28.0
    phase = rng.uniform(0.0, 1.0, size=(n, 2, 1, 1))
    cells = np.floor(u / period + phase[:, 0]) + np.floor(v / period + phase[:, 1])
    dark, bright = _levels(rng, n)
    return _to_uint8(np.where(cells % 2 == 0, bright, dark))


def _stripes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    u, _ = _grid(rng, n, size)
    period = rng.uniform(2.5, 14.0, size=(n, 1, 1)) * size / 28.0
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1, 1))
    wave = np.sin(2 * np.pi * u / period + phase)
    square = rng.uniform(size=(n, 1, 1)) < 0.5
    wave = np.where(square, np.sign(wave), wave)
    dark, bright = _levels(rng, n)
    return _to_uint8(dark + (bright - dark) * (wave + 1.0) / 2.0)


def _blobs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        noise = Image.fromarray(rng.integers(0, 256, size=(size, size), dtype=np.uint8), "L")
        radius = float(rng.uniform(1.5, 4.0)) * size / 28.0
        smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
        lo, hi = smooth.min(), smooth.max()
        unit = (smooth - lo) / (hi - lo) if hi > lo else np.zeros_like(smooth)
        dark, bright = rng.uniform(0.0, 0.3), rng.uniform(0.6, 1.0)
        out[i] = _to_uint8(dark + (bright - dark) * unit)
    return out


def _shapes(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        image = Image.new("L", (size, size), color=int(rng.integers(0, 40)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            kind = int(rng.integers(0, 4))
            fill = int(rng.integers(120, 256))
            filled = bool(rng.integers(0, 2))
            width = max(1, int(rng.integers(1, 4) * size / 28))
            pts = rng.uniform(0, size - 1, size=(3, 2))
            box = (
                float(min(pts[0, 0], pts[1, 0])),
                float(min(pts[0, 1], pts[1, 1])),
                float(max(pts[0, 0], pts[1, 0])) + 2,
                float(max(pts[0, 1], pts[1, 1])) + 2,
            )
            if kind == 0:
                if filled:
                    draw.ellipse(box, fill=fill)
                else:
                    draw.ellipse(box, outline=fill, width=width)
            elif kind == 1:
                if filled:
                    draw.rectangle(box, fill=fill)
                else:
                    draw.rectangle(box, outline=fill, width=width)
            elif kind == 2:
                triangle = [(float(x), float(y)) for x, y in pts]
                if filled:
                    draw.polygon(triangle, fill=fill)
                else:
                    draw.polygon(triangle, outline=fill, width=width)
            else:
                draw.line([tuple(pts[0]), tuple(pts[1])], fill=fill, width=width)
        out[i] = np.asarray(image, dtype=np.uint8)
    return out


_GLYPHS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt@#%&?"


def _glyphs(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """1-2 random characters (digits, letters, symbols), bright strokes on a dark background,
    random size, stroke width, position and slant: digit- and letter-like near-OOD images."""
    from PIL import ImageFont

    out = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        big = Image.new("L", (2 * size, 2 * size), 0)
        draw = ImageDraw.Draw(big)
        count = 1 if rng.random() < 0.75 else 2
        font = ImageFont.load_default(size=float(rng.uniform(0.9, 1.4) * size / count))
        text = "".join(_GLYPHS[int(rng.integers(len(_GLYPHS)))] for _ in range(count))
        draw.text(
            (size, size),
            text,
            fill=int(rng.integers(180, 256)),
            font=font,
            anchor="mm",
            stroke_width=int(rng.integers(1, 4)),
            stroke_fill=int(rng.integers(150, 256)),
        )
        big = big.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR)
        dx, dy = (int(v) for v in rng.integers(-size // 8, size // 8 + 1, size=2))
        crop = big.crop(
            (size // 2 + dx, size // 2 + dy, size // 2 + dx + size, size // 2 + dy + size)
        )
        out[i] = np.asarray(crop, dtype=np.uint8)
    return out


def _fmnist_train_variant(
    transform: Callable[[np.ndarray], np.ndarray],
) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    def make(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
        from nacguard.offline.datasets import load_fashion_mnist  # the sources import this module

        images, _ = load_fashion_mnist("train")
        if n > images.shape[0]:
            raise ValueError(f"at most {images.shape[0]} Fashion-MNIST train variants, got n={n}")
        picked = transform(images[np.sort(rng.choice(images.shape[0], size=n, replace=False))])
        if size != 28:
            resized = np.zeros((n, size, size), dtype=np.uint8)
            for i, image in enumerate(picked):
                small = Image.fromarray(image, "L").resize((size, size), Image.Resampling.BILINEAR)
                resized[i] = np.asarray(small)
            picked = resized
        return np.ascontiguousarray(picked, dtype=np.uint8)

    return make


def _rot90_alternating(images: np.ndarray) -> np.ndarray:
    out = np.rot90(images, k=1, axes=(1, 2)).copy()
    out[1::2] = np.rot90(images[1::2], k=-1, axes=(1, 2))
    return out


_SYNTHETIC: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gaussian": _gaussian,
    "uniform": _uniform,
    "shapes": _shapes,
    "checkerboard": _checkerboard,
    "stripes": _stripes,
    "blobs": _blobs,
    "glyphs": _glyphs,
    "fmnist-train-inverted": _fmnist_train_variant(lambda x: 255 - x),
    "fmnist-train-vflip": _fmnist_train_variant(lambda x: x[:, ::-1, :]),
    "fmnist-train-rot90": _fmnist_train_variant(_rot90_alternating),
}
SYNTHETIC_KINDS: tuple[str, ...] = tuple(_SYNTHETIC)


def synthetic_images(kind: str, n: int = 1000, seed: int = 0, size: int = 28) -> np.ndarray:
    """Generate synthetic OOD validation images (see the module docstring for the kinds).

    Args:
        kind: One of :data:`SYNTHETIC_KINDS`.
        n: Number of images.
        seed: Seed; equal arguments give equal images.
        size: Side length in pixels.

    Returns:
        ``n x size x size`` uint8 array.

    Raises:
        ValueError: On an unknown kind or invalid sizes.
    """
    if kind not in _SYNTHETIC:
        raise ValueError(
            f"unknown synthetic kind {kind!r}; valid kinds: {', '.join(SYNTHETIC_KINDS)}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 4 <= size <= 1024:
        raise ValueError(f"size must be in 4..1024, got {size}")
    # Mix the kind into the seed so that e.g. gaussian and uniform with seed 0 are independent.
    rng = np.random.default_rng([seed, *kind.encode()])
    return _SYNTHETIC[kind](rng, n, size)
