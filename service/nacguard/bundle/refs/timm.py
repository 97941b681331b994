"""Model reference ``{"kind": "timm", "name": "resnet10t", "kwargs": {...}}``: any timm
architecture by name (``pip install 'nacguard[timm]'``). Weights come from ``--weights`` (timm's
checkpoint layouts are accepted) and then from the bundle, never from a hub; preprocessing comes
from timm's data config for the model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from nacguard.bundle.refs.common import Prepared, fit_state_dict, optional_import, read_weights

__all__ = ["build", "display_name", "parse", "prepare"]

KIND = "timm"


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The reference for ``timm:NAME[:k=v...]`` (options are ``timm.create_model`` kwargs).

    Raises:
        ValueError: no name.
    """
    if not name:
        raise ValueError("timm model spec needs a name, e.g. timm:resnet10t:num_classes=10")
    return {"kind": KIND, "name": name, "kwargs": options}


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The untrained architecture (``pretrained=False``: nothing is downloaded).

    Raises:
        ValueError: timm missing, or an unknown architecture.
    """
    timm = optional_import("timm", "timm")
    name = ref["name"]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm model {name!r}; similar names: {close}")
    model: nn.Module = timm.create_model(name, pretrained=False, **ref.get("kwargs", {}))
    return model.eval()


def data_config(model: nn.Module) -> dict[str, Any]:
    """``PreprocessSpec`` fields from timm's data config for ``model``.

    timm's config reports the pretrained input size; a model built with other ``img_size`` or
    ``in_chans`` kwargs says so on its patch embedding or first convolution, which wins.
    """
    timm_data = optional_import("timm.data", "timm")
    cfg = timm_data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    # timm's eval transform: resize the shorter side to floor(size / crop_pct), centre crop.
    resize = math.floor(min(h, w) / crop_pct) if crop_pct < 1.0 else None
    interpolation = str(cfg.get("interpolation") or "bilinear")
    return {
        "mode": "L" if channels == 1 else "RGB",
        "size": [int(h), int(w)],
        "resize": resize,
        "mean": list(mean),
        "std": list(std),
        "interpolation": interpolation if interpolation != "random" else "bilinear",
    }


def prepare(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """The model with ``weights`` loaded (strictly), and timm's preprocessing for it."""
    model = build(ref)
    if weights is not None:
        fit_state_dict(model, read_weights(weights), f"weights {weights}")
    return Prepared(model, ref, preprocess=data_config(model))


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return str(ref.get("name") or KIND)
