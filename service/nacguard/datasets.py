"""Image sources for building, tuning and evaluating profiles.

:func:`load_source` turns a short spec string into an :class:`ImageSource` (a sequence of PIL
images, optional integer labels and class names). Specs:

``fashion-mnist:train`` / ``fashion-mnist:test`` (and ``train-fit`` / ``train-holdout``, the demo's
split of the train split, see :func:`fashion_mnist_holdout_split`)
    The gzip idx files of the Debian package ``dataset-fashion-mnist``, read from
    ``/usr/share/datasets/fashion-mnist`` (override the folder with the environment variable
    ``NACGUARD_FASHION_MNIST_DIR``). Magic numbers and sizes are validated. 28x28 'L' images,
    labels 0..9, the ten Fashion-MNIST class names. :func:`load_fashion_mnist` is the fast path
    (plain uint8 arrays) used for training.

a folder path
    With class sub-folders (``root/<class>/**/<image>``): labels from the sorted sub-folder names,
    like torchvision's ``ImageFolder``. Without sub-folders: the images directly in the folder,
    no labels. Extensions png, jpg, jpeg, webp, bmp, gif, tif, tiff (any case). Images are opened
    lazily, one per ``source.images[i]``, in their stored mode.

``synthetic:KIND`` with optional query ``?n=1000&seed=0&size=28``
    Generated out-of-distribution *validation* data for tuning NAC hyperparameters, so that tuning
    never touches an OOD test set (see docs/design/nac-method.md, section 5). Deterministic for a
    given (kind, n, seed, size); grayscale 'L' images of size x size, no labels. Kinds:

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

``limit`` takes a seeded subset: class-balanced (:func:`class_balanced_indices`) when the source
has labels, uniform otherwise. Sub-sets keep the source's order.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload
from urllib.parse import parse_qs

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_HOLDOUT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_KINDS",
    "ArrayImages",
    "ImageSource",
    "PathImages",
    "class_balanced_indices",
    "fashion_mnist_dir",
    "fashion_mnist_holdout_split",
    "is_image_file",
    "load_fashion_mnist",
    "load_source",
    "read_idx",
    "synthetic_images",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Pixel mean and standard deviation of the whole Fashion-MNIST train split on a 0..1 scale.
#: The demo model records the values of its own fitting subset in training.json (0.2863 /
#: 0.3532); a bundle must take its normalisation from there, not from these constants.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_DIR_ENV = "NACGUARD_FASHION_MNIST_DIR"
_DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

# idx type codes (third byte of the magic number) -> numpy dtype; big-endian per the format.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


# --------------------------------------------------------------------------------------------
# Image containers
# --------------------------------------------------------------------------------------------


class ArrayImages(Sequence[Image.Image]):
    """A sequence of 'L' PIL images backed by a ``N x H x W`` uint8 array (made on access).

    Args:
        array: Image pixels, ``N x H x W``, uint8.
    """

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected an N x H x W uint8 array, got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> ArrayImages: ...
    def __getitem__(self, index: int | slice) -> Image.Image | ArrayImages:
        if isinstance(index, slice):
            return ArrayImages(self.array[index])
        return Image.fromarray(self.array[index], mode="L")

    def take(self, indices: np.ndarray) -> ArrayImages:
        """The images at ``indices``, as a new sequence."""
        return ArrayImages(self.array[np.asarray(indices, dtype=np.int64)])


class PathImages(Sequence[Image.Image]):
    """A sequence of images stored as files, each decoded when it is accessed.

    Args:
        paths: Image files.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> PathImages: ...
    def __getitem__(self, index: int | slice) -> Image.Image | PathImages:
        if isinstance(index, slice):
            return PathImages(self.paths[index])
        path = self.paths[index]
        # Decode inside the context manager so the file handle is closed before returning
        # (a lazily-loaded PIL image would keep it open).
        with Image.open(path) as image:
            image.load()
            return image.copy()

    def take(self, indices: np.ndarray) -> PathImages:
        """The images at ``indices``, as a new sequence."""
        return PathImages([self.paths[int(i)] for i in indices])


def _take(images: Sequence[Image.Image], indices: np.ndarray) -> Sequence[Image.Image]:
    if isinstance(images, ArrayImages | PathImages):
        return images.take(indices)
    return [images[int(i)] for i in indices]


@dataclass
class ImageSource:
    """A named collection of images with optional labels.

    Attributes:
        images: The images: a plain list, or a sequence (:class:`ArrayImages`,
            :class:`PathImages`) whose items are decoded on access.
        labels: int64 class indices, one per image (-1 for an unknown label), or None when the
            source has no labels at all.
        classes: Class names indexed by label, or None.
        name: The spec the source was loaded from (plus any subset note).
    """

    images: Sequence[Image.Image]
    labels: np.ndarray | None
    classes: list[str] | None
    name: str

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self.images)):
            yield self.images[i]

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSource:
        """The images (and labels) at ``indices``.

        Args:
            indices: Integer positions into this source.
            name: Name of the result; defaults to this source's name.

        Returns:
            A new source sharing this one's classes.
        """
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSource(
            images=_take(self.images, indices),
            labels=None if self.labels is None else self.labels[indices],
            classes=self.classes,
            name=self.name if name is None else name,
        )


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def class_balanced_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Pick ``n`` positions with as equal a count per class as the data allows.

    Every class present (labels < 0 are ignored) gets ``n // C`` samples; the remainder goes to
    classes in a seeded order; a class with too few samples gives all it has and its shortfall
    is shared among the others. Within a class the samples are a seeded draw without
    replacement.

    Args:
        labels: Integer labels, one per sample.
        n: Number of positions to return.
        seed: Seed of the draw; the same (labels, n, seed) always gives the same result.

    Returns:
        Sorted int64 positions into ``labels``, ``n`` of them, without repeats.

    Raises:
        ValueError: If ``n`` is negative or larger than the number of labelled samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    valid = np.flatnonzero(labels >= 0)
    if n < 0 or n > valid.size:
        raise ValueError(f"cannot pick {n} of {valid.size} labelled samples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[valid], return_counts=True)
    quota = np.zeros_like(counts)
    remaining = n
    # Water-filling: each round either saturates a class or leaves fewer than len(active)
    # samples, so it ends within len(classes) + 1 rounds.
    for _ in range(len(classes) + 1):
        if remaining == 0:
            break
        active = np.flatnonzero(counts > quota)
        share = remaining // active.size
        if share == 0:
            lucky = rng.permutation(active)[:remaining]
            quota[lucky] += 1
            remaining = 0
            break
        give = np.minimum(share, counts[active] - quota[active])
        quota[active] += give
        remaining -= int(give.sum())
    picked = []
    for cls, k in zip(classes, quota, strict=True):
        if k:
            members = valid[labels[valid] == cls]
            picked.append(rng.choice(members, size=int(k), replace=False))
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _limit(source: ImageSource, limit: int | None, seed: int) -> ImageSource:
    if limit is None or limit >= len(source):
        return source
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if source.labels is not None and int((source.labels >= 0).sum()) >= limit:
        indices = class_balanced_indices(source.labels, limit, seed)
    else:
        indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
    return source.subset(indices, name=f"{source.name}[limit={limit},seed={seed}]")


# --------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not.

    Args:
        path: The file; gzip is detected from its first bytes, not its name.
        expected_ndim: If given, the number of dimensions the header must declare.

    Returns:
        The array in native byte order, with the shape the header declares.

    Raises:
        ValueError: On a bad magic number, unexpected dimensions, or a size mismatch.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex() or 'missing'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: idx file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(shape)
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: idx header declares shape {shape} ({count * dtype.itemsize} bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def fashion_mnist_dir() -> Path:
    """The folder with the Fashion-MNIST idx files (env ``NACGUARD_FASHION_MNIST_DIR`` wins)."""
    override = os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(override) if override else _DEFAULT_FASHION_MNIST_DIR


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one Fashion-MNIST split as arrays.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: Folder with the four ``*-ubyte.gz`` files; default :func:`fashion_mnist_dir`.

    Returns:
        ``(images, labels)``: ``N x 28 x 28`` uint8 and ``N`` int64 in 0..9.

    Raises:
        ValueError: On an unknown split or malformed files.
        FileNotFoundError: If the files are missing (install the Debian package
            ``dataset-fashion-mnist`` or set ``NACGUARD_FASHION_MNIST_DIR``).
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    image_file, label_file, expected = _FMNIST_FILES[split]
    for name in (image_file, label_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {folder / name} not found: install the Debian package "
                f"dataset-fashion-mnist or set {FASHION_MNIST_DIR_ENV}"
            )
    images = read_idx(folder / image_file, expected_ndim=3)
    labels = read_idx(folder / label_file, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"{folder}: Fashion-MNIST idx files must hold unsigned bytes")
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: {split} images {images.shape} do not match labels {labels.shape}"
        )
    if images.shape[0] != expected:
        # Not fatal: a trimmed copy is handy for tests; the count is logged so it is noticed.
        logger.warning(
            "Fashion-MNIST %s split has %d images, expected %d", split, images.shape[0], expected
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{folder}: Fashion-MNIST label {int(labels.max())} out of range")
    return images, labels.astype(np.int64)


#: Size of the demo model's held-out validation part of the train split (see
#: :func:`fashion_mnist_holdout_split`).
FASHION_MNIST_HOLDOUT = 5000


def fashion_mnist_holdout_split(
    n: int = 60_000, seed: int = 0, holdout: int = FASHION_MNIST_HOLDOUT
) -> tuple[np.ndarray, np.ndarray]:
    """The demo's split of the train split: (fit indices, held-out indices), both sorted.

    A seeded permutation's last ``holdout`` positions are held out. The demo model is trained on
    the fit part only; its profile is calibrated and its NAC settings are tuned on the held-out
    part, so neither ever touches the test split.
    """
    if not 0 < holdout < n:
        raise ValueError(f"cannot hold out {holdout} of {n} images")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:-holdout]), np.sort(perm[-holdout:])


def _fashion_mnist_source(split: str) -> ImageSource:
    base = {"train-fit": "train", "train-holdout": "train"}.get(split, split)
    if base not in _FMNIST_FILES:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r} in 'fashion-mnist:{split}'; use "
            "fashion-mnist:train, fashion-mnist:test, fashion-mnist:train-fit or "
            "fashion-mnist:train-holdout"
        )
    images, labels = load_fashion_mnist(base)  # type: ignore[arg-type]
    if base != split:
        fit, held = fashion_mnist_holdout_split(images.shape[0])
        keep = fit if split == "train-fit" else held
        images, labels = images[keep], labels[keep]
    return ImageSource(
        images=ArrayImages(np.ascontiguousarray(images)),
        labels=labels,
        classes=list(FASHION_MNIST_CLASSES),
        name=f"fashion-mnist:{split}",
    )


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a regular, non-hidden file with an image extension (any case)."""
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _folder_source(root: Path, spec: str) -> ImageSource:
    if not root.exists():
        raise ValueError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: sorted(p for p in d.rglob("*") if is_image_file(p)) for d in subdirs}
    per_class = {name: paths for name, paths in per_class.items() if paths}
    top_level = sorted(p for p in root.iterdir() if is_image_file(p))
    if per_class:
        if top_level:
            logger.warning("%s: %d images beside class folders are ignored", root, len(top_level))
        classes = sorted(per_class)
        paths: list[Path] = []
        labels: list[int] = []
        for index, name in enumerate(classes):
            paths.extend(per_class[name])
            labels.extend([index] * len(per_class[name]))
        return ImageSource(
            images=PathImages(paths),
            labels=np.asarray(labels, dtype=np.int64),
            classes=classes,
            name=spec,
        )
    if not top_level:
        raise ValueError(
            f"image folder {root} holds no images (extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return ImageSource(images=PathImages(top_level), labels=None, classes=None, name=spec)


# --------------------------------------------------------------------------------------------
# Synthetic OOD validation data
# --------------------------------------------------------------------------------------------


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


def _synthetic_source(body: str, spec: str, seed: int) -> ImageSource:
    kind, _, query = body.partition("?")
    params = {"n": 1000, "seed": seed, "size": 28}
    for key, values in parse_qs(query, keep_blank_values=True, strict_parsing=bool(query)).items():
        if key not in params:
            raise ValueError(f"{spec}: unknown parameter {key!r}; valid: n, seed, size")
        try:
            params[key] = int(values[-1])
        except ValueError:
            raise ValueError(f"{spec}: parameter {key!r} must be an integer") from None
    array = synthetic_images(kind, n=params["n"], seed=params["seed"], size=params["size"])
    return ImageSource(images=ArrayImages(array), labels=None, classes=None, name=spec)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_source(spec: str, *, limit: int | None = None, seed: int = 0) -> ImageSource:
    """Load images from a spec (see the module docstring).

    Args:
        spec: ``fashion-mnist:train|test``, ``synthetic:KIND[?n=..&seed=..&size=..]`` or a folder.
        limit: At most this many images: a seeded subset, class-balanced when labels exist.
        seed: Seed of the subset, and of synthetic data unless the spec gives ``seed=``.

    Returns:
        The source.

    Raises:
        ValueError: On an unknown spec, a missing or empty folder, or bad parameters.
        FileNotFoundError: If the Fashion-MNIST files are missing.
    """
    scheme, sep, body = spec.partition(":")
    if sep and scheme == "fashion-mnist":
        source = _fashion_mnist_source(body)
    elif sep and scheme == "synthetic":
        source = _synthetic_source(body, spec, seed)
    else:
        source = _folder_source(Path(spec).expanduser(), spec)
    return _limit(source, limit, seed)
