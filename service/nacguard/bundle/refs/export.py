"""Model reference ``{"kind": "export", "file": "model.pt2", "file_sha256": ...}``: a
``torch.export`` program (``torch.export.save``), run through ``torch.export.unflatten`` so that
layers keep the original module names (``layer3``, ``blocks.1``) and no Python class is needed.

What loading trusts: ``torch.export.load`` reads the graph from JSON, but in torch 2.14 its
tensors and constants come through ``torch.load``, which falls back to ``weights_only=False``
(full unpickling, i.e. arbitrary code) when the weights-only reader refuses an entry, and some
constants are plain ``pickle.loads``. The graph itself also runs whatever ATen or registered
custom operators it names. So a ``.pt2`` file is trusted like code: it must be the operator's
own, never data a client sent. The bundle holds a copy whose sha256 is checked against
``bundle.json`` *before* it is opened, and the weights in ``model.safetensors`` are then loaded
over the program's own, strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nacguard.bundle.refs.common import Prepared, artifact, checked_artifact, with_file

__all__ = ["FILE", "build", "display_name", "input_shape", "parse", "prepare"]

KIND = "export"
FILE = "model.pt2"


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The build-time reference for ``export:FILE.pt2``.

    Raises:
        ValueError: missing file or options given.
    """
    if not name:
        raise ValueError("export model spec needs a file, e.g. export:model.pt2")
    if options:
        raise ValueError(f"export model specs take no options, got {sorted(options)}")
    return {"kind": KIND, "source": str(artifact(name, (".pt2",)))}


def _load(file: Path) -> Any:
    import torch

    try:
        return torch.export.load(str(file))
    except Exception as exc:
        raise ValueError(f"{file}: not a torch.export program ({type(exc).__name__})") from None


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The unflattened program (sha256 checked when loading from a bundle)."""
    import torch

    module: nn.Module = torch.export.unflatten(_load(checked_artifact(ref, root)))
    return module.eval() if hasattr(module, "eval") else module


def input_shape(ref: dict[str, Any], root: Path | None = None) -> tuple[int, ...] | None:
    """The example input's shape recorded in the program ([B, C, H, W]), if any."""
    program = _load(checked_artifact(ref, root))
    args = program.example_inputs[0] if program.example_inputs else ()
    return tuple(args[0].shape) if args else None


def prepare(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """The unflattened program; the bundle gets a copy of the file.

    Raises:
        ValueError: ``--weights`` given (the program holds its weights).
    """
    if weights is not None:
        raise ValueError("export programs hold their weights; drop --weights")
    model = build(ref)
    final, files = with_file(ref, Path(ref["source"]), FILE)
    shape = input_shape(ref)
    preprocess = None
    if shape is not None and len(shape) == 4:
        preprocess = {"mode": "L" if shape[1] == 1 else "RGB", "size": list(shape[2:])}
    return Prepared(model, final, preprocess=preprocess, artifacts=files)


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return KIND
