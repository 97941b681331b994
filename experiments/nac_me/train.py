"""Train the Fashion-MNIST checkpoints that the NAC-ME experiment ranks.

Usage (from the repository root; a few minutes on one CPU thread)::

    python experiments/nac_me/train.py [--out-dir experiments/nac_me/checkpoints]

Six small training runs of the demo architecture (``FashionCNN``), which differ in width, seed,
augmentation, number of training images and length; every run saves a checkpoint after each
epoch, so the set also spans training time. All runs fit a seeded, class-balanced subset of
``fashion-mnist:train-fit`` (the train split minus the 5,000 images of
``fashion-mnist:train-holdout``): the held-out part stays untouched for NAC-ME, and the test split
is never read here.

Each checkpoint is a safetensors state dict; ``checkpoints.json`` lists them with their
architecture (``demo:width=16``), training settings and sha256. Training is deterministic on the
CPU: a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from nacguard.bundle.refs.demo import FashionCNN
from nacguard.imaging.preprocess import PRESETS
from nacguard.offline.datasets import (
    class_balanced_indices,
    fashion_mnist_holdout_split,
    load_fashion_mnist,
)

__all__ = ["RUNS", "Run", "train_all", "train_run"]

log = logging.getLogger("nac_me.train")

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Run:
    """One training run; it yields one checkpoint per epoch.

    Attributes:
        name: prefix of the checkpoint names (``<name>-e<epoch>``).
        width: ``FashionCNN`` width.
        seed: seed of initialisation, batch order and augmentation.
        augment: ``none``; ``crop-flip`` (random 2-px shifts and horizontal flips, as the demo);
            or ``robust`` (crop-flip plus random rotations of up to 30 degrees and Gaussian pixel
            noise, a robustness-minded recipe).
        train_images: size of the class-balanced training subset of ``train-fit``.
        epochs: epochs; a checkpoint is saved after each.
        lr: peak SGD learning rate (cosine decay to zero over the run, one warm-up epoch share).
    """

    name: str
    width: int
    seed: int
    augment: str
    train_images: int
    epochs: int
    lr: float = 0.1

    @property
    def spec(self) -> str:
        """The ``--model`` text of the architecture."""
        return f"demo:width={self.width}"


#: The experiment's runs: 3 + 3 + 3 + 2 + 3 + 3 = 17 checkpoints.
RUNS: tuple[Run, ...] = (
    Run("w16-plain-s0", width=16, seed=0, augment="none", train_images=12_000, epochs=3),
    Run("w16-cropflip-s1", width=16, seed=1, augment="crop-flip", train_images=12_000, epochs=3),
    Run("w8-plain-s0", width=8, seed=0, augment="none", train_images=12_000, epochs=3),
    Run("w32-cropflip-s0", width=32, seed=0, augment="crop-flip", train_images=12_000, epochs=2),
    Run("w16-robust-s2", width=16, seed=2, augment="robust", train_images=12_000, epochs=3),
    Run("w16-small-s3", width=16, seed=3, augment="none", train_images=3_000, epochs=3),
)

BATCH_SIZE = 64
WEIGHT_DECAY = 5e-4
SUBSET_SEED = 1234  # the training subset, shared by the runs of the same size


def _shift_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (zero padding) and horizontal flips of a float B x 1 x 28 x 28 batch."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (b,), generator=gen)
    dx = torch.randint(0, 5, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])[:, :, None].expand(b, 28, 28)
    cols = (dx[:, None] + torch.arange(28)[None, :])[:, None, :].expand(b, 28, 28)
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _rotate(x: torch.Tensor, gen: torch.Generator, max_deg: float) -> torch.Tensor:
    """Random rotations of up to ``max_deg`` degrees about the centre (zero fill)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Apply a run's augmentation to pixels in [0, 1] (B x 1 x 28 x 28)."""
    if kind == "none":
        return x
    x = _shift_flip(x, gen)
    if kind == "crop-flip":
        return x
    if kind == "robust":
        x = _rotate(x, gen, 30.0)
        sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 0.2
        return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)
    raise ValueError(f"unknown augmentation {kind!r}")


#: The input normalisation: the fashion-mnist preset's numbers, recorded in checkpoints.json so
#: the evaluation passes exactly these to ``--preprocess`` even if the preset changes later.
PREPROCESS = PRESETS["fashion-mnist"]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - PREPROCESS.mean[0]) / PREPROCESS.std[0]


def _save(model: FashionCNN, path: Path) -> str:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes the metadata map in a per-process random order,
    # so several keys would make identical weights hash differently from run to run. The
    # architecture, run and epoch are in checkpoints.json.
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_run(
    run: Run, images: np.ndarray, labels: np.ndarray, out_dir: Path
) -> list[dict[str, object]]:
    """Train one run on ``train-fit`` arrays and save a checkpoint after every epoch.

    Returns:
        One manifest entry per saved checkpoint.
    """
    subset = class_balanced_indices(labels, run.train_images, SUBSET_SEED)
    x_all = torch.from_numpy(images[subset]).float().div_(255.0).unsqueeze(1)
    y_all = torch.from_numpy(labels[subset])
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    model = FashionCNN(width=run.width)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(
        groups,
        lr=run.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps = run.epochs * math.ceil(len(y_all) / BATCH_SIZE)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    entries: list[dict[str, object]] = []
    for epoch in range(1, run.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y_all), generator=gen)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            x = _normalise(augment(x_all[idx], run.augment, gen))
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        name = f"{run.name}-e{epoch}"
        path = out_dir / f"{name}.safetensors"
        digest = _save(model, path)
        seconds = time.perf_counter() - t0
        log.info("%s: train loss %.4f (%.1f s)", name, total / len(y_all), seconds)
        entries.append(
            {
                "name": name,
                "file": path.name,
                "model": run.spec,
                "epoch": epoch,
                "train_loss": round(total / len(y_all), 5),
                "sha256": digest,
                "run": asdict(run),
            }
        )
    return entries


def train_all(out_dir: Path, threads: int = 1) -> Path:
    """Train every run of :data:`RUNS` into ``out_dir``; returns the manifest path."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train")
    fit, _held = fashion_mnist_holdout_split(images.shape[0])
    images, labels = images[fit], labels[fit]
    started = time.perf_counter()
    entries = []
    for run in RUNS:
        entries += train_run(run, images, labels, out_dir)
    manifest = {
        "data": "fashion-mnist:train-fit (class-balanced subsets, seed "
        f"{SUBSET_SEED}); never train-holdout or test",
        "batch_size": BATCH_SIZE,
        "weight_decay": WEIGHT_DECAY,
        "optimizer": "SGD, momentum 0.9, Nesterov; linear warm-up (10% of steps), cosine decay",
        "preprocess": PREPROCESS.to_dict(),
        "threads": threads,
        "torch_version": torch.__version__,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "checkpoints": entries,
    }
    path = out_dir / "checkpoints.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.info("wrote %s", train_all(args.out_dir, args.threads))


if __name__ == "__main__":
    main()
