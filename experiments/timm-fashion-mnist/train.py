"""Train a small timm model on Fashion-MNIST for the bring-your-own-model example (docs/models.md).

The model is ``timm:resnet10t`` with narrow stages (``channels=16,32,64,128``, ``stem_width=16``),
one input channel and ten classes, trained on ``fashion-mnist:train-fit`` (the train split minus
the demo's seeded 5,000-image hold-out, which stays unseen for tuning and calibration). Plain
AdamW, one-cycle schedule, random-crop/flip augmentation, a few epochs: CPU minutes. The test
split is read once at the end for the accuracy in ``training.json``.

Writes ``checkpoint.pth`` in timm's own train-script layout (``{"state_dict": ..., "epoch": ..}``,
read by ``profile build/tune --weights`` with ``weights_only=True``) and ``training.json``.

    python experiments/timm-fashion-mnist/train.py [--epochs 4] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nacguard.bundle.refs import build_model, parse_model_spec
from nacguard.offline.datasets import fashion_mnist_holdout_split, load_fashion_mnist

HERE = Path(__file__).resolve().parent
SPEC = "timm:resnet10t:channels=16,32,64,128:stem_width=16:in_chans=1:num_classes=10"
MEAN, STD = 0.2863, 0.3532  # the demo's normalisation (pixel statistics of train-fit)


def to_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 B x 28 x 28 -> normalised float32 B x 1 x 28 x 28."""
    return ((batch.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (zero padding) and horizontal flips."""
    padded = F.pad(batch, (2, 2, 2, 2))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    out = padded[:, dy : dy + 28, dx : dx + 28]
    flip = torch.rand(batch.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(to_input(x[s : s + 1000])).argmax(1) == y[s : s + 1000]).sum())
               for s in range(0, len(x), 1000))  # fmt: skip
    return hits / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    images, labels = load_fashion_mnist("train")
    fit_idx, val_idx = fashion_mnist_holdout_split(images.shape[0], 0)
    fit_x, fit_y = torch.from_numpy(images[fit_idx]), torch.from_numpy(labels[fit_idx])
    val_x, val_y = torch.from_numpy(images[val_idx]), torch.from_numpy(labels[val_idx])
    model = build_model(parse_model_spec(SPEC))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(fit_x) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(fit_x), generator=gen)
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            loss = F.cross_entropy(model(to_input(augment(fit_x[idx], gen))), fit_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        history.append({"epoch": epoch, "holdout_accuracy": accuracy(model, val_x, val_y)})
        print(history[-1], f"{time.perf_counter() - started:.0f}s", flush=True)
    test_x, test_y = load_fashion_mnist("test")
    test_acc = accuracy(model, torch.from_numpy(test_x), torch.from_numpy(test_y))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "epoch": args.epochs}, args.out_dir / "checkpoint.pth"
    )
    report = {"model": SPEC, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
              "normalisation": {"mean": MEAN, "std": STD}, "history": history,
              "test_accuracy": test_acc, "seconds": round(time.perf_counter() - started, 1),
              "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    (args.out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f}; wrote {args.out_dir / 'checkpoint.pth'}")


if __name__ == "__main__":
    main()
