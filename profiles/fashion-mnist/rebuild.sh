#!/usr/bin/env bash
# Rebuild the demo bundle from the Debian Fashion-MNIST package, seeded, from scratch:
#   1. train the model on the train split minus a seeded 5,000-image hold-out (~7-18 min, 2 cores)
#   2. `nacguard profile tune` (tune.py): choose NAC layers/hyperparameters on validation data only
#      (held-out train images vs generated OOD sets), count 1,000 class-balanced train-fit images,
#      calibrate the threshold on the hold-out; writes the bundle, tuning.json and tuning.md
#   3. evaluate against the test split (InD) and the generated OOD sets -> eval.json
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
