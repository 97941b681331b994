"""The Fashion-MNIST idx files of the Debian package ``dataset-fashion-mnist``: reading and
validating idx files, the demo's train split into fitting and held-out parts."""

from __future__ import annotations

import gzip
import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "FASHION_MNIST_CALIBRATION",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_HOLDOUT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "fashion_mnist_calibration_split",
    "fashion_mnist_dir",
    "fashion_mnist_holdout_split",
    "load_fashion_mnist",
    "read_idx",
]

logger = logging.getLogger("nacguard.offline.datasets")

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

# idx type codes (third byte of the magic number) -> numpy dtype; big-endian per the format.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


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


#: Size of the demo's calibration part of the train split (see
#: :func:`fashion_mnist_calibration_split`).
FASHION_MNIST_CALIBRATION = 10_000


def fashion_mnist_calibration_split(
    n: int = 60_000,
    seed: int = 0,
    holdout: int = FASHION_MNIST_HOLDOUT,
    calibration: int = FASHION_MNIST_CALIBRATION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The demo's three-way split of the train split: (core, held-out, calibration), sorted.

    The same seeded permutation as :func:`fashion_mnist_holdout_split`: its last ``holdout``
    positions are the held-out part (``train-holdout``: checkpoint selection and NAC tuning),
    the ``calibration`` positions before them the calibration part (``train-calibration``),
    the rest the core (``train-core``: the demo model is trained on it and its profile counts
    from it). Nothing chooses anything on the calibration part, so its scores are exchangeable
    with fresh images of the same distribution. ``train-fit`` is core plus calibration.
    """
    if not (holdout > 0 and calibration > 0 and holdout + calibration < n):
        raise ValueError(f"cannot hold out {holdout} + {calibration} of {n} images")
    perm = np.random.default_rng(seed).permutation(n)
    cut = n - holdout - calibration
    return np.sort(perm[:cut]), np.sort(perm[-holdout:]), np.sort(perm[cut:-holdout])
