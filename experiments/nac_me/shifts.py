"""Covariate-shifted copies of the Fashion-MNIST test split (labels unchanged).

Each shift maps ``N x 28 x 28`` uint8 images to images of the same shape with a seeded NumPy
generator, so the sets are identical on every run. Severities are moderate on purpose: the
classes stay recognisable, and accuracies fall far enough for checkpoints to differ.

``rotate``
    Rotation by a random angle of 20..45 degrees, random direction (bilinear, black fill).
``noise``
    Additive Gaussian pixel noise, standard deviation 0.2 on a 0..1 scale, clipped.
``blur``
    Gaussian blur of radius 1.5 pixels.
``contrast``
    Contrast reduced to 35%: ``0.35 x`` (the black background stays black). A first version
    that also lifted the background to gray (``80 + 0.3 x``) put every checkpoint at chance level
    (10%), which cannot rank anything; it was replaced on that ground alone.
``occlusion``
    A random 12 x 12 patch (of the central 20 x 20 region) set to mid-gray 128.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from nacguard.offline.datasets import FASHION_MNIST_CLASSES

__all__ = ["SHIFTS", "class_folder_names", "make_shift", "write_folder"]

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angles = rng.uniform(20.0, 45.0, len(images)) * rng.choice([-1.0, 1.0], len(images))
    out = np.empty_like(images)
    for i, (img, angle) in enumerate(zip(images, angles, strict=True)):
        rotated = Image.fromarray(img, "L").rotate(
            float(angle), resample=Image.Resampling.BILINEAR, fillcolor=0
        )
        out[i] = np.asarray(rotated)
    return out


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float64) + rng.normal(0.0, 0.2 * 255.0, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    blur = ImageFilter.GaussianBlur(radius=1.5)
    return np.stack([np.asarray(Image.fromarray(img, "L").filter(blur)) for img in images])


def _contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    del rng  # deterministic
    return np.rint(0.35 * images.astype(np.float64)).astype(np.uint8)


def _occlusion(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    size = 12
    tops = rng.integers(4, 24 - size + 1, len(images))
    lefts = rng.integers(4, 24 - size + 1, len(images))
    for i, (t, left) in enumerate(zip(tops, lefts, strict=True)):
        out[i, t : t + size, left : left + size] = 128
    return out


#: Shift name -> function, in table order.
SHIFTS: dict[str, Shift] = {
    "rotate": _rotate,
    "noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "occlusion": _occlusion,
}


def make_shift(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Apply shift ``name`` to ``images`` (uint8, N x 28 x 28) with a generator seeded by ``seed``.

    Raises:
        ValueError: unknown shift.
    """
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose from {list(SHIFTS)}")
    # One stream per shift, so adding a shift never changes the others.
    rng = np.random.default_rng([seed, list(SHIFTS).index(name)])
    out = SHIFTS[name](images, rng)
    assert out.shape == images.shape and out.dtype == np.uint8
    return out


def class_folder_names() -> list[str]:
    """Sub-folder names whose sorted order is the label order (``0_t-shirt-top`` ...)."""
    return [
        f"{i}_{name.lower().replace('/', '-').replace(' ', '-')}"
        for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]


def write_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """Write ``root/<label folder>/<index>.png`` (a folder source nacguard reads with labels)."""
    folders = class_folder_names()
    assert folders == sorted(folders), "label order must survive the folder sort"
    for name in folders:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img, "L").save(root / folders[int(label)] / f"{i:05d}.png")
