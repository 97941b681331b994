"""Generated photo-like JPEGs for the ``photos`` workload: camera resolutions (3-12 MP), no
downloaded data, the same bytes on every run.

Each image is a smooth colour field (a coarse random grid upsampled bicubically, like sky,
walls and out-of-focus background), a few soft-edged shapes (objects with edges), and Gaussian
sensor noise, encoded at JPEG quality 90 with 4:2:0 chroma subsampling, as phone cameras do.
The noise matters for speed: a JPEG decoder's entropy decoding, which scaled decoding cannot
skip, grows with the detail left after quantisation; at these settings a 12 MP file is about
2 MB, the low end of a phone photo's size (more detail would make every decode slower).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["PHOTO_SIZES", "photo", "photo_jpegs"]

#: (width, height) cycled through by :func:`photo_jpegs`: 3.1, 5.0, 8.0 and 12.2 megapixels.
PHOTO_SIZES: tuple[tuple[int, int], ...] = ((2048, 1536), (2592, 1944), (3264, 2448), (4032, 3024))


def photo(width: int, height: int, seed: int, *, noise: float = 5.0) -> Image.Image:
    """One photo-like RGB image of ``width`` x ``height``, determined by ``seed``."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(grid, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    # Soften the shapes' edges a little (a lens is never perfectly sharp) at low cost.
    image = image.filter(ImageFilter.BoxBlur(1))
    # Sensor noise: a 509x509 tile of Gaussian noise (a prime side, so the repeats do not line
    # up with the 8x8 blocks) laid over the image; generating 36M normal samples per image
    # would cost more than the benchmark itself.
    tile = rng.normal(0.0, noise, (509, 509, 3)).astype(np.int16)
    reps = (-(-height // 509), -(-width // 509), 1)
    pixels = np.asarray(image, dtype=np.int16) + np.tile(tile, reps)[:height, :width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def photo_jpegs(
    count: int,
    *,
    sizes: Sequence[tuple[int, int]] = PHOTO_SIZES,
    seed: int = 0,
    quality: int = 90,
) -> list[bytes]:
    """``count`` distinct JPEG files, their sizes cycling through ``sizes``."""
    out = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        photo(w, h, seed * 100_003 + i).save(buf, format="JPEG", quality=quality, subsampling=2)
        out.append(buf.getvalue())
    return out
