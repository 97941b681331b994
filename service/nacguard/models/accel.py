"""Acceleration helpers: batch buckets, pinned host staging, torch.compile with an eager fallback,
compiled NAC state paths, batched GPU JPEG decoding, on-device preprocessing, and a precision
fidelity check.

Everything here is optional and off by default; with it off a :class:`~nacguard.models.bundle.Bundle`
computes exactly what the plain eager code computes. What each piece buys:

* **Buckets.** A batch is padded with zero images up to the next of a fixed set of sizes, so a
  compiled graph, a CUDA graph or a cuDNN plan made for that size is reused. Padding is safe: the
  model runs in eval mode and each image's result depends on that image alone; padded rows are
  dropped. A batch larger than the largest bucket is cut into largest-bucket chunks.
* **Pinned staging.** A CPU batch is copied into a reused page-locked buffer (the padding is
  written there too), then sent with ``non_blocking=True``: one DMA copy that does not stall
  the host, instead of a pageable copy that does.
* **torch.compile.** The model is traced once with ``torch.fx`` (torchvision's feature-extraction
  tracer) into graphs that return exactly what each path needs, and those graphs are compiled:
  the plain forward (logits), the analytic-head NAC path (logits and pooled features, one
  forward under ``inference_mode``), and the multi-layer NAC path with the "probe" trick: the
  stem and the first monitored stage run without grad, their output enters the compiled upper
  part as an input, and a zero *probe* input is added to every monitored output inside it. The
  gradient with respect to a probe is the gradient with respect to that activation (compiled
  graphs cannot be differentiated with respect to their own intermediates, but they can with
  respect to their inputs). A probe has shape [B, N, 1, 1] and is added in fp32, so its gradient
  *is* the fp32 spatial sum ``sum_hw(dL/dz)`` that the state needs. Any compile failure is
  logged once and that path runs eagerly from then on.
* **GPU JPEG decoding.** :func:`decode_jpeg_batch` decodes a list of JPEG files in one batched
  nvjpeg call; anything it should not or cannot decode (other formats, EXIF-rotated images,
  over-large images, corrupt data) comes back as None for the CPU path.
  :func:`preprocess_tensors` then resizes, crops and normalises the decoded uint8 tensors on
  the device with the same arithmetic as :class:`~nacguard.models.preprocess.PreprocessSpec`.
"""

from __future__ import annotations

import copy
import logging
import math
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from nacguard.models.preprocess import PreprocessSpec
from nacguard.nac.evaluation import auroc
from nacguard.nac.profile import NacProfile
from nacguard.nac.scoring import NacScorer
from nacguard.nac.states import (
    ForwardStates,
    StateExtractor,
    find_head,
    fp32_linear,
    head_states,
    reads_fp32,
    scaled_grads,
    sum_spatial,
    uniform_loss,
)

__all__ = [
    "AcceleratedPaths",
    "Chunk",
    "CompileConfig",
    "CompiledStates",
    "FidelityReport",
    "HostStager",
    "SafeCompiled",
    "accelerate",
    "bucket_for",
    "compare_precision",
    "decode_jpeg_batch",
    "is_jpeg",
    "jpeg_info",
    "normalize_buckets",
    "plan_chunks",
    "preprocess_tensor",
    "preprocess_tensors",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_LOGITS = "__nacguard_logits__"

# One torch.compile at a time in this process: runners of several devices warm up concurrently,
# and Dynamo's tracing and cache bookkeeping are not meant to run in two threads at once.
_COMPILE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def normalize_buckets(buckets: Iterable[int] | None) -> tuple[int, ...]:
    """Sorted, de-duplicated bucket sizes.

    Raises:
        ValueError: a size below 1.
    """
    sizes = sorted({int(b) for b in buckets or ()})
    if sizes and sizes[0] < 1:
        raise ValueError(f"batch buckets must be >= 1, got {sizes}")
    return tuple(sizes)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` rows; ``n`` itself when none does (or no buckets)."""
    return next((b for b in buckets if b >= n), n)


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a batch, computed padded to ``size`` rows."""

    start: int
    stop: int
    size: int

    @property
    def rows(self) -> int:
        """Real (unpadded) rows in the chunk."""
        return self.stop - self.start


def plan_chunks(n: int, buckets: Sequence[int]) -> list[Chunk]:
    """How ``n`` rows are computed: largest-bucket chunks, then the rest padded to its bucket.

    Without buckets the batch is one chunk of its natural size.
    """
    if n <= 0:
        return []
    if not buckets:
        return [Chunk(0, n, n)]
    largest = buckets[-1]
    chunks = []
    start = 0
    while n - start > largest:
        chunks.append(Chunk(start, start + largest, largest))
        start += largest
    chunks.append(Chunk(start, n, bucket_for(n - start, buckets)))
    return chunks


class HostStager:
    """Moves batches onto the device, padded to a row count, through reused pinned buffers.

    On a CUDA device a CPU batch is copied into a page-locked buffer (sized for the largest
    batch seen, rows beyond the batch zeroed) and sent with ``non_blocking=True``; a CUDA event
    recorded after the copy is waited on before the buffer is written again. Elsewhere the batch
    is padded where it is and moved normally; an unpadded CPU batch for a CPU device is returned
    as is (no copy).

    Not thread-safe: one stager per device runner.

    Args:
        device: the target device.
        pin: use pinned buffers; default: when the device is CUDA.
    """

    def __init__(self, device: torch.device | str, *, pin: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._events: dict[tuple[Any, ...], Any] = {}

    def __call__(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``x`` on the device with ``rows`` rows (zero rows appended; default ``len(x)``)."""
        n = int(x.shape[0])
        rows = n if rows is None else rows
        if rows < n:
            raise ValueError(f"cannot stage {n} rows into {rows}")
        if not self.pin or x.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
            if rows == n:
                return x
            out = x.new_zeros((rows, *x.shape[1:]))
            out[:n].copy_(x)
            return out
        key = (tuple(x.shape[1:]), x.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            self._wait(key)
            buf = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, pin_memory=True)
            self._buffers[key] = buf
        else:
            self._wait(key)  # the last copy out of this buffer must be done before we write it
        view = buf[:rows]
        view[:n].copy_(x)
        if rows > n:
            view[n:].zero_()
        out = view.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._events[key] = event
        return out

    def _wait(self, key: tuple[Any, ...]) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.synchronize()


# --------------------------------------------------------------------------------------------
# torch.compile with an eager fallback
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileConfig:
    """How graphs are compiled.

    Attributes:
        mode: ``torch.compile`` mode: None (default), ``"reduce-overhead"`` (CUDA graphs: least
            launch overhead, most memory), ``"max-autotune"`` (slow to compile; also CUDA
            graphs), ``"max-autotune-no-cudagraphs"``.
        backend: ``torch.compile`` backend (a name or a backend function); ``"inductor"``
            generates kernels, ``"aot_eager"`` only traces (for tests of the plumbing: it runs
            anywhere and compiles in seconds).
        probe: compile the multi-layer NAC path with probes (else that path runs eagerly).
    """

    mode: str | None = None
    backend: str | Callable[..., Any] = "inductor"
    probe: bool = True

    @property
    def cudagraphs(self) -> bool:
        """Whether the mode records CUDA graphs (those record on a call after the first)."""
        return self.backend == "inductor" and self.mode in {"reduce-overhead", "max-autotune"}


def _raise_recompile_limit(at_least: int) -> None:
    # Every bucket is a new static shape, hence one more compiled entry for the same code object;
    # Dynamo's default limit (8) would silently send the extra buckets to eager mode.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), at_least))
            return


def _signature(args: Sequence[Any]) -> tuple[Any, ...]:
    """What makes Dynamo compile anew: tensor shapes, dtypes, devices, strides, grad modes."""
    parts: list[Any] = [
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cuda"),
        torch.is_autocast_enabled("cpu"),
    ]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((tuple(a.shape), a.dtype, a.device, a.stride(), a.requires_grad))
        else:
            parts.append(type(a))
    return tuple(parts)


class SafeCompiled(Generic[T]):
    """``torch.compile(fn)`` that falls back to ``fn`` for good when compiling fails.

    A call whose compiled run raises is retried eagerly: if the eager run succeeds the failure
    was the compiler's, so it is logged once and the eager function is used from then on; if the
    eager run fails too, the input was at fault and its error is raised (compilation stays on).
    Out-of-memory errors are raised as they are (the caller splits the batch).

    Args:
        fn: the eager function (or module).
        config: compile settings.
        name: for the log.
        max_shapes: distinct input shapes expected (buckets); raises Dynamo's recompile limit.
    """

    def __init__(
        self,
        fn: Callable[..., T],
        config: CompileConfig,
        *,
        name: str,
        max_shapes: int = 8,
    ) -> None:
        self.eager = fn
        self.name = name
        self.config = config
        self.error: BaseException | None = None
        self._seen: set[tuple[Any, ...]] = set()
        _raise_recompile_limit(max_shapes + 4)
        self._compiled = torch.compile(fn, mode=config.mode, backend=config.backend, dynamic=False)

    @property
    def active(self) -> bool:
        """True until a compile failure switched this function to eager mode."""
        return self.error is None

    def __call__(self, *args: Any) -> T:
        """Run compiled (eagerly after a compile failure)."""
        if self.error is not None:
            return self.eager(*args)
        key = _signature(args)
        try:
            if key in self._seen:
                return self._compiled(*args)
            with _COMPILE_LOCK:
                out = self._compiled(*args)
            self._seen.add(key)
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            out = self.eager(*args)  # raises if the input, not the compiler, is at fault
            self.error = exc
            log.warning(
                "torch.compile of %s failed (%s: %s); running it eagerly from now on",
                self.name,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return out


# --------------------------------------------------------------------------------------------
# FX graphs of the model
# --------------------------------------------------------------------------------------------


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


def _probe_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Probe shape for one sample's monitored output of ``shape`` (batch dim included as 1)."""
    if len(shape) == 4:
        return (1, shape[1], 1, 1)
    if len(shape) == 3:
        return (1, 1, shape[2])
    if len(shape) == 2:
        return (1, shape[1])
    raise ValueError(f"cannot probe a monitored output of shape {tuple(shape)}")


@dataclass
class _BaseGraph:
    """The traced model: returns every monitored output and the logits."""

    module: fx.GraphModule
    names: list[str]
    head_target: str | None


def _trace(model: nn.Module, names: Sequence[str]) -> _BaseGraph:
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
    return _BaseGraph(gm, list(names), head_target)


def _outputs(graph: fx.Graph) -> tuple[fx.Node, dict[str, fx.Node]]:
    out = next(n for n in graph.nodes if n.op == "output")
    mapping = out.args[0]
    assert isinstance(mapping, dict)
    return out, dict(mapping)


def _finish(
    base: _BaseGraph, graph: fx.Graph, *, fp32_rules: bool, monitored: Sequence[fx.Node] = ()
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


def _plain_graph(base: _BaseGraph) -> fx.GraphModule:
    graph = copy.deepcopy(base.module.graph)
    out, outs = _outputs(graph)
    logits = outs[_LOGITS]
    graph.erase_node(out)
    graph.output(logits)
    return _finish(base, graph, fp32_rules=False)


def _features_graph(base: _BaseGraph, fp32_rules: bool) -> fx.GraphModule:
    """x -> (logits, monitored outputs...) in ``base.names`` order."""
    graph = copy.deepcopy(base.module.graph)
    out, outs = _outputs(graph)
    graph.erase_node(out)
    monitored = [outs[n] for n in base.names]
    graph.output((outs[_LOGITS], *monitored))
    return _finish(base, graph, fp32_rules=fp32_rules, monitored=monitored)


def _probe_graphs(
    base: _BaseGraph, fp32_rules: bool
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


# --------------------------------------------------------------------------------------------
# Accelerated paths
# --------------------------------------------------------------------------------------------


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
        base: _BaseGraph,
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
            self._analytic_fn = wrap(_features_graph(base, fp32_rules), "NAC (analytic head)")
            return
        if config is not None and not config.probe:
            return
        split = _probe_graphs(base, fp32_rules)
        if split is None:
            log.info("the model does not split cleanly at its first monitored layer; eager NAC")
            return
        lower, upper, self.names = split
        with torch.no_grad():
            shapes = fx.GraphModule(base.module, copy.deepcopy(base.module.graph))(example)
        self._probe_shapes = {n: _probe_shape(shapes[n].shape) for n in self.names}
        self._lower = wrap(lower, "NAC (stem)")
        self._upper = wrap(upper, "NAC (probes)")

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
        base = _trace(model, names)
    except Exception as exc:  # FX cannot trace data-dependent Python control flow, among others
        log.warning(
            "cannot trace %s with torch.fx (%s: %s); compiling the plain forward only",
            type(model).__name__,
            type(exc).__name__,
            exc,
        )
        plain = SafeCompiled(model, config, name="forward", max_shapes=max_shapes)
        return AcceleratedPaths(plain=plain, states=None, compiled={"forward": plain})
    plain = SafeCompiled(_plain_graph(base), config, name="forward", max_shapes=max_shapes)
    states = CompiledStates(scorer.extractor, base, example, config, max_shapes=max_shapes)
    compiled: dict[str, SafeCompiled[Any]] = {"forward": plain}
    for key, fn in (
        ("analytic", states._analytic_fn),
        ("stem", states._lower),
        ("probes", states._upper),
    ):
        if isinstance(fn, SafeCompiled):
            compiled[key] = fn
    return AcceleratedPaths(
        plain=plain, states=states if states.path != "eager" else None, compiled=compiled
    )


# --------------------------------------------------------------------------------------------
# JPEG decoding on the device
# --------------------------------------------------------------------------------------------

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts like a JPEG file (SOI marker followed by another marker)."""
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


@dataclass(frozen=True)
class JpegInfo:
    """What the headers of a JPEG say: size, components, EXIF orientation, coding."""

    width: int
    height: int
    components: int
    orientation: int
    baseline: bool


def _exif_orientation(payload: bytes) -> int:
    """The orientation tag (0x0112) of an APP1 Exif payload; 1 when absent or unreadable."""
    if not payload.startswith(b"Exif\x00\x00") or len(payload) < 14:
        return 1
    tiff = payload[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(min(count, 512)):
            tag, kind, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and kind == 3:  # SHORT
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)
                return int(value)
    except struct.error:
        return 1
    return 1


def jpeg_info(data: bytes) -> JpegInfo | None:
    """Parse a JPEG's markers up to its frame header; None if it is not a readable JPEG."""
    if not is_jpeg(data):
        return None
    pos, orientation = 2, 1
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            return None
        payload = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1:
            orientation = _exif_orientation(payload) if orientation == 1 else orientation
        elif marker in _SOF_MARKERS:
            if len(payload) < 6:
                return None
            _precision, height, width, components = struct.unpack_from(">BHHB", payload, 0)
            return JpegInfo(
                width=width,
                height=height,
                components=components,
                orientation=orientation,
                baseline=marker in (0xC0, 0xC1) and _precision == 8,
            )
        elif marker == 0xDA:  # scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def decode_jpeg_batch(
    datas: Sequence[bytes],
    device: torch.device | str,
    *,
    mode: str = "RGB",
    max_pixels: int | None = None,
) -> list[torch.Tensor | None]:
    """Decode JPEG files in one batched call on ``device`` (nvjpeg on CUDA).

    Returns one entry per input: a uint8 [C, H, W] tensor on ``device`` (C = 3 for ``"RGB"``,
    1 for ``"L"``), or None where the CPU path must take over: not a JPEG, an EXIF orientation
    other than "normal" (the CPU path rotates it), more than ``max_pixels`` pixels (the CPU path
    refuses it with the proper error), CMYK/YCCK or non-8-bit coding, or a decode failure.

    Args:
        datas: encoded files.
        device: where to decode ("cpu" uses libjpeg-turbo, "cuda[:N]" nvjpeg).
        mode: ``"RGB"`` or ``"L"``.
        max_pixels: refuse (return None for) larger images, read from the header.
    """
    with warnings.catch_warnings():
        # torchvision >= 0.29 announces that its image codecs move to TorchCodec; the decoder is
        # still there and still the batched nvjpeg entry point.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    out: list[torch.Tensor | None] = [None] * len(datas)
    picked: list[int] = []
    for i, data in enumerate(datas):
        info = jpeg_info(data)
        if (
            info is None
            or info.orientation != 1
            or info.components not in (1, 3)
            or not info.baseline
            or info.width * info.height == 0
            or (max_pixels is not None and info.width * info.height > max_pixels)
        ):
            continue
        picked.append(i)
    if not picked:
        return out
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in picked]
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(tensors, mode=read_mode, device=dev)
            if isinstance(decoded, torch.Tensor):
                decoded = [decoded]
            for i, t in zip(picked, decoded, strict=True):
                out[i] = t
        except Exception as exc:  # one bad file fails a batched call: decode one by one
            log.debug("batched JPEG decode failed (%s); decoding one by one", exc)
            for i, t in zip(picked, tensors, strict=True):
                try:
                    single = decode_jpeg(t, mode=read_mode, device=dev)
                except Exception:
                    continue
                out[i] = single if isinstance(single, torch.Tensor) else single[0]
    return out


# --------------------------------------------------------------------------------------------
# Preprocessing decoded tensors on the device
# --------------------------------------------------------------------------------------------


def _to_mode(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [C, H, W] to 1 or 3 channels as Pillow converts (L: ITU-R 601-2 luma)."""
    c = img.shape[0]
    if c == channels:
        return img
    if channels == 3 and c == 1:
        return img.expand(3, -1, -1)
    if channels == 1 and c >= 3:
        # Pillow: L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
        rgb = img[:3].to(torch.int32)
        luma = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16
        return luma.to(torch.uint8).unsqueeze(0)
    raise ValueError(f"cannot bring a {c}-channel image to {channels} channels")


def _resize_uint8(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with antialiasing of a uint8 [C, H, W] image, rounded back to uint8 as
    Pillow's BILINEAR does (its filter support widens when shrinking, like ``antialias=True``)."""
    x = img.unsqueeze(0).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def preprocess_tensor(img: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """One decoded uint8 [C, H, W] image (any device) to the model's normalised [C, h, w].

    Follows :meth:`PreprocessSpec.__call__`: mode conversion, the shorter side resized to
    ``spec.resize`` then a center crop (or a direct resize to ``spec.size``), scaling to [0, 1]
    and normalisation. Without a resize the result equals the PIL path bit for bit; resizing
    agrees with Pillow's to about one grey level.
    """
    img = _to_mode(img, spec.channels)
    h, w = spec.size
    height, width = int(img.shape[1]), int(img.shape[2])
    if spec.resize is not None:
        scale = spec.resize / min(width, height)
        new_w, new_h = max(w, round(width * scale)), max(h, round(height * scale))
        if (new_w, new_h) != (width, height):
            img = _resize_uint8(img, new_h, new_w)
        left, top = (new_w - w) // 2, (new_h - h) // 2
        img = img[:, top : top + h, left : left + w]
    elif (width, height) != (w, h):
        img = _resize_uint8(img, h, w)
    t = img.to(torch.float32) / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    return (t - mean) / std


def preprocess_tensors(images: Sequence[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """Preprocess decoded uint8 images and stack them into [B, C, h, w] on their device."""
    return torch.stack([preprocess_tensor(img, spec) for img in images])


# --------------------------------------------------------------------------------------------
# Precision fidelity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FidelityReport:
    """How far mixed-precision NAC scores are from fp32 ones on the same inputs.

    Attributes:
        precision: the autocast dtype's name.
        correlation: Pearson correlation of all scores (InD and OOD together).
        max_abs_diff, mean_abs_diff: score differences.
        auroc_fp32, auroc_mixed: InD-vs-OOD AUROC per OOD set.
    """

    precision: str
    correlation: float
    max_abs_diff: float
    mean_abs_diff: float
    auroc_fp32: dict[str, float]
    auroc_mixed: dict[str, float]

    @property
    def max_auroc_delta(self) -> float:
        """Largest absolute AUROC change over the OOD sets."""
        return max(
            (abs(self.auroc_mixed[k] - self.auroc_fp32[k]) for k in self.auroc_fp32), default=0.0
        )

    def faithful(self, min_correlation: float = 0.999, max_auroc_delta: float = 0.005) -> bool:
        """The acceptance rule: correlation above, AUROC change below the bounds."""
        return self.correlation > min_correlation and self.max_auroc_delta <= max_auroc_delta

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "precision": self.precision,
            "correlation": self.correlation,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "max_auroc_delta": self.max_auroc_delta,
            "auroc_fp32": self.auroc_fp32,
            "auroc_mixed": self.auroc_mixed,
        }


def _scores(
    scorer: NacScorer, x: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    parts = [scorer(b.to(device)).nac.cpu() for b in x.split(batch_size)]
    return torch.cat(parts).numpy().astype(np.float64)


def compare_precision(
    model: nn.Module,
    profile: NacProfile,
    ind: torch.Tensor,
    oods: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    batch_size: int = 256,
) -> FidelityReport:
    """Score the same inputs in fp32 and under ``dtype`` autocast and compare.

    Args:
        model: the classifier (eval mode, on its device).
        profile: the fitted profile.
        ind: preprocessed held-out InD inputs [N, C, H, W] (never the counted images).
        oods: name -> preprocessed OOD inputs.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
        batch_size: scoring batch size.
    """
    device = next(iter(model.parameters())).device
    ref = NacScorer(model, profile, device=device)
    mixed = NacScorer(model, profile, device=device, autocast_dtype=dtype)
    a_ind, b_ind = _scores(ref, ind, batch_size, device), _scores(mixed, ind, batch_size, device)
    a_all, b_all = [a_ind], [b_ind]
    auroc_a, auroc_b = {}, {}
    for name, x in oods.items():
        a, b = _scores(ref, x, batch_size, device), _scores(mixed, x, batch_size, device)
        a_all.append(a)
        b_all.append(b)
        auroc_a[name], auroc_b[name] = auroc(a_ind, a), auroc(b_ind, b)
    a_cat, b_cat = np.concatenate(a_all), np.concatenate(b_all)
    diff = np.abs(a_cat - b_cat)
    corr = float(np.corrcoef(a_cat, b_cat)[0, 1]) if a_cat.std() > 0 and b_cat.std() > 0 else 1.0
    return FidelityReport(
        precision=str(dtype).removeprefix("torch."),
        correlation=corr if math.isfinite(corr) else 0.0,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        auroc_fp32=auroc_a,
        auroc_mixed=auroc_b,
    )
