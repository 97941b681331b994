"""Model reference ``{"kind": "python", "module": "pkg.models", "factory": "make", "kwargs":
{...}}``: the operator's own ``nn.Module``, built by calling an importable factory.

This is code execution by design: loading such a bundle imports ``module`` and calls
``factory(**kwargs)``. Only the operator's configuration names a bundle (``NACGUARD_PROFILE`` or
``--profile``); nothing a client sends reaches a model reference, so a client cannot choose the
code. Install the module in the image (it is imported, never read from the bundle).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from nacguard.bundle.refs.common import Prepared, fit_state_dict, read_weights

__all__ = ["build", "display_name", "parse", "prepare"]

KIND = "python"


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The reference for ``python:MODULE:FACTORY[:k=v...]``.

    Raises:
        ValueError: not MODULE:FACTORY.
    """
    module, _, factory = (name or "").partition(":")
    if not module or not factory or ":" in factory:
        raise ValueError("python model spec is python:MODULE:FACTORY[:k=v], e.g. python:pkg:make")
    return {"kind": KIND, "module": module, "factory": factory, "kwargs": options}


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """Import the module and call the factory.

    Raises:
        ValueError: the module or factory is missing, or the factory returns no ``nn.Module``.
    """
    try:
        module = importlib.import_module(ref["module"])
    except ImportError as exc:
        raise ValueError(f"cannot import {ref['module']!r}: {exc}") from None
    factory = getattr(module, ref["factory"], None)
    if not callable(factory):
        raise ValueError(f"{ref['module']} has no callable {ref['factory']!r}")
    model = factory(**ref.get("kwargs", {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"{ref['module']}:{ref['factory']} returned {type(model).__name__}")
    return model.eval()


def prepare(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """The factory's model, with ``weights`` loaded strictly when given."""
    model = build(ref)
    if weights is not None:
        fit_state_dict(model, read_weights(weights), f"weights {weights}")
    return Prepared(model, ref)


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return f"{ref.get('module')}:{ref.get('factory')}"
