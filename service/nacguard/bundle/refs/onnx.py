"""Model reference ``{"kind": "onnx", "file": "model.onnx", "file_sha256": ...}``: an ONNX
classifier converted to an equivalent torch module with onnx2torch, so that NAC gets gradients
(``pip install 'nacguard[onnx]'``).

At build time the converted module's logits are compared with onnxruntime's on sample inputs; a
graph with an operator onnx2torch cannot convert, or a conversion whose logits differ by more
than ``ATOL`` (relative to the logits' scale), is refused. Layers are addressed by the converted
module names, which follow the ONNX node names (``layer1/layer1/2/Relu``, ``fc/Gemm``; list them
with ``nacguard profile layers``). Loading a bundle converts the copied file again (after its
sha256 check) and loads ``model.safetensors`` over it; ONNX files are protobuf, not pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nacguard.bundle.refs.common import (
    Prepared,
    artifact,
    checked_artifact,
    optional_import,
    with_file,
)

__all__ = ["ATOL", "FILE", "build", "display_name", "parse", "prepare", "verify"]

KIND = "onnx"
FILE = "model.onnx"
#: Largest accepted |torch - onnxruntime| logit difference, times max(1, max |logit|): float32
#: kernels of the two runtimes differ in summation order (~1e-6 relative); a wrong conversion is
#: off by orders of magnitude more.
ATOL = 1e-4


def parse(name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The build-time reference for ``onnx:FILE.onnx``.

    Raises:
        ValueError: missing file or options given.
    """
    if not name:
        raise ValueError("onnx model spec needs a file, e.g. onnx:model.onnx")
    if options:
        raise ValueError(f"onnx model specs take no options, got {sorted(options)}")
    return {"kind": KIND, "source": str(artifact(name, (".onnx",)))}


def _convert(file: Path) -> nn.Module:
    onnx = optional_import("onnx", "onnx")
    onnx2torch = optional_import("onnx2torch", "onnx")
    try:
        graph = onnx.load(str(file))
    except Exception as exc:
        raise ValueError(f"{file}: not an ONNX model ({type(exc).__name__})") from None
    _inline_identity_initializers(graph)
    try:
        module: nn.Module = onnx2torch.convert(graph)
    except NotImplementedError as exc:
        # onnx2torch names the operator: "Converter is not implemented (OperationDescription(
        # domain='', operation_type='Det', version=11))".
        raise ValueError(f"{file}: cannot convert to torch: {exc}") from None
    except Exception as exc:  # a converter that fails on this graph's shapes or attributes
        raise ValueError(f"{file}: cannot convert to torch ({type(exc).__name__}: {exc})") from None
    return module.eval()


def _inline_identity_initializers(graph: Any) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer under the output name.

    torch.onnx's exporter writes shared weights (e.g. batch norms folded into convolutions) as
    Identity nodes over one initializer; onnx2torch wants the weights of a Conv or Gemm to be
    initializers themselves. The graph computes the same either way.
    """
    inits = {t.name: t for t in graph.graph.initializer}
    keep = []
    for node in graph.graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            copy = type(inits[node.input[0]])()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.graph.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(graph.graph.node):
        del graph.graph.node[:]
        graph.graph.node.extend(keep)


def build(ref: dict[str, Any], root: Path | None = None) -> nn.Module:
    """The converted module (the file's sha256 checked when loading from a bundle)."""
    return _convert(checked_artifact(ref, root))


def input_shape(file: Path) -> list[int | None]:
    """The graph input's shape, None where a dimension is symbolic."""
    onnx = optional_import("onnx", "onnx")
    dims = onnx.load(str(file)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def verify(module: nn.Module, file: Path, x: torch.Tensor) -> float:
    """Compare the converted module with onnxruntime on ``x``; return the max difference.

    Raises:
        ValueError: the difference exceeds ``ATOL`` (scaled), or onnxruntime cannot run it.
    """
    ort = optional_import("onnxruntime", "onnx")
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    expected = session.run(None, {name: x.numpy()})[0]
    with torch.inference_mode():
        got = module(x).float().numpy()
    if got.shape != expected.shape:
        raise ValueError(
            f"{file}: converted model gives shape {got.shape}, onnxruntime {expected.shape}"
        )
    diff = float(np.max(np.abs(got - expected)))
    limit = ATOL * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= limit:
        raise ValueError(
            f"{file}: the torch conversion differs from onnxruntime by {diff:.3g} "
            f"(limit {limit:.3g}); refusing an unfaithful conversion"
        )
    return diff


def prepare(ref: dict[str, Any], weights: Path | None) -> Prepared:
    """Convert, check the conversion against onnxruntime, and keep a copy of the file.

    Raises:
        ValueError: ``--weights`` given, an unconvertible operator or an unfaithful conversion.
    """
    if weights is not None:
        raise ValueError("onnx models hold their weights; drop --weights")
    source = Path(ref["source"])
    module = build(ref)
    shape = input_shape(source)
    channels = shape[1] if len(shape) == 4 and shape[1] else 3
    size = [d or 224 for d in shape[2:]] if len(shape) == 4 else [224, 224]
    batch = shape[0] or 4
    gen = torch.Generator().manual_seed(0)
    verify(module, source, torch.randn(batch, channels, *size, generator=gen))
    final, files = with_file(ref, source, FILE)
    preprocess = {"mode": "L" if channels == 1 else "RGB", "size": size}
    return Prepared(module, final, preprocess=preprocess, artifacts=files)


def display_name(ref: dict[str, Any]) -> str:
    """A short architecture name for logs and metrics."""
    return KIND
