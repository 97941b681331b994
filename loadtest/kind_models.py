"""One network in every model reference kind, for ``nac_bench.py --kinds``.

A torchvision ResNet (random weights) is the eager reference; the ``export`` and ``onnx`` kinds
are that very network saved with ``torch.export`` / ``torch.onnx`` and loaded the way a bundle
loads them; ``timm`` and ``python`` build the same architecture eagerly (timm's own resnet18,
and a factory); ``hf`` is a Hugging Face ResNet of the same shape, measured against calling the
Hugging Face model directly (its eager self, without the logits wrapper).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from nacguard.bundle.refs import build_model, parse_model_spec
from nacguard.bundle.refs.hf import HfClassifier

__all__ = ["kind_models"]


def _export(eager: nn.Module, x: torch.Tensor, tmp: Path) -> nn.Module:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(eager, (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp / "m.pt2"))
    return build_model(parse_model_spec(f"export:{tmp / 'm.pt2'}"))


def _onnx(eager: nn.Module, x: torch.Tensor, tmp: Path) -> nn.Module:
    torch.onnx.export(eager, (x[:2],), str(tmp / "m.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)  # fmt: skip
    return build_model(parse_model_spec(f"onnx:{tmp / 'm.onnx'}"))


def _hf() -> tuple[nn.Module, nn.Module]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                       embedding_size=64, num_labels=1000)  # fmt: skip
    model = ResNetForImageClassification(cfg).eval()

    class Direct(nn.Module):  # the eager baseline: the same model called as users call it
        def __init__(self) -> None:
            super().__init__()
            self.hf = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hf(x).logits  # type: ignore[no-any-return]

    return Direct().eval(), HfClassifier(model).eval()


def kind_models(arch: str, x: torch.Tensor) -> dict[str, tuple[nn.Module, nn.Module]]:
    """kind -> (eager reference, the kind's module), on the CPU, eval mode."""
    torch.manual_seed(0)
    eager = torchvision.models.get_model(arch, weights=None).eval()
    tmp = Path(tempfile.mkdtemp(prefix="nac-bench-"))
    makers: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
        "torchvision": lambda: (eager, eager),
        "export": lambda: (eager, _export(eager, x, tmp)),
        "onnx": lambda: (eager, _onnx(eager, x, tmp)),
        "timm": lambda: (eager, build_model(parse_model_spec(f"timm:{arch}"))),
        "hf": _hf,
    }
    out = {}
    for kind, make in makers.items():
        try:
            out[kind] = make()
        except ValueError as exc:  # an optional extra not installed
            print(f"skipping {kind}: {exc}")
    return out
