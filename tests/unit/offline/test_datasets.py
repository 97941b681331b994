"""Tests of nacguard.offline.datasets: idx parsing, Fashion-MNIST, folders, synthetic data, subsets."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nacguard.offline import synthetic
from nacguard.offline.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR_ENV,
    SYNTHETIC_KINDS,
    ArrayImages,
    ImageSource,
    PathImages,
    class_balanced_indices,
    fashion_mnist_calibration_split,
    fashion_mnist_holdout_split,
    load_fashion_mnist,
    load_source,
    read_idx,
    synthetic_images,
)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(
    path: Path,
    array: np.ndarray,
    *,
    compress: bool = True,
    magic: bytes | None = None,
    drop_bytes: int = 0,
) -> Path:
    """Write ``array`` (uint8) as an idx file, optionally gzip-compressed or damaged."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if drop_bytes:
        data = data[:-drop_bytes]
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture()
def fake_fmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A tiny Fashion-MNIST copy (20 train, 10 test images) that the env var points to."""
    rng = np.random.default_rng(5)
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, n in (("train", "train", 20), ("test", "t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    return arrays


# ---------------------------------------------------------------------------------------------
# idx files


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    out = read_idx(path, expected_ndim=3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative
    assert out.tolist() == [1, -2, 70000]


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad.gz", np.zeros((2, 2), np.uint8), magic=b"\x01\x00\x08\x02")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(path)


def test_read_idx_rejects_unknown_type_code(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad.gz", np.zeros((2, 2), np.uint8), magic=b"\x00\x00\x07\x02")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short.gz", np.zeros((3, 4, 4), np.uint8), drop_bytes=5)
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(path)


def test_read_idx_rejects_wrong_ndim(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="expected 3"):
        read_idx(path, expected_ndim=3)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_load_fashion_mnist_from_env_dir(
    fake_fmnist: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nacguard.offline.datasets"):
        images, labels = load_fashion_mnist("train")
    np.testing.assert_array_equal(images, fake_fmnist["train_images"])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, fake_fmnist["train_labels"])
    assert "expected 60000" in caplog.text  # a trimmed copy is allowed but noticed


def test_fashion_mnist_source(fake_fmnist: dict[str, np.ndarray]) -> None:
    source = load_source("fashion-mnist:test")
    assert source.name == "fashion-mnist:test"
    assert len(source) == 10
    assert source.classes == list(FASHION_MNIST_CLASSES)
    assert source.labels is not None and source.labels.dtype == np.int64
    image = source.images[3]
    assert isinstance(image, Image.Image)
    assert image.mode == "L" and image.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(image), fake_fmnist["test_images"][3])


def test_fashion_mnist_limit_is_class_balanced(fake_fmnist: dict[str, np.ndarray]) -> None:
    source = load_source("fashion-mnist:train", limit=10, seed=1)
    assert len(source) == 10
    assert source.labels is not None
    assert np.bincount(source.labels, minlength=10).tolist() == [1] * 10
    again = load_source("fashion-mnist:train", limit=10, seed=1)
    np.testing.assert_array_equal(
        np.stack([np.asarray(im) for im in source]), np.stack([np.asarray(im) for im in again])
    )


def test_fashion_mnist_unknown_split(fake_fmnist: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="fashion-mnist:train, fashion-mnist:test"):
        load_source("fashion-mnist:validation")


def test_holdout_split() -> None:
    fit, held = fashion_mnist_holdout_split(50, seed=3, holdout=8)
    assert len(fit) == 42 and len(held) == 8
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(50))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(held) > 0)
    again = fashion_mnist_holdout_split(50, seed=3, holdout=8)
    assert np.array_equal(held, again[1])
    with pytest.raises(ValueError, match="hold out 50 of 50"):
        fashion_mnist_holdout_split(50, holdout=50)


def test_calibration_split_is_three_disjoint_parts_of_one_permutation() -> None:
    core, held, cal = fashion_mnist_calibration_split(50, seed=3, holdout=8, calibration=10)
    assert (len(core), len(held), len(cal)) == (32, 8, 10)
    assert np.array_equal(np.sort(np.concatenate([core, held, cal])), np.arange(50))
    assert all(np.all(np.diff(part) > 0) for part in (core, held, cal))
    # The hold-out is the one of fashion_mnist_holdout_split; its fit part is core + calibration.
    fit, held2 = fashion_mnist_holdout_split(50, seed=3, holdout=8)
    assert np.array_equal(held, held2)
    assert np.array_equal(np.sort(np.concatenate([core, cal])), fit)
    other = fashion_mnist_calibration_split(50, seed=4, holdout=8, calibration=10)[2]
    assert not np.array_equal(cal, other)  # the seed matters
    with pytest.raises(ValueError, match="hold out 8 \\+ 42 of 50"):
        fashion_mnist_calibration_split(50, holdout=8, calibration=42)


def test_fashion_mnist_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=FASHION_MNIST_DIR_ENV):
        load_fashion_mnist("train")


def test_fashion_mnist_mismatched_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(
    not (REAL_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, split: str, n: int) -> None:
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)
    images, labels = load_fashion_mnist(split)  # type: ignore[arg-type]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    # Both splits are exactly balanced over the ten classes.
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert 0.27 < images.mean() / 255 < 0.30  # the well-known pixel mean (about 0.286)


@pytest.mark.skipif(
    not (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_train_fit_and_holdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)
    fit = load_source("fashion-mnist:train-fit")
    held = load_source("fashion-mnist:train-holdout")
    assert (len(fit), len(held)) == (55_000, 5_000)
    assert held.classes == list(FASHION_MNIST_CLASSES) and held.labels is not None
    images, labels = load_fashion_mnist("train")
    _, held_idx = fashion_mnist_holdout_split()
    np.testing.assert_array_equal(held.labels, labels[held_idx])
    np.testing.assert_array_equal(np.asarray(held.images[7]), images[held_idx[7]])
    core = load_source("fashion-mnist:train-core")
    cal = load_source("fashion-mnist:train-calibration")
    assert (len(core), len(cal)) == (45_000, 10_000)
    core_idx, held_idx2, cal_idx = fashion_mnist_calibration_split()
    np.testing.assert_array_equal(held_idx2, held_idx)
    np.testing.assert_array_equal(cal.labels, labels[cal_idx])
    np.testing.assert_array_equal(np.asarray(core.images[3]), images[core_idx[3]])


# ---------------------------------------------------------------------------------------------
# folders


def save_image(path: Path, value: int, mode: str = "L", size: tuple[int, int] = (5, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    save_image(tmp_path / "zebra" / "a.png", 10)
    save_image(tmp_path / "zebra" / "deep" / "b.JPG", 20, mode="RGB")
    save_image(tmp_path / "ant" / "c.bmp", 30)
    save_image(tmp_path / "ant" / ".hidden.png", 40)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()  # a folder without images is not a class
    source = load_source(str(tmp_path))
    assert source.classes == ["ant", "zebra"]
    assert source.labels is not None
    assert source.labels.tolist() == [0, 1, 1]
    assert isinstance(source.images, PathImages)
    first = source.images[0]
    assert first.size == (5, 4) and np.asarray(first)[0, 0] == 30
    assert source.images[2].mode == "RGB"  # stored mode is kept; preprocessing converts


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i, ext in enumerate(["png", "webp", "gif", "tiff", "jpeg"]):
        save_image(tmp_path / f"img{i}.{ext}", 50 + i)
    source = load_source(str(tmp_path))
    assert source.labels is None and source.classes is None
    assert len(source) == 5
    assert [p.suffix for p in source.images.paths] == [  # type: ignore[attr-defined]
        ".png",
        ".webp",
        ".gif",
        ".tiff",
        ".jpeg",
    ]
    assert all(isinstance(im, Image.Image) for im in source)


def test_folder_limit(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(5):
            save_image(tmp_path / cls / f"{i}.png", i)
    source = load_source(str(tmp_path), limit=4, seed=3)
    assert source.labels is not None and source.labels.tolist() == [0, 0, 1, 1]
    assert len(source.images) == 4


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        load_source(str(missing))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no images"):
        load_source(str(tmp_path))


def test_file_is_not_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    save_image(path, 1)
    with pytest.raises(ValueError, match="not a folder"):
        load_source(str(path))


# ---------------------------------------------------------------------------------------------
# synthetic

GENERATED = [k for k in SYNTHETIC_KINDS if not k.startswith("fmnist-")]


def test_required_kinds_exist() -> None:
    assert {"gaussian", "uniform", "shapes", "checkerboard", "stripes", "blobs"} <= set(GENERATED)
    for kind in SYNTHETIC_KINDS:
        assert f"``{kind}``" in (synthetic.__doc__ or ""), f"{kind} is not documented"


@pytest.mark.parametrize("kind", GENERATED)
def test_synthetic_kind(kind: str) -> None:
    source = load_source(f"synthetic:{kind}?n=12&size=20")
    assert len(source) == 12 and source.labels is None
    image = source.images[0]
    assert image.mode == "L" and image.size == (20, 20)
    array = synthetic_images(kind, n=12, seed=0, size=20)
    assert array.shape == (12, 20, 20) and array.dtype == np.uint8
    # Deterministic per seed, different across seeds, and the images have content.
    np.testing.assert_array_equal(array, synthetic_images(kind, n=12, seed=0, size=20))
    assert not np.array_equal(array, synthetic_images(kind, n=12, seed=1, size=20))
    assert (array.reshape(12, -1).std(axis=1) > 1).mean() > 0.8
    np.testing.assert_array_equal(np.asarray(image), array[0])


def test_kinds_are_independent_for_one_seed() -> None:
    # The kind is mixed into the seed, so two noise kinds do not share their random draws.
    a = synthetic_images("checkerboard", n=4, seed=0)
    b = synthetic_images("stripes", n=4, seed=0)
    assert not np.array_equal(a, b)


def test_synthetic_seed_from_argument_and_query() -> None:
    by_arg = load_source("synthetic:gaussian?n=3", seed=7)
    by_query = load_source("synthetic:gaussian?n=3&seed=7", seed=0)
    np.testing.assert_array_equal(
        np.stack([np.asarray(i) for i in by_arg]), np.stack([np.asarray(i) for i in by_query])
    )


def test_synthetic_default_size_and_limit() -> None:
    source = load_source("synthetic:shapes?n=30", limit=7, seed=2)
    assert len(source) == 7
    assert source.images[0].size == (28, 28)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("synthetic:plasma", "valid kinds: gaussian"),
        ("synthetic:gaussian?count=3", "unknown parameter 'count'"),
        ("synthetic:gaussian?n=three", "must be an integer"),
        ("synthetic:gaussian?size=2", "size must be"),
        ("synthetic:gaussian?n=-1", "n must be"),
    ],
)
def test_synthetic_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_source(spec)


def test_fmnist_train_variants(fake_fmnist: dict[str, np.ndarray]) -> None:
    train = fake_fmnist["train_images"]
    inverted = synthetic_images("fmnist-train-inverted", n=20, seed=0)
    # n equals the split size here, so the sorted pick is the whole split in order.
    np.testing.assert_array_equal(inverted, 255 - train)
    np.testing.assert_array_equal(synthetic_images("fmnist-train-vflip", n=20), train[:, ::-1])
    rot = synthetic_images("fmnist-train-rot90", n=20)
    np.testing.assert_array_equal(rot[0], np.rot90(train[0]))
    np.testing.assert_array_equal(rot[1], np.rot90(train[1], k=-1))
    small = synthetic_images("fmnist-train-inverted", n=5, seed=3, size=14)
    assert small.shape == (5, 14, 14)
    with pytest.raises(ValueError, match="at most 20"):
        synthetic_images("fmnist-train-vflip", n=21)


def test_fmnist_variants_never_read_the_test_split(
    fake_fmnist: dict[str, np.ndarray], tmp_path: Path
) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).unlink()
    assert len(load_source("synthetic:fmnist-train-vflip?n=4")) == 4


# ---------------------------------------------------------------------------------------------
# containers and subsets


def test_array_images_slicing_and_validation() -> None:
    images = ArrayImages(np.zeros((4, 3, 3), np.uint8))
    assert len(images[1:3]) == 2
    assert len(images.take(np.array([0, 0, 3]))) == 3
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages(np.zeros((4, 3, 3), np.float32))


def test_subset_of_plain_list_source() -> None:
    pics = [Image.new("L", (2, 2), color=i) for i in range(4)]
    source = ImageSource(images=pics, labels=np.array([0, 1, 0, 1]), classes=["a", "b"], name="x")
    sub = source.subset(np.array([1, 3]))
    assert [np.asarray(im)[0, 0] for im in sub] == [1, 3]
    assert sub.labels is not None and sub.labels.tolist() == [1, 1]


def test_class_balanced_exact() -> None:
    labels = np.repeat(np.arange(3), 20)
    picked = class_balanced_indices(labels, 30, seed=0)
    assert picked.dtype == np.int64 and len(picked) == 30
    assert np.bincount(labels[picked]).tolist() == [10, 10, 10]
    assert np.all(np.diff(picked) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(picked, class_balanced_indices(labels, 30, seed=0))
    assert not np.array_equal(picked, class_balanced_indices(labels, 30, seed=1))


def test_class_balanced_remainder_and_shortage() -> None:
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10 + [-1] * 5)
    picked = class_balanced_indices(labels, 13, seed=0)
    counts = np.bincount(labels[picked], minlength=3)
    # Class 0 gives all it has; its shortfall is shared by the other two (5.5 each -> 6 and 5).
    assert counts[0] == 2 and sorted(counts[1:].tolist()) == [5, 6]
    assert np.all(labels[picked] >= 0)  # unknown labels are never picked


def test_class_balanced_limits() -> None:
    labels = np.array([0, 0, 1, -1])
    assert class_balanced_indices(labels, 0).size == 0
    assert class_balanced_indices(labels, 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot pick 4 of 3"):
        class_balanced_indices(labels, 4)
    with pytest.raises(ValueError):
        class_balanced_indices(labels, -1)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=6),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_class_balanced_property(counts: list[int], frac: float, seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    n = int(frac * labels.size)
    picked = class_balanced_indices(labels, n, seed)
    assert len(picked) == n == len(np.unique(picked))
    got = np.bincount(labels[picked], minlength=len(counts))
    available = np.array(counts)
    # Max-min fairness: a class below the largest pick count minus one must be exhausted.
    if n:
        assert np.all((got >= got.max() - 1) | (got == available))
