"""What the model reference kinds share: lazy optional imports, options, weights, files."""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "Prepared",
    "artifact",
    "checked_artifact",
    "fit_state_dict",
    "optional_import",
    "parse_value",
    "read_weights",
    "sha256_file",
    "with_file",
]

# Checkpoint layouts that wrap the state dict one level down (timm's train script writes
# "state_dict" and "state_dict_ema"; other trainers write "model" or "module"). The EMA weights
# are what timm evaluates by default when present, so they are tried first.
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def optional_import(name: str, extra: str) -> ModuleType:
    """Import an optional dependency, or fail naming the extra that installs it.

    Raises:
        ValueError: the package is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(
            f"this model kind needs {name.split('.')[0]}: pip install 'nacguard[{extra}]'"
        ) from None


def parse_value(text: str) -> Any:
    """``k=v`` option values: ints, floats, true/false/none, lists (``16,32,64``), else text."""
    if "," in text:
        return [parse_value(v) for v in text.split(",") if v]
    lowered = text.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact(path: str | Path, suffixes: tuple[str, ...]) -> Path:
    """A model file named on the command line: must exist and have one of ``suffixes``.

    Raises:
        ValueError: missing, or another kind of file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"no such model file: {file}")
    if file.suffix not in suffixes:
        raise ValueError(f"{file}: expected a {' or '.join(suffixes)} file")
    return file


def checked_artifact(ref: Mapping[str, Any], root: Path | None) -> Path:
    """The model file a bundle's reference names, its sha256 checked against the reference.

    At build time (``root`` None) the reference still names the operator's source file.

    Raises:
        ValueError: missing file or sha256 mismatch.
    """
    if root is None:
        return Path(ref["source"])
    file = root / str(ref["file"])
    if not file.is_file():
        raise ValueError(f"bundle file missing: {file}")
    if sha256_file(file) != ref.get("file_sha256"):
        raise ValueError(f"{file}: sha256 does not match bundle.json (corrupt or replaced)")
    return file


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or a torch file read with ``weights_only=True``.

    Accepts checkpoint dicts that wrap the state dict (``state_dict``, ``state_dict_ema``,
    ``model``, ...) and strips a ``module.`` prefix (DataParallel/DDP checkpoints).

    Raises:
        ValueError: missing or unreadable file, or no state dict inside.
    """
    if not path.is_file():
        raise ValueError(f"no such weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # many types: truncated zip, pickle refusing a global, ...
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, failing with one line that lists the problems.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches (listed).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_listed(shapes, 4)}")
    if problems:
        raise ValueError(f"{what} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True)


class Prepared:
    """A model ready to profile, with what its kind knows about its inputs and outputs.

    Attributes:
        model: the classifier, in eval mode, weights loaded.
        ref: the reference to store in the bundle (JSON-able; names files relative to it).
        preprocess: ``PreprocessSpec`` fields the model's own config gives (None: none known).
        classes: class names the model carries (None: none).
        artifacts: files to copy into the bundle, bundle file name -> source path.
    """

    def __init__(
        self,
        model: nn.Module,
        ref: dict[str, Any],
        *,
        preprocess: dict[str, Any] | None = None,
        classes: list[str] | None = None,
        artifacts: dict[str, Path] | None = None,
    ) -> None:
        self.model = model.eval()
        self.ref = ref
        self.preprocess = preprocess
        self.classes = classes
        self.artifacts = artifacts or {}


def with_file(
    ref: dict[str, Any], source: Path, name: str
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The bundle reference of a model file copied into the bundle as ``name``."""
    final = {k: v for k, v in ref.items() if k != "source"}
    final.update({"file": name, "file_sha256": sha256_file(source)})
    return final, {name: source}
