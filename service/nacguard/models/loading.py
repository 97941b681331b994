"""Building classifiers from a model reference and loading their weights safely.

A model reference is a small JSON-able dict stored in the bundle:

* ``{"kind": "demo", "config": {"width": 32, "num_classes": 10}}`` — the bundled demo net;
* ``{"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}`` — any
  torchvision classification architecture by name (weights come from the bundle, never a hub).

Weights are read from safetensors; a ``.pt``/``.pth`` state dict is accepted when building a
profile, and only through ``torch.load(weights_only=True)``, which does not unpickle code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from nacguard.models.demo import build_demo_model

__all__ = ["build_model", "load_state_dict", "parse_model_spec", "sha256_file"]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_model_spec(spec: str, num_classes: int | None = None) -> dict[str, Any]:
    """Turn the CLI's ``--model`` text into a model reference.

    ``demo``, ``demo:width=16``, ``torchvision:resnet18``, ``torchvision:resnet18:num_classes=10``.

    Raises:
        ValueError: unknown kind or malformed options.
    """
    kind, _, rest = spec.partition(":")
    parts = [p for p in rest.split(":") if p] if rest else []
    options: dict[str, Any] = {}
    name = None
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            options[key] = int(value) if value.lstrip("-").isdigit() else value
        elif name is None:
            name = part
        else:
            raise ValueError(f"malformed model spec {spec!r}")
    if num_classes is not None:
        options["num_classes"] = num_classes
    if kind == "demo":
        return {"kind": "demo", "config": options}
    if kind == "torchvision":
        if not name:
            raise ValueError("torchvision model spec needs a name, e.g. torchvision:resnet18")
        return {"kind": "torchvision", "name": name, "kwargs": options}
    raise ValueError(f"unknown model kind {kind!r}: use demo[:k=v] or torchvision:NAME[:k=v]")


def build_model(ref: dict[str, Any]) -> nn.Module:
    """Instantiate the (untrained) architecture a model reference names.

    Raises:
        ValueError: unknown kind or architecture.
    """
    kind = ref.get("kind")
    if kind == "demo":
        return build_demo_model(ref.get("config", {}))
    if kind == "torchvision":
        import torchvision

        name = ref["name"]
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(f"unknown torchvision model {name!r}; choose from {available}")
        return torchvision.models.get_model(name, weights=None, **ref.get("kwargs", {}))
    raise ValueError(f"unknown model kind {kind!r}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file without unpickling code."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict")
    return obj
