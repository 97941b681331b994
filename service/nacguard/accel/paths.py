"""The compiled paths of one model on one device: the plain forward and the NAC states.

:func:`accelerate` traces the model (see :mod:`nacguard.accel.graphs`) and wraps each graph in
:class:`~nacguard.accel.compile.SafeCompiled`; :class:`CompiledStates` is a drop-in for
``StateExtractor.__call__`` that runs the analytic-head graph or the probe split.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from nacguard.accel.compile import CompileConfig, SafeCompiled
from nacguard.accel.graphs import (
    BaseGraph,
    features_graph,
    plain_graph,
    probe_graphs,
    probe_shape,
    trace,
)
from nacguard.nac.scoring import NacScorer
from nacguard.nac.states import (
    ForwardStates,
    StateExtractor,
    head_states,
    scaled_grads,
    uniform_loss,
)

__all__ = ["AcceleratedPaths", "CompiledStates", "accelerate"]

log = logging.getLogger(__name__)


class CompiledStates:
    """NAC states through (compiled) FX graphs: a drop-in for ``StateExtractor.__call__``.

    The analytic-head path is one compiled forward under ``inference_mode`` that returns the
    logits and the pooled features; the multi-layer path is the probe split described in the
    module docstring. The extractor's first (eager) call decides which path applies; it is made
    at construction on ``example``. Without ``config`` the graphs run eagerly (that is how the
    graph surgery is tested to give the extractor's numbers).

    Args:
        extractor: the eager extractor (its betas, precision, head and analytic decision).
        base: the traced model.
        example: one input sample batch [1, C, H, W] on the model's device.
        config: compile settings, or None for eager graphs.
        max_shapes: distinct batch sizes expected.
    """

    def __init__(
        self,
        extractor: StateExtractor,
        base: BaseGraph,
        example: torch.Tensor,
        config: CompileConfig | None,
        *,
        max_shapes: int = 8,
    ) -> None:
        self.extractor = extractor
        self.config = config
        fp32_rules = extractor.autocast_dtype is not None
        extractor(example)  # decides the analytic path
        self._analytic_fn: Callable[..., Any] | None = None
        self._lower: Callable[..., Any] | None = None
        self._upper: Callable[..., Any] | None = None
        self._probe_shapes: dict[str, tuple[int, ...]] = {}
        self._probes: dict[int, list[torch.Tensor]] = {}
        self.names: list[str] = list(base.names)

        def wrap(gm: fx.GraphModule, name: str) -> Callable[..., Any]:
            if config is None:
                return gm
            return SafeCompiled(gm, config, name=name, max_shapes=max_shapes)

        if extractor.analytic:
            self._analytic_fn = wrap(features_graph(base, fp32_rules), "NAC (analytic head)")
            return
        if config is not None and not config.probe:
            return
        split = probe_graphs(base, fp32_rules)
        if split is None:
            log.info("the model does not split cleanly at its first monitored layer; eager NAC")
            return
        lower, upper, self.names = split
        with torch.no_grad():
            shapes = fx.GraphModule(base.module, copy.deepcopy(base.module.graph))(example)
        self._probe_shapes = {n: probe_shape(shapes[n].shape) for n in self.names}
        self._lower = wrap(lower, "NAC (stem)")
        self._upper = wrap(upper, "NAC (probes)")

    @property
    def compiled(self) -> dict[str, SafeCompiled[Any]]:
        """The compiled callables by part (``analytic``, ``stem``, ``probes``); empty when the
        graphs run eagerly."""
        parts = {"analytic": self._analytic_fn, "stem": self._lower, "probes": self._upper}
        return {k: fn for k, fn in parts.items() if isinstance(fn, SafeCompiled)}

    @property
    def path(self) -> str:
        """Which path runs: ``"analytic"``, ``"probe"`` or ``"eager"``."""
        if self._analytic_fn is not None:
            return "analytic"
        return "probe" if self._upper is not None else "eager"

    def _autocast(self, x: torch.Tensor) -> Any:
        dtype = self.extractor.autocast_dtype
        return torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None)

    def __call__(self, x: torch.Tensor) -> ForwardStates:
        """Logits and states of a batch already on the device."""
        if self._analytic_fn is not None:
            return self._analytic(x)
        if self._upper is not None:
            scale = self.extractor.loss_scale
            result = self._probe(x, scale)
            if result is None:
                result = self._probe(x, 1.0)
            assert result is not None
            return result
        return self.extractor(x)

    def _analytic(self, x: torch.Tensor) -> ForwardStates:
        assert self._analytic_fn is not None
        head = self.extractor.head
        assert head is not None
        with torch.inference_mode(), self._autocast(x):
            logits, *features = self._analytic_fn(x)
        states = head_states(
            logits, dict(zip(self.names, features, strict=True)), head, self.extractor.betas
        )
        return ForwardStates(logits=logits, states=states)

    def _probe_tensors(self, x: torch.Tensor) -> list[torch.Tensor]:
        batch = int(x.shape[0])
        probes = self._probes.get(batch)
        if probes is None or probes[0].device != x.device:
            # Zero leaves, reused: autograd.grad returns gradients without accumulating them.
            probes = [
                torch.zeros(
                    (batch, *self._probe_shapes[n][1:]), device=x.device, requires_grad=True
                )
                for n in self.names
            ]
            self._probes[batch] = probes
        return probes

    def _probe(self, x: torch.Tensor, scale: float) -> ForwardStates | None:
        assert self._lower is not None and self._upper is not None
        with torch.no_grad(), self._autocast(x):
            z = self._lower(x)
        probes = self._probe_tensors(x)
        with torch.enable_grad(), self._autocast(x):
            logits, *pooled = self._upper(z.detach(), *probes)
            grads = scaled_grads(uniform_loss(logits).sum(), probes, scale)
        if grads is None:
            return None
        states = {}
        with torch.no_grad():
            for name, s_z, g in zip(self.names, pooled, grads, strict=True):
                s_g = torch.zeros_like(s_z) if g is None else g.reshape(s_z.shape)
                states[name] = torch.sigmoid(self.extractor.betas[name] * (s_z * s_g))
        ordered = {n: states[n] for n in self.extractor.betas}
        return ForwardStates(logits=logits.detach(), states=ordered)


@dataclass
class AcceleratedPaths:
    """What :func:`accelerate` built for one model on one device.

    Attributes:
        plain: x -> logits (call under ``inference_mode`` and autocast as needed).
        states: x -> ForwardStates, for ``NacScorer.states_fn``; None: the eager extractor.
        compiled: names of the compiled callables, for ``active`` checks and logs.
    """

    plain: Callable[[torch.Tensor], torch.Tensor]
    states: CompiledStates | None
    compiled: dict[str, SafeCompiled[Any]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether every compiled callable still runs compiled."""
        return all(c.active for c in self.compiled.values())


def accelerate(
    model: nn.Module,
    scorer: NacScorer,
    example: torch.Tensor,
    config: CompileConfig,
    *,
    max_shapes: int = 8,
) -> AcceleratedPaths:
    """Compile the plain forward and the NAC state path of ``scorer`` for ``model``.

    If the model cannot be traced with ``torch.fx`` the plain forward is compiled as a whole
    and NAC runs eagerly (logged once).

    Args:
        model: the classifier (eval mode, on its device, memory format already set).
        scorer: the scorer whose ``states_fn`` the result's ``states`` is meant for.
        example: a [1, C, H, W] input on the model's device.
        config: compile settings.
        max_shapes: distinct batch sizes expected (buckets).
    """
    names = list(scorer.betas)
    try:
        base = trace(model, names)
    except Exception as exc:  # FX cannot trace data-dependent Python control flow, among others
        log.warning(
            "cannot trace %s with torch.fx (%s: %s); compiling the plain forward only",
            type(model).__name__,
            type(exc).__name__,
            exc,
        )
        plain = SafeCompiled(model, config, name="forward", max_shapes=max_shapes)
        return AcceleratedPaths(plain=plain, states=None, compiled={"forward": plain})
    plain = SafeCompiled(plain_graph(base), config, name="forward", max_shapes=max_shapes)
    states = CompiledStates(scorer.extractor, base, example, config, max_shapes=max_shapes)
    compiled: dict[str, SafeCompiled[Any]] = {"forward": plain, **states.compiled}
    return AcceleratedPaths(
        plain=plain, states=states if states.path != "eager" else None, compiled=compiled
    )
