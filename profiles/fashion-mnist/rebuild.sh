#!/usr/bin/env bash
# Rebuild the demo bundle from the Debian Fashion-MNIST package, seeded, from scratch:
# One seeded permutation splits the train split three ways (fashion_mnist_calibration_split):
# train-core (45,000), train-holdout (5,000), train-calibration (10,000).
#   1. train the model on train-core, keeping the checkpoint best on train-holdout
#      (~7-18 min, 2 cores)
#   2. `nacguard profile tune` (tune.py): choose NAC layers/hyperparameters on train-holdout vs
#      generated OOD sets, count 1,000 class-balanced train-core images, calibrate the threshold
#      and the p-values on train-calibration (used for nothing else); writes the bundle,
#      tuning.json and tuning.md
#   3. evaluate against the test split (InD) and the generated OOD sets -> eval.json
#   4. the same OOD families on validation data (InD train-holdout) -> validation.json, which
#      decides whether the fused detector would be the demo default (it never sees the test split)
# Pass --skip-train to keep the committed weights.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=profiles/fashion-mnist
if [ "${1:-}" != "--skip-train" ]; then
  python "$HERE/train.py" --seed 0
fi
python "$HERE/tune.py" --samples 1000 --seed 0
OODS=()
for kind in gaussian uniform shapes checkerboard stripes blobs glyphs \
            fmnist-train-inverted fmnist-train-vflip fmnist-train-rot90; do
  OODS+=("${kind#fmnist-train-}=synthetic:$kind")
done
nacguard profile eval --profile "$HERE" --ind fashion-mnist:test --ood "${OODS[@]}" --json "$HERE/eval.json"
VOODS=()
for kind in gaussian uniform shapes checkerboard stripes blobs glyphs \
            fmnist-train-inverted fmnist-train-vflip fmnist-train-rot90; do
  VOODS+=("${kind#fmnist-train-}=synthetic:$kind?n=1000&seed=1")
done
nacguard profile eval --profile "$HERE" --ind fashion-mnist:train-holdout --ood "${VOODS[@]}" \
  --json "$HERE/validation.json"
