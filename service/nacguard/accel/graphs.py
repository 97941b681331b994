"""Compiled NAC state paths through FX graphs of the model.

The model is traced once with ``torch.fx`` (torchvision's feature-extraction tracer) into graphs
that return exactly what each path needs, and those graphs are compiled: the plain forward
(logits), the analytic-head NAC path (logits and pooled features, one forward under
``inference_mode``), and the multi-layer NAC path with the "probe" trick: the stem and the first
monitored stage run without grad, their output enters the compiled upper part as an input, and
a zero *probe* input is added to every monitored output inside it. The gradient with respect to
a probe is the gradient with respect to that activation (compiled graphs cannot be
differentiated with respect to their own intermediates, but they can with respect to their
inputs). A probe has shape [B, N, 1, 1] and is added in fp32, so its gradient *is* the fp32
spatial sum ``sum_hw(dL/dz)`` that the state needs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from nacguard.nac.states import (
    find_head,
    fp32_linear,
    reads_fp32,
    sum_spatial,
)

__all__ = ["BaseGraph", "features_graph", "plain_graph", "probe_graphs", "probe_shape", "trace"]

log = logging.getLogger(__name__)

_LOGITS = "__nacguard_logits__"


class _Fp32Linear(nn.Module):
    """The head computed in fp32 with autocast off (the NAC precision rule, inside a graph)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.head, x)


class _Fp32Input(nn.Module):
    """Runs a pooling module on an fp32 copy of its input (the NAC precision rule)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())


def _probe_add(z: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """``z + probe`` added in fp32 and returned in z's dtype: the value of z exactly (the probe
    is zero), and the probe's gradient is the fp32 sum of dL/dz over the broadcast dims."""
    return (z.float() + probe).to(z.dtype)


def probe_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Probe shape for one sample's monitored output of ``shape`` (batch dim included as 1)."""
    if len(shape) == 4:
        return (1, shape[1], 1, 1)
    if len(shape) == 3:
        return (1, 1, shape[2])
    if len(shape) == 2:
        return (1, shape[1])
    raise ValueError(f"cannot probe a monitored output of shape {tuple(shape)}")


@dataclass
class BaseGraph:
    """The traced model: returns every monitored output and the logits."""

    module: fx.GraphModule
    names: list[str]
    head_target: str | None


def trace(model: nn.Module, names: Sequence[str]) -> BaseGraph:
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    _, eval_nodes = get_graph_node_names(model)
    last = eval_nodes[-1]
    if last in names:
        raise ValueError(f"monitoring the logits node {last!r} is not supported by the graphs")
    return_nodes = {n: n for n in names} | {last: _LOGITS}
    fe = create_feature_extractor(model, return_nodes=return_nodes)
    graph = getattr(fe, "eval_graph", fe.graph)
    gm = fx.GraphModule(fe, graph)
    head = find_head(model)  # the same head the extractor uses
    head_target = None
    for node in gm.graph.nodes:
        if node.op == "call_module" and head is not None and gm.get_submodule(node.target) is head:
            head_target = str(node.target)
    return BaseGraph(gm, list(names), head_target)


def _outputs(graph: fx.Graph) -> tuple[fx.Node, dict[str, fx.Node]]:
    out = next(n for n in graph.nodes if n.op == "output")
    mapping = out.args[0]
    assert isinstance(mapping, dict)
    return out, dict(mapping)


def _finish(
    base: BaseGraph, graph: fx.Graph, *, fp32_rules: bool, monitored: Sequence[fx.Node] = ()
) -> fx.GraphModule:
    """A GraphModule over ``graph``; under mixed precision the NAC precision rules are applied by
    pointing call sites at wrapper modules that live only in this GraphModule."""
    gm = fx.GraphModule(base.module, graph)
    if fp32_rules:
        monitored_ids = {id(n) for n in monitored}
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            target = str(node.target)
            if target == base.head_target:
                head = gm.get_submodule(target)
                assert isinstance(head, nn.Linear)
                name = "_nacguard_fp32_head"
                gm.add_submodule(name, _Fp32Linear(head))
                node.target = name
            elif id(node) in monitored_ids and reads_fp32(gm.get_submodule(target)):
                name = f"_nacguard_fp32_in_{len(list(gm.children()))}"
                gm.add_submodule(name, _Fp32Input(gm.get_submodule(target)))
                node.target = name
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def plain_graph(base: BaseGraph) -> fx.GraphModule:
    graph = copy.deepcopy(base.module.graph)
    out, outs = _outputs(graph)
    logits = outs[_LOGITS]
    graph.erase_node(out)
    graph.output(logits)
    return _finish(base, graph, fp32_rules=False)


def features_graph(base: BaseGraph, fp32_rules: bool) -> fx.GraphModule:
    """x -> (logits, monitored outputs...) in ``base.names`` order."""
    graph = copy.deepcopy(base.module.graph)
    out, outs = _outputs(graph)
    graph.erase_node(out)
    monitored = [outs[n] for n in base.names]
    graph.output((outs[_LOGITS], *monitored))
    return _finish(base, graph, fp32_rules=fp32_rules, monitored=monitored)


def probe_graphs(
    base: BaseGraph, fp32_rules: bool
) -> tuple[fx.GraphModule, fx.GraphModule, list[str]] | None:
    """Split at the earliest monitored output: lower ``x -> z1`` and upper
    ``(z1, probe per layer...) -> (logits, pooled z per layer...)``, layers in graph order.

    None when the split is not clean (a node above the split still needs the input itself).
    """
    # Lower part.
    lower_graph = copy.deepcopy(base.module.graph)
    order = {node: i for i, node in enumerate(lower_graph.nodes)}
    out, outs = _outputs(lower_graph)
    names = sorted(base.names, key=lambda n: order[outs[n]])
    first = outs[names[0]]
    lower_graph.erase_node(out)
    lower_graph.output(first)
    lower = _finish(base, lower_graph, fp32_rules=fp32_rules, monitored=[first])

    # Upper part.
    graph = copy.deepcopy(base.module.graph)
    out, outs = _outputs(graph)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    body = next(n for n in graph.nodes if n.op != "placeholder")
    # inserting_before keeps creation order: z_in, probe_0, probe_1, ... (the call order).
    with graph.inserting_before(body):
        z_in = graph.placeholder("z_in")
        probes = [graph.placeholder(f"probe_{i}") for i in range(len(names))]
        probed_first = graph.call_function(_probe_add, (z_in, probes[0]))
    first = outs[names[0]]
    first.replace_all_uses_with(probed_first, delete_user_cb=lambda user: user is not out)
    pooled_sources: list[fx.Node] = [z_in]
    for name, probe in zip(names[1:], probes[1:], strict=True):
        node = outs[name]
        with graph.inserting_after(node):
            probed = graph.call_function(_probe_add, (node, probe))

        def others(user: fx.Node, probed: fx.Node = probed) -> bool:
            return user is not probed and user is not out

        node.replace_all_uses_with(probed, delete_user_cb=others)
        pooled_sources.append(node)
    with graph.inserting_before(out):
        pooled = [graph.call_function(sum_spatial, (src,)) for src in pooled_sources]
    graph.erase_node(out)
    graph.output((outs[_LOGITS], *pooled))
    upper = _finish(base, graph, fp32_rules=fp32_rules, monitored=pooled_sources[1:])
    for node in inputs:  # dead-code elimination has run: the input must be unused now
        if node.users:
            return None
        upper.graph.erase_node(node)
    upper.recompile()
    return lower, upper, names
