"""Tune and build the demo profile: a thin call of ``nacguard profile tune``.

InD: 1,000 class-balanced ``fashion-mnist:train-fit`` images are counted; the 5,000-image
``fashion-mnist:train-holdout`` (train images the model was not trained on) is the InD
validation set and calibrates the threshold. OOD validation: the generated sets the demo has
always been tuned on (noise, shapes, textures, glyphs, and inverted/flipped/rotated *train*
images). The test split and any real OOD data set are never touched. Writes the bundle,
``tuning.json`` and ``tuning.md`` to ``--out`` (default: this folder).

    python profiles/fashion-mnist/tune.py [--samples 1000] [--budget-s 600] [--out DIR]
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--samples", type=int, default=1000, help="counted train-fit images")
    p.add_argument("--ood-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    oods = [
        f"{kind.removeprefix('fmnist-train-')}=synthetic:{kind}?n={args.ood_n}&seed={args.seed + 1}"
        for kind in OOD_SETS
    ]
    argv = [
        *("profile", "tune", "--model", "demo", "--weights", args.weights),
        *("--data", "fashion-mnist:train-fit", "--validation-data", "fashion-mnist:train-holdout"),
        *("--samples", str(args.samples), "--validation-samples", "5000", "--seed", str(args.seed)),
        *("--no-generated-ood", "--ood", *oods, "--layers", *LAYERS),
        *("--budget-s", str(args.budget_s), "--out", args.out, "--name", "fashion-mnist"),
    ]
    return nacguard(argv)


if __name__ == "__main__":
    sys.exit(main())
