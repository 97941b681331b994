"""Small demo-net bundles built from random images, shared by the models tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nacguard.models.bundle import Calibration, save_bundle
from nacguard.models.demo import build_demo_model
from nacguard.models.preprocess import PRESETS
from nacguard.nac import LayerConfig, NacScorer, ProfileBuilder, threshold_at_tpr

CLASSES = [f"c{i}" for i in range(10)]


def random_images(n: int, seed: int, size: int = 28) -> list[Image.Image]:
    """``n`` seeded random grayscale images."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L") for _ in range(n)
    ]


def make_demo_bundle(out: Path, layers: list[LayerConfig], name: str) -> Path:
    """A width-8 demo net (seed 0) counted on 64 random images, calibrated on 40 others."""
    torch.manual_seed(0)
    model = build_demo_model({"width": 8}).eval()
    prep = PRESETS["fashion-mnist"]
    profile = ProfileBuilder(model, layers).fit([prep.batch(random_images(64, 1))])
    scores = NacScorer(model, profile)(prep.batch(random_images(40, 2))).nac.numpy()
    calibration = Calibration(0.95, threshold_at_tpr(scores, 0.95), np.sort(scores), "t")
    return save_bundle(
        out,
        name=name,
        model_ref={"kind": "demo", "config": {"width": 8, "num_classes": 10}},
        model=model,
        preprocess=prep,
        classes=CLASSES,
        profile=profile,
        calibration=calibration,
    )
