"""Image sources for building, tuning and evaluating profiles.

:func:`load_source` turns a short spec string into an :class:`ImageSource` (a sequence of PIL
images, optional integer labels and class names). Specs:

``fashion-mnist:train`` / ``fashion-mnist:test`` (and ``train-fit`` / ``train-holdout``, the
two-way split of the train split, :func:`fashion_mnist_holdout_split`; ``train-core`` /
``train-holdout`` / ``train-calibration``, the demo's three-way split,
:func:`fashion_mnist_calibration_split`)
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
    Generated out-of-distribution *validation* data (:mod:`nacguard.offline.synthetic` lists
    the kinds). Deterministic for a given (kind, n, seed, size); no labels.

``limit`` takes a seeded subset: class-balanced (:func:`class_balanced_indices`) when the source
has labels, uniform otherwise. Sub-sets keep the source's order.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload
from urllib.parse import parse_qs

import numpy as np
from PIL import Image

from nacguard.offline.fashion_mnist import (
    _FMNIST_FILES,
    FASHION_MNIST_CALIBRATION,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR_ENV,
    FASHION_MNIST_HOLDOUT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_calibration_split,
    fashion_mnist_dir,
    fashion_mnist_holdout_split,
    load_fashion_mnist,
    read_idx,
)
from nacguard.offline.synthetic import SYNTHETIC_KINDS, synthetic_images

__all__ = [
    "FASHION_MNIST_CALIBRATION",
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
    "fashion_mnist_calibration_split",
    "fashion_mnist_dir",
    "fashion_mnist_holdout_split",
    "image_files",
    "is_image_file",
    "load_fashion_mnist",
    "load_source",
    "read_idx",
    "synthetic_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

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
        # The bytes are read now (no file handle stays open) but decoded only when the image is
        # preprocessed: a scaled-decoding spec then decodes it as the server decodes an upload.
        return Image.open(io.BytesIO(self.paths[index].read_bytes()))

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


def _fashion_mnist_source(split: str) -> ImageSource:
    parts = ("train-fit", "train-holdout", "train-core", "train-calibration")
    base = "train" if split in parts else split
    if base not in _FMNIST_FILES:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r} in 'fashion-mnist:{split}'; use "
            "fashion-mnist:train, fashion-mnist:test or fashion-mnist:" + " / ".join(parts)
        )
    images, labels = load_fashion_mnist(base)  # type: ignore[arg-type]
    if base != split:
        fit, held = fashion_mnist_holdout_split(images.shape[0])
        core, _, cal = fashion_mnist_calibration_split(images.shape[0])
        keep = dict(zip(parts, (fit, held, core, cal), strict=True))[split]
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


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files under folders (sorted), in order.

    Raises:
        ValueError: a path that is neither a file nor a folder.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"no such file or folder: {p}")
    return files


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
