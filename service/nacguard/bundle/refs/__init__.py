"""Model references: building classifiers from the small JSON-able dict a bundle stores, and
loading their weights safely.

=============================  =========================================================
``--model``                    reference kind (module)
=============================  =========================================================
``demo[:width=N]``             the bundled demo net (:mod:`~nacguard.bundle.refs.demo`)
``torchvision:NAME[:k=v]``     a torchvision architecture by name (:mod:`~.torchvision`)
``timm:NAME[:k=v]``            a timm architecture (:mod:`~.timm`)
``hf:DIR``                     a Hugging Face image classifier (:mod:`~.hf`)
``export:FILE.pt2``            a ``torch.export`` program (:mod:`~.export`)
``onnx:FILE.onnx``             an ONNX graph converted to torch (:mod:`~.onnx`)
``python:MODULE:FACTORY``      the operator's own factory: code execution (:mod:`~.python`)
=============================  =========================================================

Each kind is one module with ``parse(name, options) -> ref``, ``build(ref, root) -> nn.Module``
(``root``: the bundle directory the reference's files live in; None at build time) and
``display_name(ref) -> str``; kinds that know more at build time (weights layouts, their own
preprocessing and class names, files to copy into the bundle) add ``prepare(ref, weights) ->
Prepared``. A new kind is a new module and one entry in ``_KINDS``.

Weights are read from safetensors; a ``.pt``/``.pth`` state dict is accepted when building a
profile, and only through ``torch.load(weights_only=True)``, which does not unpickle code.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from nacguard.bundle.refs import demo, export, hf, onnx, python, timm, torchvision
from nacguard.bundle.refs.common import Prepared, fit_state_dict, parse_value, read_weights

__all__ = [
    "Prepared",
    "build_model",
    "kinds",
    "load_state_dict",
    "model_name",
    "parse_model_spec",
    "prepare_model",
]

_KINDS: dict[str, ModuleType] = {
    "demo": demo,
    "torchvision": torchvision,
    "timm": timm,
    "hf": hf,
    "export": export,
    "onnx": onnx,
    "python": python,
}
# Kinds whose options are constructor kwargs (so --num-classes applies); the others name a file.
_TAKES_KWARGS = {"demo", "torchvision", "timm", "python"}


def kinds() -> list[str]:
    """The model reference kinds this build knows."""
    return list(_KINDS)


def parse_model_spec(spec: str, num_classes: int | None = None) -> dict[str, Any]:
    """Turn the CLI's ``--model`` text into a model reference.

    ``KIND[:NAME][:k=v...]``: the parts without ``=`` form the name (``python:pkg.mod:make``
    has the name ``pkg.mod:make``); ``k=v`` parts are options (ints, floats, true/false, lists
    as ``16,32``). For the file kinds (``hf``, ``export``, ``onnx``) everything is the name.

    Raises:
        ValueError: unknown kind or malformed options.
    """
    kind, _, rest = spec.partition(":")
    module = _KINDS.get(kind)
    if module is None:
        raise ValueError(f"unknown model kind {kind!r}; use one of: {', '.join(_KINDS)}")
    names: list[str] = []
    options: dict[str, Any] = {}
    if kind not in _TAKES_KWARGS:
        names = [rest] if rest else []
    else:
        for part in rest.split(":") if rest else []:
            key, eq, value = part.partition("=")
            if eq and key:
                options[key] = parse_value(value)
            elif part:
                names.append(part)
        if num_classes is not None:
            options["num_classes"] = num_classes
    if kind == "demo" and names:
        raise ValueError(f"malformed model spec {spec!r}: demo takes only k=v options")
    ref: dict[str, Any] = module.parse(":".join(names) or None, options)
    return ref


def build_model(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """Instantiate the architecture a model reference names (untrained, except ``export`` and
    ``onnx``, whose files hold their weights).

    Args:
        ref: the model reference.
        root: directory holding the reference's files (the bundle); None at build time.

    Raises:
        ValueError: unknown kind or architecture, a missing file, a failed sha256 check.
    """
    module = _KINDS.get(str(ref.get("kind")))
    if module is None:
        raise ValueError(f"unknown model kind {ref.get('kind')!r}; use one of: {', '.join(_KINDS)}")
    model: nn.Module = module.build(ref, root)
    return model


def prepare_model(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """Build time: the model with ``weights`` loaded (strictly) and what its kind knows (see
    :class:`~nacguard.bundle.refs.common.Prepared`).

    Raises:
        ValueError: as :func:`build_model`, or weights that do not fit (keys listed).
    """
    module = _KINDS.get(str(ref.get("kind")))
    if module is not None and hasattr(module, "prepare"):
        prepared: Prepared = module.prepare(ref, weights)
        return prepared
    model = build_model(ref)
    if weights is not None:
        fit_state_dict(model, read_weights(weights), f"weights {weights}")
    if isinstance(model, demo.FashionCNN):
        ref = {**ref, "config": demo.demo_config(model)}  # record the defaults too
    return Prepared(model, ref)


def model_name(ref: dict[str, Any]) -> str:
    """A short name of the architecture a reference names (for logs and metrics)."""
    module = _KINDS.get(str(ref.get("kind")))
    if module is None:
        return str(ref.get("name") or ref.get("arch") or ref.get("kind", "model"))
    return str(module.display_name(ref))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file without unpickling code
    (checkpoint wrappers such as ``{"state_dict": ...}`` and a ``module.`` prefix removed).

    Raises:
        ValueError: missing or unreadable file, or no state dict inside.
    """
    return read_weights(path)
