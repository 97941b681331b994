"""Model references: building classifiers from the small JSON-able dict a bundle stores, and
loading their weights safely.

* ``{"kind": "demo", "config": {"width": 32, "num_classes": 10}}``: the bundled demo net
  (:mod:`nacguard.bundle.refs.demo`);
* ``{"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}``: any
  torchvision classification architecture by name (:mod:`nacguard.bundle.refs.torchvision`).

Each kind is one module with ``parse(name, options) -> ref``, ``build(ref) -> nn.Module`` and
``display_name(ref) -> str``; a new kind is a new module and one entry in ``_KINDS``.

Weights are read from safetensors; a ``.pt``/``.pth`` state dict is accepted when building a
profile, and only through ``torch.load(weights_only=True)``, which does not unpickle code.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from nacguard.bundle.refs import demo, torchvision

__all__ = ["build_model", "kinds", "load_state_dict", "model_name", "parse_model_spec"]

_KINDS: dict[str, ModuleType] = {"demo": demo, "torchvision": torchvision}


def kinds() -> list[str]:
    """The model reference kinds this build knows."""
    return sorted(_KINDS)


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
    module = _KINDS.get(kind)
    if module is None:
        raise ValueError(f"unknown model kind {kind!r}: use demo[:k=v] or torchvision:NAME[:k=v]")
    ref: dict[str, Any] = module.parse(name, options)
    return ref


def build_model(ref: dict[str, Any]) -> nn.Module:
    """Instantiate the (untrained) architecture a model reference names.

    Raises:
        ValueError: unknown kind or architecture.
    """
    module = _KINDS.get(str(ref.get("kind")))
    if module is None:
        raise ValueError(f"unknown model kind {ref.get('kind')!r}")
    model: nn.Module = module.build(ref)
    return model


def model_name(ref: dict[str, Any]) -> str:
    """A short name of the architecture a reference names (for logs and metrics)."""
    module = _KINDS.get(str(ref.get("kind")))
    if module is None:
        return str(ref.get("name") or ref.get("arch") or ref.get("kind", "model"))
    return str(module.display_name(ref))


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
