"""Model reference ``{"kind": "torchvision", "name": "resnet18", "kwargs": {...}}``: any
torchvision classification architecture by name (weights come from the bundle, never a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["build", "display_name", "parse"]

KIND = "torchvision"


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The reference for ``torchvision:NAME[:k=v]``.

    Raises:
        ValueError: no name.
    """
    if not name:
        raise ValueError("torchvision model spec needs a name, e.g. torchvision:resnet18")
    return {"kind": KIND, "name": name, "kwargs": options}


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The untrained architecture.

    Raises:
        ValueError: an unknown architecture name.
    """
    import torchvision

    name = ref["name"]
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; choose from {available}")
    model: nn.Module = torchvision.models.get_model(name, weights=None, **ref.get("kwargs", {}))
    return model


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return str(ref.get("name") or KIND)
