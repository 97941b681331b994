"""Do the demo's old hold-out and the test split differ in pixel space? (#18)

For every image of ``fashion-mnist:train-holdout`` (5,000) and ``fashion-mnist:test`` (10,000),
the Euclidean distance (pixels in [0, 1]) to its nearest ``train-fit`` image, the 55,000 images
the previous demo was trained on; then a Mann-Whitney test of the two distance samples. About a
minute and a half on one core.

    PYTHONPATH=service python experiments/calibration/pixel_distance.py
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from nacguard.offline.datasets import fashion_mnist_holdout_split, load_fashion_mnist


def main() -> None:
    torch.set_num_threads(1)
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    fit, held = fashion_mnist_holdout_split(train.shape[0])
    ref = torch.from_numpy(train[fit].reshape(len(fit), -1)).float() / 255

    def nearest(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images.reshape(len(images), -1)).float() / 255
        parts = [torch.cdist(x[i : i + 250], ref).min(1).values for i in range(0, len(x), 250)]
        return torch.cat(parts).numpy()

    h, t = nearest(train[held]), nearest(test)
    print(f"median distance: hold-out {np.median(h):.4f}, test {np.median(t):.4f}")
    print(f"Mann-Whitney: {mannwhitneyu(h, t)}")


if __name__ == "__main__":
    main()
