"""Tests of the bundled demo classifier and its trained weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from nacguard.bundle.refs.demo import DEMO_ARCHITECTURE, FashionCNN, build_demo_model, demo_config
from nacguard.offline.datasets import class_balanced_indices, fashion_mnist_dir, load_fashion_mnist

PROFILE = Path(__file__).resolve().parents[3] / "profiles" / "fashion-mnist"
WEIGHTS = PROFILE / "model.safetensors"
TRAINING = PROFILE / "training.json"


def stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)
        )
        for name in ("block1", "block2", "block3", "avgpool", "fc")
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_stage_shapes_and_names() -> None:
    torch.manual_seed(0)
    model = FashionCNN(width=8, num_classes=7).eval()
    outputs = stage_outputs(model, torch.randn(3, 1, 28, 28))
    assert outputs["block1"].shape == (3, 4, 14, 14)
    assert outputs["block2"].shape == (3, 8, 7, 7)
    assert outputs["block3"].shape == (3, 16, 7, 7)
    assert outputs["avgpool"].shape == (3, 16, 1, 1)
    assert outputs["fc"].shape == (3, 7)
    names = {name for name, _ in model.named_children()}
    assert names == {"block1", "block2", "block3", "avgpool", "fc"}
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.fc, nn.Linear)


def test_forward_is_the_documented_composition() -> None:
    # NAC's analytic head gradient relies on logits = fc(flatten(avgpool(...))).
    torch.manual_seed(1)
    model = FashionCNN(width=4).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        manual = model.fc(
            torch.flatten(model.avgpool(model.block3(model.block2(model.block1(x)))), 1)
        )
        torch.testing.assert_close(model(x), manual, rtol=0, atol=0)


def test_no_inplace_ops_overwrite_monitored_outputs() -> None:
    # A hook on an inner batch norm must see its own output, not the ReLU that follows.
    model = FashionCNN(width=4).eval()
    seen: list[torch.Tensor] = []
    model.block1[1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(torch.randn(2, 1, 28, 28))
    assert (seen[0] < 0).any()


def test_cost_budget() -> None:
    # Serving on CPU is the point of the demo: keep it about 11 MFLOP (5.6 M MACs) per image.
    model = FashionCNN().eval()
    macs = 0

    def count(module: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
            macs += out.numel() * per_output
        elif isinstance(module, nn.Linear):
            macs += out.numel() * module.in_features

    for module in model.modules():
        module.register_forward_hook(count)
    model(torch.zeros(1, 1, 28, 28))
    assert 4e6 < macs < 6e6


def test_build_demo_model() -> None:
    model = build_demo_model({"width": 16, "num_classes": 3})
    assert isinstance(model, FashionCNN) and not model.training
    assert demo_config(model) == {"width": 16, "num_classes": 3}
    assert demo_config(build_demo_model({})) == {"width": 32, "num_classes": 10}
    assert DEMO_ARCHITECTURE == "fashion-cnn"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"widht": 16}, "unknown"),
        ({"width": True}, "must be an int"),
        ({"width": 16.0}, "must be an int"),
        ({"width": 7}, "even"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_build_demo_model_rejects_bad_config(config: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_demo_model(config)


def test_works_on_other_devices_without_hardcoding() -> None:
    # The model takes whatever device its input and parameters are on; here: CPU, float64.
    model = FashionCNN(width=4).double().eval()
    assert model(torch.randn(1, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="demo weights not trained yet")
def test_bundled_weights_load_strictly() -> None:
    training = json.loads(TRAINING.read_text())
    assert training["architecture"] == DEMO_ARCHITECTURE
    assert training["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert training["test_accuracy"] >= 0.90
    assert WEIGHTS.stat().st_size < 1_000_000
    model = build_demo_model(training["config"])
    model.load_state_dict(safetensors.torch.load_file(str(WEIGHTS)), strict=True)

    if not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    # Sanity check of weights + recorded normalisation on a small balanced test subset.
    images, labels = load_fashion_mnist("test")
    pick = class_balanced_indices(labels, 500, seed=0)
    pre = training["preprocessing"]
    x = (torch.from_numpy(images[pick]).float() / 255.0 - pre["mean"][0]) / pre["std"][0]
    with torch.inference_mode():
        predicted = model(x.unsqueeze(1)).argmax(1).numpy()
    assert (predicted == labels[pick]).mean() > 0.85
