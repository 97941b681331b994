"""Small models of every reference kind, written to disk the way their tools write them.

Nothing is downloaded: timm and Hugging Face architectures are built from configs with random
(seeded) weights. Each maker returns the ``--model`` text (and ``--weights`` where the kind takes
them), the layers to monitor and the model itself (to pick betas before building).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nacguard.cli import main
from tests.unit.nac.literal import literal_states
from tests.unit.nac.nets import tiny_net

CLASSES = ["a", "b", "c"]
SIZE = 32


@dataclass
class KindModel:
    """What ``profile build`` gets for one kind."""

    spec: str
    layers: list[str]
    model: nn.Module
    channels: int = 3
    extra_args: list[str] = field(default_factory=list)


def timm_resnet(tmp: Path) -> KindModel:
    """timm resnet10t, grayscale, weights saved as a DDP-style ``{"state_dict": module.*}``."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1).eval()
    weights = tmp / "resnet10t.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    return KindModel(
        "timm:resnet10t:num_classes=3:in_chans=1",
        ["layer3", "global_pool"],
        model,
        channels=1,
        extra_args=["--weights", str(weights), "--size", str(SIZE), "--resize", "none"],
    )


def timm_vit(tmp: Path) -> KindModel:
    """A two-block timm ViT on 32x32 RGB (token outputs [B, 17, 32])."""
    import timm
    from safetensors.torch import save_file

    kwargs = "img_size=32:patch_size=8:embed_dim=32:depth=2:num_heads=2:num_classes=3"
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
    ).eval()
    weights = tmp / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return KindModel(
        f"timm:vit_tiny_patch16_224:{kwargs}",
        ["blocks.1", "norm", "fc_norm"],
        model,
        extra_args=["--weights", str(weights)],
    )


def hf_vit(tmp: Path) -> KindModel:
    """A tiny Hugging Face ViT saved with save_pretrained (labels in id2label)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from nacguard.bundle.refs.hf import HfClassifier

    cfg = ViTConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg).eval()
    directory = tmp / "hf-vit"
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(directory)
    return KindModel(
        f"hf:{directory}", ["hf.vit.layers.1", "hf.vit.layernorm"], HfClassifier(model)
    )


def export_net(tmp: Path) -> KindModel:
    """The ResNet-shaped test net as a torch.export program with a dynamic batch."""
    model = tiny_net(3, classes=3)
    x = torch.randn(2, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    file = tmp / "net.pt2"
    torch.export.save(program, str(file))
    return KindModel(f"export:{file}", ["layer2", "layer3", "avgpool"], model)


def onnx_net(tmp: Path) -> KindModel:
    """The ResNet-shaped test net exported to ONNX (dynamic batch)."""
    model = tiny_net(4, classes=3)
    file = tmp / "net.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 3, SIZE, SIZE),),
        str(file),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    import onnx2torch

    converted = onnx2torch.convert(str(file)).eval()
    return KindModel(
        f"onnx:{file}", ["layer2/layer2/2/Relu", "avgpool/GlobalAveragePool"], converted
    )


FACTORY_SOURCE = '''
"""A user's own classifier whose logits are not its last nn.Linear's output."""

import torch
from torch import nn


class ScaledHead(nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        z = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(z) * 3.0 + z[:, :1]  # a temperature and a skip: not a plain head


def make(width=8, classes=3):
    torch.manual_seed(5)
    return ScaledHead(width, classes).eval()
'''


def python_factory(tmp: Path) -> KindModel:
    """``python:MODULE:FACTORY``: a module written to ``tmp`` (put it on sys.path/PYTHONPATH)."""
    import importlib
    import sys

    (tmp / "user_models.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    module = importlib.import_module("user_models")
    return KindModel("python:user_models:make:width=8", ["features", "pool"], module.make(8))


MAKERS = {
    "timm-resnet": timm_resnet,
    "timm-vit": timm_vit,
    "hf-vit": hf_vit,
    "export": export_net,
    "onnx": onnx_net,
    "python": python_factory,
}


def betas_for(model: torch.nn.Module, channels: int, layers: list[str]) -> dict[str, float]:
    """Betas that spread this random model's states over (0, 1), from its pooled products."""
    x = torch.randn(16, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    _, states = literal_states(model, x, dict.fromkeys(layers, 1.0))
    out = {}
    for name, s in states.items():
        s = np.clip(s, 1e-7, 1 - 1e-7)
        out[name] = float(f"{1.0 / (np.median(np.abs(np.log(s / (1 - s)))) + 1e-12):.4g}")
    return out


def build_kind_bundle(
    tmp: Path, kind: str, data: str, samples: int, calibration: int, saturation: float, m: int
) -> tuple[Path, dict[str, float]]:
    """Make ``kind``'s model in ``tmp`` and build a bundle of it through the CLI."""
    made = MAKERS[kind](tmp)
    betas = betas_for(made.model, made.channels, made.layers)
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp / "bundle"
    argv = ["profile", "build", "--model", made.spec, *made.extra_args, "--data", data]
    argv += ["--classes", str(tmp / "classes.txt"), "--out", str(out), "--batch-size", "16"]
    argv += ["--samples", str(samples), "--calibration-samples", str(calibration), "--layers"]
    argv += [f"{n}:{saturation:g}:{m}:{b}" for n, b in betas.items()]
    assert main(argv) == 0
    return out, betas
