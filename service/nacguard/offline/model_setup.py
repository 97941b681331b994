"""The model side of ``profile build|layers|tune``: ``--model`` and its weights, preprocessing
options, class names, and the files a bundle must carry (see :mod:`nacguard.bundle.refs`)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nacguard.imaging.preprocess import INTERPOLATIONS, PRESETS, PreprocessSpec
from nacguard.nac import LayerConfig

__all__ = [
    "ModelSetup",
    "add_model_arguments",
    "copy_artifacts",
    "output_count",
    "read_classes",
    "setup_model",
]

log = logging.getLogger(__name__)

_GRAY = {"mean": [0.449], "std": [0.226]}  # the ImageNet statistics averaged over channels


@dataclass
class ModelSetup:
    """A model ready to profile, and everything a bundle records about it."""

    model: nn.Module
    ref: dict[str, Any]
    preprocess: PreprocessSpec
    classes: list[str] | None
    layers: list[LayerConfig] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--num-classes``, ``--classes`` and the preprocessing flags."""
    parser.add_argument(
        "--model",
        required=True,
        help="demo[:k=v], torchvision:NAME[:k=v], timm:NAME[:k=v], hf:DIR, export:FILE.pt2, "
        "onnx:FILE.onnx, python:MODULE:FACTORY[:k=v] (runs that code), or a bundle dir",
    )
    parser.add_argument(
        "--weights", help="state dict (.safetensors, or .pt/.pth loaded weights-only)"
    )
    parser.add_argument("--num-classes", type=int)
    parser.add_argument(
        "--classes", help="class names: a file with one per line, or a,b,c (default: model/data)"
    )
    g = parser.add_argument_group("preprocessing (stored in the bundle; override model configs)")
    g.add_argument("--preprocess", help="preset (imagenet, fashion-mnist) or a JSON spec")
    g.add_argument("--color", choices=["L", "RGB"], help="colour mode: L (1 channel) or RGB")
    g.add_argument("--size", help="model input size: N or HxW")
    g.add_argument(
        "--resize",
        help="shorter side before the centre crop to --size; 'none' resizes straight to --size",
    )
    g.add_argument("--interpolation", choices=sorted(INTERPOLATIONS))
    g.add_argument("--mean", help="per-channel mean, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def _fit_channels(values: list[float], channels: int) -> list[float]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return [sum(values) / len(values)] if channels == 1 else values


def preprocess_from(base: dict[str, Any], args: argparse.Namespace) -> PreprocessSpec:
    """``base`` (preset or the model's config), then ``--preprocess``, then single options."""
    spec = dict(base)
    if getattr(args, "preprocess", None):
        preset = PRESETS.get(args.preprocess)
        spec = preset.to_dict() if preset else json.loads(args.preprocess)
    if getattr(args, "color", None):
        spec["mode"] = args.color
    if getattr(args, "size", None):
        h, _, w = args.size.lower().partition("x")
        try:
            spec["size"] = [int(h), int(w or h)]
        except ValueError:
            raise ValueError(f"--size expects N or HxW, got {args.size!r}") from None
    if getattr(args, "resize", None):
        spec["resize"] = None if args.resize.lower() == "none" else int(args.resize)
    if getattr(args, "interpolation", None):
        spec["interpolation"] = args.interpolation
    for key in ("mean", "std"):
        if getattr(args, key, None):
            spec[key] = _floats(getattr(args, key), f"--{key}")
    channels = 1 if spec.get("mode") == "L" else 3
    for key in ("mean", "std"):
        spec[key] = _fit_channels(list(spec[key]), channels)
    return PreprocessSpec.from_dict(spec)


def _base_preprocess(kind: str, known: dict[str, Any] | None) -> dict[str, Any]:
    base = PRESETS["fashion-mnist" if kind == "demo" else "imagenet"].to_dict()
    if known:
        if known.get("mode") == "L" and "mean" not in known:
            base.update(_GRAY)
        if "size" in known and "resize" not in known:
            base["resize"] = None  # a fixed input size: resize to it, no crop
        base.update(known)
    return base


def read_classes(text: str, n_outputs: int | None = None) -> list[str]:
    """Class names from a file (one per line) or a comma-separated list.

    Raises:
        ValueError: empty, or not ``n_outputs`` names.
    """
    file = Path(text)
    if file.is_file():
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        where = f"{file}"
    else:
        names, where = [n for n in text.split(",") if n], "--classes"
    if not names:
        raise ValueError(f"{where}: no class names")
    if n_outputs is not None and len(names) != n_outputs:
        raise ValueError(
            f"{where} has {len(names)} class names but the model has {n_outputs} outputs"
        )
    return names


def output_count(model: nn.Module, preprocess: PreprocessSpec) -> int:
    """Number of logits the model gives for one input of the preprocessing's shape.

    Raises:
        ValueError: the model does not take such inputs, or does not return [B, C] logits.
    """
    x = torch.zeros(1, preprocess.channels, *preprocess.size)
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:
        raise ValueError(
            f"the model does not take {list(x.shape)} inputs ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); set --color/--size"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model must return logits [B, C], got {type(out).__name__}")
    return int(out.shape[1])


def setup_model(args: argparse.Namespace) -> ModelSetup:
    """The model ``--model`` names, weights loaded, preprocessing and class names resolved.

    Raises:
        ValueError: bad spec, missing files, weights that do not fit, wrong class count, ...
    """
    from nacguard.bundle import load_bundle
    from nacguard.bundle.refs import parse_model_spec, prepare_model

    candidate = Path(args.model)
    if (candidate / "bundle.json").is_file():
        bundle = load_bundle(candidate)
        ref = {k: v for k, v in bundle.meta["model"].items() if k not in {"weights", "sha256"}}
        artifacts = {ref["file"]: candidate / ref["file"]} if "file" in ref else {}
        return ModelSetup(
            bundle.model,
            ref,
            preprocess_from(bundle.preprocess.to_dict(), args),
            read_classes(args.classes, len(bundle.classes)) if args.classes else bundle.classes,
            list(bundle.profile.configs),
            artifacts,
        )
    ref = parse_model_spec(args.model, args.num_classes)
    torch.manual_seed(getattr(args, "seed", 0))  # random weights are the same on every rank
    prepared = prepare_model(ref, Path(args.weights) if args.weights else None)
    if not args.weights and ref["kind"] in {"torchvision", "timm", "python"}:
        log.warning("no --weights given: profiling randomly initialised weights")
    preprocess = preprocess_from(_base_preprocess(ref["kind"], prepared.preprocess), args)
    n = output_count(prepared.model, preprocess)
    classes = read_classes(args.classes, n) if args.classes else prepared.classes
    if classes is not None and len(classes) != n:
        raise ValueError(f"the model carries {len(classes)} class names but has {n} outputs")
    return ModelSetup(prepared.model, prepared.ref, preprocess, classes, [], prepared.artifacts)


def copy_artifacts(setup: ModelSetup, out: Path) -> None:
    """Copy the files the reference names into the bundle directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, source in setup.artifacts.items():
        target = out / name
        if not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)
