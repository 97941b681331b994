"""Tune and build the demo profile: a thin call of ``nacguard profile tune``.

The three parts of the train split (``fashion_mnist_calibration_split``, seed 0) each do one
job: 1,000 class-balanced ``fashion-mnist:train-core`` images (the model's training images)
are counted; the 5,000-image ``fashion-mnist:train-holdout`` (which also picked the checkpoint)
is the InD validation set the settings are chosen on; the 10,000-image
``fashion-mnist:train-calibration`` calibrates the threshold and the p-values and is used for
nothing else, so the p-values keep their promise on fresh images. OOD validation: the generated
sets the demo has always been tuned on (noise, shapes, textures, glyphs, and
inverted/flipped/rotated *train* images). The test split and any real OOD data set are never
touched. Writes the bundle, ``tuning.json`` and ``tuning.md`` to ``--out`` (default: this
folder).

    python profiles/fashion-mnist/tune.py [--samples 1000] [--budget-s 600] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nacguard.cli import main as nacguard

HERE = Path(__file__).resolve().parent
LAYERS = ["block1", "block2", "block3", "avgpool"]
OOD_SETS = ["gaussian", "uniform", "shapes", "checkerboard", "stripes", "blobs", "glyphs",
            "fmnist-train-inverted", "fmnist-train-vflip", "fmnist-train-rot90"]  # fmt: skip


def main() -> int:
    """Parse the few demo options and run ``nacguard profile tune``."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", default=str(HERE / "model.safetensors"))
    p.add_argument("--samples", type=int, default=1000, help="counted train-core images")
    p.add_argument("--ood-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    # The normalisation the weights were trained with (train.py's training.json beside them).
    norm = json.loads((Path(args.weights).parent / "training.json").read_text())["preprocessing"]
    oods = [
        f"{kind.removeprefix('fmnist-train-')}=synthetic:{kind}?n={args.ood_n}&seed={args.seed + 1}"
        for kind in OOD_SETS
    ]
    argv = [
        *("profile", "tune", "--model", "demo", "--weights", args.weights),
        *("--data", "fashion-mnist:train-core", "--validation-data", "fashion-mnist:train-holdout"),
        *("--calibration-data", "fashion-mnist:train-calibration"),
        *("--mean", str(norm["mean"][0]), "--std", str(norm["std"][0])),
        *("--samples", str(args.samples), "--validation-samples", "5000", "--seed", str(args.seed)),
        *("--no-generated-ood", "--ood", *oods, "--layers", *LAYERS),
        *("--budget-s", str(args.budget_s), "--out", args.out, "--name", "fashion-mnist"),
    ]
    return nacguard(argv)


if __name__ == "__main__":
    sys.exit(main())
