"""The bundled demo classifier: a small conv net for 1x28x28 Fashion-MNIST images.

The stages carry torchvision-ResNet-style names so that NAC layers are selected the same way for
the demo and for torchvision models: ``block1``, ``block2``, ``block3`` (conv stages, outputs
B x C x H x W), ``avgpool`` (B x C x 1 x 1, the penultimate features) and ``fc`` (the linear
head). The forward pass is exactly ``fc(flatten(avgpool(block3(block2(block1(x))))))``, which is
what lets the NAC code use the analytic head gradient for ``avgpool``.

Channel widths are ``width // 2`` (block1, 28x28 -> 14x14), ``width`` (block2, 14x14 -> 7x7) and
``2 * width`` (block3, 7x7). With the default ``width = 32`` that is about 5.6 M multiply-adds
(about 11 MFLOP) per image, cheap enough to serve on a CPU, and ~93% Fashion-MNIST test accuracy
after a few minutes of CPU training (see ``profiles/fashion-mnist/training.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEMO_ARCHITECTURE",
    "FashionCNN",
    "build",
    "build_demo_model",
    "demo_config",
    "display_name",
    "parse",
]

KIND = "demo"

#: The architecture name recorded in a bundle's model spec.
DEMO_ARCHITECTURE = "fashion-cnn"


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # bias=False: the batch norm that follows has its own shift, a conv bias would be redundant.
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        # Not in-place: any sub-module output (e.g. a batch norm) may be a monitored NAC layer,
        # and an in-place ReLU would overwrite it after a hook captured it.
        nn.ReLU(),
    ]


class FashionCNN(nn.Module):
    """Small VGG-style conv net for 1 x 28 x 28 inputs with named NAC-ready stages.

    Args:
        width: Base channel count; the stages have ``width // 2``, ``width`` and ``2 * width``
            channels. Must be an even number >= 2.
        num_classes: Number of output logits.

    Attributes:
        block1: Two conv-bn-relu layers and a 2x2 max-pool (28x28 -> 14x14).
        block2: Two conv-bn-relu layers and a 2x2 max-pool (14x14 -> 7x7).
        block3: One conv-bn-relu layer (7x7).
        avgpool: Global average pool, output ``B x 2*width x 1 x 1``.
        fc: Linear head ``2*width -> num_classes``.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even integer >= 2, got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.width = width
        self.num_classes = num_classes
        c1, c2, c3 = width // 2, width, 2 * width
        self.block1 = nn.Sequential(*_conv_bn_relu(1, c1), *_conv_bn_relu(c1, c1), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c2), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn_relu(c2, c3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Normalised images, ``B x 1 x 28 x 28`` (other sizes work: the pool is global).

        Returns:
            Logits, ``B x num_classes``.
        """
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def demo_config(model: FashionCNN) -> dict[str, int]:
    """The config that rebuilds ``model``'s architecture with :func:`build_demo_model`.

    Args:
        model: A demo model.

    Returns:
        ``{"width": ..., "num_classes": ...}``, JSON-able.
    """
    return {"width": model.width, "num_classes": model.num_classes}


def build_demo_model(config: Mapping[str, Any]) -> FashionCNN:
    """Build an (untrained) :class:`FashionCNN` from a bundle's model config.

    Args:
        config: Mapping with optional integer keys ``width`` (default 32) and ``num_classes``
            (default 10). Unknown keys are refused, so a typo cannot silently build the wrong
            architecture for a weights file.

    Returns:
        The model in eval mode, on the CPU, with freshly initialised weights.

    Raises:
        ValueError: On unknown keys or invalid values.
    """
    unknown = set(config) - {"width", "num_classes"}
    if unknown:
        raise ValueError(
            f"unknown {DEMO_ARCHITECTURE} config keys {sorted(unknown)}; "
            "valid keys: ['num_classes', 'width']"
        )
    values: dict[str, int] = {}
    for key, default in (("width", 32), ("num_classes", 10)):
        value = config.get(key, default)
        # bool is an int subclass; refuse it so {"width": true} is an error, not width 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{DEMO_ARCHITECTURE} config {key!r} must be an int, got {value!r}")
        values[key] = value
    return FashionCNN(**values).eval()


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The reference for ``demo[:width=N]`` (the demo has one architecture: ``name`` is
    ignored)."""
    return {"kind": KIND, "config": options}


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The untrained demo net of a ``{"kind": "demo", "config": {...}}`` reference."""
    return build_demo_model(ref.get("config", {}))


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return DEMO_ARCHITECTURE
