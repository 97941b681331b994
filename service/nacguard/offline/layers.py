"""Candidate NAC layers of a classifier (``nacguard profile layers``) and a default choice.

A candidate is any sub-module whose output is a batch of vectors [B, N], feature maps
[B, N, H, W] or tokens [B, T, D] (D neurons, summed over tokens), found by running one small
batch through the model. The default set follows the paper's choices: the last three stages of
the network plus the penultimate (pooled) features that feed the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nacguard.imaging.preprocess import PreprocessSpec
from nacguard.nac.states import find_head

__all__ = ["Candidate", "candidate_layers", "format_layers"]

_BATCH = 2
_FLAT_GRAPH = 6  # an op-per-module graph (ONNX, FX) with more stages: group them by shape


@dataclass(frozen=True)
class Candidate:
    """One monitorable layer.

    Attributes:
        name: module name (what ``--layers`` takes).
        shape: output shape without the batch dimension.
        neurons: N, the number of NAC neurons (channels, features or token width).
        default: part of the default set.
    """

    name: str
    shape: tuple[int, ...]
    neurons: int
    default: bool = False


@dataclass
class _Seen:
    name: str
    module: nn.Module
    out: torch.Tensor
    in_shape: tuple[int, ...] | None


def _neurons(t: torch.Tensor) -> int:
    return int(t.shape[2] if t.dim() == 3 else t.shape[1])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def candidate_layers(model: nn.Module, preprocess: PreprocessSpec) -> list[Candidate]:
    """Every monitorable layer in execution order, the default set marked.

    Raises:
        ValueError: the model does not run on inputs of the preprocessing's shape.
    """
    seen: dict[str, _Seen] = {}
    inputs: dict[str, tuple[int, ...]] = {}
    head = find_head(model)
    head_in: list[torch.Tensor] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(_m: nn.Module, args: tuple[object, ...], name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, tuple(args[0].shape))

        def post(m: nn.Module, _a: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and name not in seen:
                seen[name] = _Seen(name, m, out, inputs.get(name))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda _m, a: head_in.append(a[0])))
    x = torch.randn(_BATCH, preprocess.channels, *preprocess.size)
    try:
        with torch.inference_mode():
            logits = model(x)
    except Exception as exc:
        raise ValueError(f"the model does not run on {list(x.shape)} inputs: {exc}") from None
    finally:
        for h in handles:
            h.remove()
    ordered = [
        s
        for s in seen.values()
        if 2 <= s.out.dim() <= 4 and s.out.shape[0] == _BATCH and not _same(s.out, logits)
    ]
    defaults = _defaults(ordered, head_in[0] if len(head_in) == 1 else None)
    return [
        Candidate(s.name, tuple(s.out.shape[1:]), _neurons(s.out), s.name in defaults)
        for s in ordered
    ]


def _defaults(ordered: list[_Seen], head_in: torch.Tensor | None) -> set[str]:
    names = {s.name for s in ordered}

    def parent_seen(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in names for i in range(1, len(parts)))

    penultimate = None
    if head_in is not None and head_in.dim() == 2:
        feeding = [s for s in ordered if _same(s.out, head_in)]
        penultimate = min(feeding, key=lambda s: s.name.count(".")) if feeding else None
    if penultimate is None:  # no plain head: the last pooled features before the logits
        pooled = [s for s in ordered if s.out.dim() == 2 or s.out.shape[2:].numel() == 1]
        penultimate = pooled[-1] if pooled else None
        while penultimate is not None:  # the first module of a run of views of it
            earlier = [s for s in pooled if _same(s.out, penultimate.out) and s is not penultimate]
            if not earlier or ordered.index(earlier[0]) > ordered.index(penultimate):
                break
            penultimate = earlier[0]
    stages: list[_Seen] = []
    for s in ordered:
        if s.out.dim() < 3 or parent_seen(s.name):
            continue
        children = [c for c in ordered if c.name.startswith(s.name + ".") and c.name.count(".")
                    == s.name.count(".") + 1 and c.out.shape == s.out.shape]  # fmt: skip
        # Transformer-like containers keep their input's shape: monitor their blocks instead.
        if (
            isinstance(s.module, nn.Sequential | nn.ModuleList)
            and len(children) >= 2
            and (s.in_shape == tuple(s.out.shape))
        ):
            stages += children
        else:
            stages.append(s)
    flat = all("." not in s.name for s in ordered)
    if flat and len(stages) > _FLAT_GRAPH:  # one module per op: the last op of each shape
        stages = [s for i, s in enumerate(stages)
                  if i + 1 == len(stages) or stages[i + 1].out.shape != s.out.shape]  # fmt: skip
    if penultimate is not None:
        stages = [s for s in stages if not _same(s.out, penultimate.out)]
    unique: list[_Seen] = []
    for s in stages:
        if not any(_same(s.out, u.out) for u in unique):
            unique.append(s)
    chosen = {s.name for s in unique[-3:]}
    if penultimate is not None:
        chosen.add(penultimate.name)
    return chosen


def format_layers(candidates: list[Candidate]) -> str:
    """A table: default mark, name, output shape, neurons."""
    width = max([len(c.name) for c in candidates] + [5])
    lines = [f"   {'layer':<{width}}  {'output':<18} neurons"]
    for c in candidates:
        mark = " * " if c.default else "   "
        shape = "x".join(str(d) for d in c.shape)
        lines.append(f"{mark}{c.name:<{width}}  {shape:<18} {c.neurons}")
    lines.append("* = default set (the last three stages and the pooled features of the head)")
    return "\n".join(lines)
