"""Model reference ``{"kind": "hf", "config": {...}}``: a Hugging Face image classifier
(``pip install 'nacguard[hf]'``).

``profile build --model hf:DIR`` reads a local ``save_pretrained`` directory (``config.json`` and
``model.safetensors``, local files only, never a hub, never a pickled ``.bin``); the bundle stores
the model's config inline and its weights in ``model.safetensors``, so serving needs no DIR.
Preprocessing comes from ``preprocessor_config.json``, class names from ``id2label``. The model
is wrapped so that its forward returns ``.logits``; layers are addressed by the Hugging Face
module names under ``hf.`` (``hf.vit.layers.1``, ``hf.classifier``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nacguard.bundle.refs.common import Prepared, optional_import

__all__ = ["HfClassifier", "build", "display_name", "parse", "prepare"]

KIND = "hf"
# Pillow's resampling codes, which ``preprocessor_config.json`` stores as "resample".
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HfClassifier(nn.Module):
    """A Hugging Face image classifier whose forward returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of pixel values [B, C, H, W]."""
        logits: torch.Tensor = self.hf(pixel_values=x).logits
        return logits


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The build-time reference for ``hf:DIR``.

    Raises:
        ValueError: no directory, or options (the directory's config says everything).
    """
    if not name:
        raise ValueError("hf model spec needs a directory, e.g. hf:./my-model")
    if options:
        raise ValueError(f"hf model specs take no options, got {sorted(options)}")
    return {"kind": KIND, "source": name}


def _from_config(config: dict[str, Any]) -> nn.Module:
    transformers = optional_import("transformers", "hf")
    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if not model_type:
        raise ValueError("hf config has no model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **settings)
    model: nn.Module = transformers.AutoModelForImageClassification.from_config(cfg)
    return model


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The (untrained) wrapped architecture from the config stored in the reference."""
    return HfClassifier(_from_config(ref["config"])).eval()


def _preprocess(directory: Path, channels: int) -> dict[str, Any] | None:
    file = directory / "preprocessor_config.json"
    if not file.is_file():
        return None
    cfg = json.loads(file.read_text())
    size = cfg.get("size") or {}
    crop = cfg.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    out: dict[str, Any] = {"mode": "L" if channels == 1 else "RGB"}
    if cfg.get("do_center_crop") and crop:
        out["size"] = [int(crop["height"]), int(crop["width"])]
        out["resize"] = int(size.get("shortest_edge") or min(size["height"], size["width"]))
    elif "height" in size:
        out["size"], out["resize"] = [int(size["height"]), int(size["width"])], None
    elif "shortest_edge" in size:
        # ConvNeXt-style: resize the shorter side to shortest_edge / crop_pct, crop the centre.
        edge = int(size["shortest_edge"])
        out["size"] = [edge, edge]
        crop_pct = cfg.get("crop_pct")
        out["resize"] = int(edge / crop_pct) if crop_pct else edge
    if cfg.get("do_normalize", True) and "image_mean" in cfg:
        mean, std = list(cfg["image_mean"]), list(cfg["image_std"])
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    out["mean"], out["std"] = mean, std
    out["interpolation"] = _RESAMPLE.get(int(cfg.get("resample", 2)), "bilinear")
    return out


def prepare(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """Load ``DIR`` (local files, safetensors only) and read its preprocessing and labels.

    Raises:
        ValueError: missing directory or files, or ``--weights`` given (DIR holds the weights).
    """
    if weights is not None:
        raise ValueError("hf models take their weights from DIR/model.safetensors, not --weights")
    directory = Path(ref["source"]).expanduser()
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a Hugging Face model directory (no {name})")
    transformers = optional_import("transformers", "hf")
    model = transformers.AutoModelForImageClassification.from_pretrained(
        str(directory), local_files_only=True, use_safetensors=True
    )
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    id2label = model.config.id2label or {}
    classes = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
    channels = int(getattr(model.config, "num_channels", 3))
    final = {"kind": KIND, "architecture": type(model).__name__, "config": config}
    return Prepared(
        HfClassifier(model),
        final,
        preprocess=_preprocess(directory, channels),
        classes=classes,
    )


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return str(ref.get("architecture") or KIND)
