"""Checkpoints to rank: ``PATH[=NAME]`` texts, their model references and weights, and the
default NAC-ME layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from nacguard.bundle.refs import build_model, load_state_dict, parse_model_spec
from nacguard.nac.config import LayerConfig

__all__ = ["DEFAULT_LAYER", "Checkpoint", "default_layers", "load_checkpoint", "parse_checkpoint"]

#: The paper's NAC-ME settings (ResNet avgpool): O = 500, M = 50, beta = 0.1. ``LayerConfig.parse``
#: uses them for a bare layer name.
DEFAULT_LAYER = LayerConfig("avgpool", beta=0.1, saturation=500.0, n_edges=50)


@dataclass(frozen=True)
class Checkpoint:
    """A weights file and the architecture it belongs to.

    Attributes:
        name: label used in tables and the ranking (unique within one evaluation).
        path: ``.safetensors`` state dict, or a ``.pt``/``.pth`` one (loaded weights-only).
        spec: the ``--model`` text of the architecture (``demo:width=16``).
        model_ref: the parsed model reference (see ``nacguard.bundle.refs``).
    """

    name: str
    path: Path
    spec: str
    model_ref: dict[str, Any]


def parse_checkpoint(
    text: str, default_spec: str | None, num_classes: int | None = None
) -> Checkpoint:
    """Parse the CLI's ``PATH`` or ``PATH@SPEC`` checkpoint syntax.

    ``@SPEC`` names the architecture of that one file (checkpoints of different widths can be
    ranked together); without it the ``--model`` default applies. A path that exists as given is
    never split, so a file name containing ``@`` still works.

    Args:
        text: the checkpoint argument.
        default_spec: the ``--model`` value, or None.
        num_classes: optional class count forced onto the architecture.

    Raises:
        ValueError: no architecture for the file, or a malformed spec.
        FileNotFoundError: the weights file does not exist.
    """
    path, spec = Path(text), default_spec
    if not path.is_file() and "@" in text:
        head, _, spec = text.rpartition("@")
        path = Path(head)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not spec:
        raise ValueError(f"checkpoint {path}: give --model SPEC or write it as {path}@SPEC")
    ref = parse_model_spec(spec, num_classes)
    return Checkpoint(name=path.stem, path=path, spec=spec, model_ref=ref)


def load_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """Build the architecture, load the state dict strictly, and return the model in eval mode.

    Raises:
        ValueError: the state dict does not fit the architecture (with a hint).
    """
    model = build_model(checkpoint.model_ref)
    state = load_state_dict(checkpoint.path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint {checkpoint.path} does not fit {checkpoint.spec!r} ({first}); "
            "give its architecture as PATH@SPEC"
        ) from None
    return model.eval()


def default_layers(model: nn.Module) -> list[LayerConfig]:
    """The paper's NAC-ME layer: ``avgpool`` with O = 500, M = 50, beta = 0.1.

    Raises:
        ValueError: the model has no ``avgpool`` module (name the layers with ``--layers``).
    """
    names = {name for name, _ in model.named_modules()}
    if DEFAULT_LAYER.name not in names:
        valid = ", ".join(n for n, _ in model.named_modules() if n)
        raise ValueError(
            f"the model has no {DEFAULT_LAYER.name!r} layer: give --layers NAME[:O:M:BETA]; "
            f"valid layer names: {valid}"
        )
    return [DEFAULT_LAYER]
