"""Train the bundled demo classifier (FashionCNN) on the Fashion-MNIST train split.

Usage (from the repository root; about 7 minutes on 2 idle CPU cores,
longer when they are shared)::

    python profiles/fashion-mnist/train.py [--epochs 30] [--seed 0] [--out-dir DIR]

Only the TRAIN split is used for fitting and model selection, split three ways by one seeded
permutation (:func:`fashion_mnist_calibration_split`): the model is fitted on the 45,000-image
core (``fashion-mnist:train-core``); the checkpoint with the best accuracy on the 5,000-image
hold-out (``train-holdout``) is kept; the 10,000-image calibration part (``train-calibration``)
is not read here at all, so the profile's calibration scores are exchangeable with fresh
images (nothing was chosen on them). The TEST split is evaluated exactly once, at the end, for the report in ``training.json``;
it never influences any choice. Writes ``model.safetensors`` (the state dict) and
``training.json`` (config, normalisation, schedule, accuracies, versions, wall time) next to
this script unless ``--out-dir`` says otherwise.

Inputs are scaled to [0, 1] and normalised with the pixel mean/std of the fitted images; those
numbers go into ``training.json`` and from there into the bundle's preprocessing spec
(grayscale, resize 28x28, to tensor, normalise).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from nacguard.bundle.refs.demo import DEMO_ARCHITECTURE, FashionCNN, demo_config
from nacguard.offline.datasets import (
    FASHION_MNIST_CALIBRATION,
    FASHION_MNIST_HOLDOUT,
    fashion_mnist_calibration_split,
    load_fashion_mnist,
)

logger = logging.getLogger("nacguard.train_demo")

VAL_SIZE = FASHION_MNIST_HOLDOUT
PAD = 2  # random-crop padding in pixels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    return parser.parse_args()


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a uint8 B x 28 x 28 batch."""
    b, h, w = batch.shape
    padded = F.pad(batch, (PAD, PAD, PAD, PAD))  # zero = the black Fashion-MNIST background
    dy = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    # Gather the crops with index arithmetic instead of a Python loop over the batch.
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(b, h, w)
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


def to_input(batch: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 B x 28 x 28 -> normalised float32 B x 1 x 28 x 28."""
    return ((batch.float() / 255.0 - mean) / std).unsqueeze(1)


@torch.inference_mode()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float
) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], 1000):
        logits = model(to_input(images[start : start + 1000], mean, std))
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / images.shape[0]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()

    images_np, labels_np = load_fashion_mnist("train")
    # The same split that `fashion-mnist:train-core` / `train-holdout` / `train-calibration`
    # name: tuned on the hold-out, calibrated on the calibration part, never trained on either.
    fit_idx, val_idx, _cal_idx = fashion_mnist_calibration_split(
        images_np.shape[0], args.seed, VAL_SIZE, FASHION_MNIST_CALIBRATION
    )
    fit_x = torch.from_numpy(images_np[fit_idx].copy())
    fit_y = torch.from_numpy(labels_np[fit_idx].copy())
    val_x = torch.from_numpy(images_np[val_idx].copy())
    val_y = torch.from_numpy(labels_np[val_idx].copy())
    pixels = fit_x.double() / 255.0
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    del pixels
    logger.info("fit %d, val %d, mean %.4f std %.4f", len(fit_x), len(val_x), mean, std)

    model = FashionCNN(width=args.width)
    # No weight decay on batch-norm parameters and biases (standard practice; decaying BN
    # scales only fights the normalisation).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = (len(fit_x) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=args.lr,
        epochs=args.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=0.15,
        div_factor=10.0,
        final_div_factor=100.0,
    )
    generator = torch.Generator().manual_seed(args.seed)

    history = []
    best_acc, best_epoch, best_state = -1.0, -1, copy.deepcopy(model.state_dict())
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(fit_x), generator=generator)
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            x = to_input(augment(fit_x[idx], generator), mean, std)
            loss = F.cross_entropy(model(x), fit_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
        val_acc = accuracy(model, val_x, val_y, mean, std)
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(total_loss / seen, 5),
                "val_accuracy": val_acc,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        logger.info(
            "epoch %d/%d loss %.4f val %.4f (%.0f s)",
            epoch,
            args.epochs,
            total_loss / seen,
            val_acc,
            time.perf_counter() - t0,
        )
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    # The one and only look at the test split, for reporting.
    test_x, test_y = load_fashion_mnist("test")
    test_acc = accuracy(model, torch.from_numpy(test_x), torch.from_numpy(test_y), mean, std)
    wall = time.perf_counter() - started
    logger.info("best epoch %d val %.4f test %.4f, %.0f s", best_epoch, best_acc, test_acc, wall)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = args.out_dir / "model.safetensors"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(weights_path), metadata={"format": "pt"})
    report = {
        "architecture": DEMO_ARCHITECTURE,
        "config": demo_config(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "data": {
            "dataset": "fashion-mnist",
            "split": f"fashion_mnist_calibration_split(seed={args.seed}): one permutation of the "
            "train split, three disjoint parts",
            "fit": f"fashion-mnist:train-core ({len(fit_x)} train-split images)",
            "validation": f"fashion-mnist:train-holdout ({VAL_SIZE} train-split images): "
            "checkpoint selection, later NAC tuning",
            "calibration": f"fashion-mnist:train-calibration ({FASHION_MNIST_CALIBRATION} "
            "train-split images): not read by training or tuning, only by calibration",
            "test": "test split, evaluated once after training",
        },
        "preprocessing": {
            "grayscale": True,
            "resize": [28, 28],
            "scale": "pixel / 255",
            "mean": [mean],
            "std": [std],
        },
        "augmentation": {"random_crop_padding": PAD, "horizontal_flip": 0.5},
        "optimizer": {
            "name": "SGD",
            "momentum": 0.9,
            "nesterov": True,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "weight_decay_on_norm_and_bias": False,
        },
        "schedule": {
            "name": "OneCycleLR",
            "pct_start": 0.15,
            "div_factor": 10.0,
            "final_div_factor": 100.0,
        },
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "best_epoch": best_epoch,
        "val_accuracy": best_acc,
        "test_accuracy": test_acc,
        "history": history,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "threads": args.threads,
        "wall_time_s": round(wall, 1),
    }
    (args.out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s and training.json", weights_path)


if __name__ == "__main__":
    main()
