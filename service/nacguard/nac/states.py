"""Activation states of monitored layers: ``sigmoid(beta * sum_hw(z) * sum_hw(dL/dz))``.

L is the cross-entropy of the softmax against the uniform distribution (the gradient of
KL(u || p)). Two exact fast paths replace the reference's one-backward-per-layer:

* **Analytic head.** When every monitored output is the input of the final ``nn.Linear`` (the
  pooled penultimate layer), ``dL/dlogits = p - 1/C`` and ``g = (p - 1/C) @ W``: one forward pass
  under ``inference_mode``, no backward at all.
* **One activation-only gradient call.** Otherwise the earliest monitored output is detached
  and made the only leaf that requires grad (parameters never do), so the graph covers only the
  network above it, and a single ``torch.autograd.grad`` call returns every layer's gradient.

Each sample's loss depends on that sample alone (eval mode), so ``sum_b L_b`` gives per-sample
gradients and results do not depend on batch composition.

Mixed precision (``autocast_dtype`` bf16/fp16) keeps fp32 where the states are sensitive, since a
state is ``sigmoid(beta * s)`` and beta reaches the thousands: the head (the last ``nn.Linear``)
runs in fp32 on its input, so the logits and ``p - 1/C`` are not rounded to 8 bits of mantissa;
monitored average-pooling layers read their input in fp32, so pooled features are not rounded
either; pooled sums and states are fp32; and fp16 backward passes scale the loss by a power of two
(exact to undo) so small gradients do not flush to zero. In fp32 none of this changes a bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FP16_LOSS_SCALE",
    "ForwardStates",
    "StateExtractor",
    "find_head",
    "fp32_linear",
    "head_states",
    "pool_states",
    "reads_fp32",
    "resolve_modules",
    "sum_spatial",
    "uniform_loss",
]

#: Loss scale of fp16 backward passes. A power of two, so dividing the gradients by it is exact;
#: 2**10 lifts gradients of ~1e-5 (typical of early conv stages) well above fp16's subnormal range
#: while leaving three orders of magnitude of headroom below its maximum (65504). A pass that
#: overflows anyway is redone unscaled.
FP16_LOSS_SCALE = 1024.0

# Monitored modules of these types average many values; under autocast they read their input in
# fp32 so the pooled features keep full precision (a pure gain: pooling has no weights to cast).
_AVERAGING = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)

_Hook = Callable[[nn.Module, object, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class ForwardStates:
    """Result of one forward pass: logits and each monitored layer's states [B, N] (fp32)."""

    logits: torch.Tensor
    states: dict[str, torch.Tensor]


def resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Look up modules by name, failing with the list of valid names.

    Raises:
        ValueError: a name that is not a module of ``model``.
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        valid = ", ".join(n for n in modules if n)
        raise ValueError(f"unknown layer(s) {unknown}; valid layer names: {valid}")
    return {n: modules[n] for n in names}


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-(1/C) * sum_c log softmax(logits)_c`` in fp32, shape [B]."""
    return -torch.log_softmax(logits.float(), dim=1).mean(dim=1)


def scaled_grads(
    loss: torch.Tensor, inputs: Sequence[torch.Tensor], scale: float
) -> list[torch.Tensor | None] | None:
    """Gradients of ``loss`` w.r.t. ``inputs``, computed on ``loss * scale`` and divided back.

    ``scale`` is a power of two (exact to undo); it lifts small fp16 gradients out of the
    subnormal range. Returns None when a scaled pass overflowed, so the caller can redo it
    unscaled; unscaled gradients are returned whatever they hold. Unused inputs get None.
    """
    grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, inputs, allow_unused=True)
    if scale == 1.0:
        return list(grads)
    with torch.no_grad():
        finite = [torch.isfinite(g).all() for g in grads if g is not None]
        if finite and not bool(torch.stack(finite).all()):
            return None
        return [None if g is None else g.float() / scale for g in grads]


def sum_spatial(t: torch.Tensor) -> torch.Tensor:
    """Sum-pool to fp32 [B, N]: over H, W for [B, N, H, W]; over tokens for [B, T, D] (ViT).

    Half-precision inputs are accumulated in fp32 without an fp32 copy of the whole tensor (for
    fp32 inputs ``dtype=`` is a no-op, so fp32 results are unchanged).
    """
    if t.dim() == 4:
        return t.sum(dim=(2, 3), dtype=torch.float32)
    if t.dim() == 3:
        return t.sum(dim=1, dtype=torch.float32)
    if t.dim() == 2:
        return t.float()
    raise ValueError(f"cannot pool a monitored output of shape {tuple(t.shape)}")


def pool_states(z: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """``sigmoid(beta * sum_hw(z) * sum_hw(g))`` in fp32, [B, N]."""
    s = sum_spatial(z) * sum_spatial(g)
    return torch.sigmoid(beta * s)


def find_head(model: nn.Module) -> nn.Linear | None:
    """The classifier head: the model's last ``nn.Linear`` (None if it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def fp32_linear(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` computed in fp32 with autocast off (differentiable)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return F.linear(x.float(), head.weight.float(), bias)


def reads_fp32(module: nn.Module) -> bool:
    """Whether a monitored module reads its input in fp32 under autocast (average pools)."""
    return isinstance(module, _AVERAGING)


def head_states(
    logits: torch.Tensor,
    features: dict[str, torch.Tensor],
    head: nn.Linear,
    betas: dict[str, float],
) -> dict[str, torch.Tensor]:
    """States of layers that are the head's input, from the analytic gradient ``(p - 1/C) W``.

    Args:
        logits: [B, C] logits.
        features: monitored name -> output (any shape that flattens to the head's [B, D] input).
        head: the final linear layer.
        betas: monitored name -> beta.

    Returns:
        name -> fp32 states [B, D].
    """
    # dL/dlogits (= p - 1/C) by autograd on the [B, C] logits alone: a negligible graph, and the
    # very floats the full backward would give (the product below cancels strongly, so a
    # differently rounded closed form would move states by ~1e-6).
    with torch.enable_grad():
        leaf = logits.detach().float().clone().requires_grad_(True)
        (dlogits,) = torch.autograd.grad(uniform_loss(leaf).sum(), leaf)
    with torch.inference_mode():
        g = dlogits.mm(head.weight.float())
        return {
            name: torch.sigmoid(betas[name] * z.float().reshape(g.shape) * g)
            for name, z in features.items()
        }


class StateExtractor:
    """Computes logits and NAC states for named layers of a classifier.

    The model must be in eval mode (so samples do not interact); the extractor freezes its
    parameters (``requires_grad=False``), since only activation gradients are needed.

    Args:
        model: any ``nn.Module`` whose forward returns logits [B, C].
        betas: monitored layer name -> beta.
        autocast_dtype: run the model's forward under autocast with this dtype (None = off).
            States are always computed in fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        betas: dict[str, float],
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if not betas:
            raise ValueError("monitor at least one layer")
        self.model = model
        self.betas = dict(betas)
        self.autocast_dtype = autocast_dtype
        self._modules = resolve_modules(model, list(betas))
        model.requires_grad_(False)
        self._head = find_head(model)
        # None: not yet known whether every monitored output feeds the head; decided on the
        # first call by comparing storage, then fixed.
        self._analytic: bool | None = None if self._head is not None else False

    @property
    def head(self) -> nn.Linear | None:
        """The final linear layer (None if the model has none)."""
        return self._head

    @property
    def loss_scale(self) -> float:
        """Factor on the loss of backward passes (> 1 only for fp16, see module docstring)."""
        return FP16_LOSS_SCALE if self.autocast_dtype == torch.float16 else 1.0

    @property
    def analytic(self) -> bool | None:
        """Whether the analytic-head path is used (None until the first call)."""
        return self._analytic

    def __call__(self, x: torch.Tensor) -> ForwardStates:
        """Compute logits and states for a batch ``x`` (already on the model's device)."""
        if self._analytic is None:
            result, analytic = self._try_analytic(x)
            self._analytic = analytic
            if result is not None:
                return result
        elif self._analytic:
            result, _ = self._try_analytic(x)
            if result is not None:
                return result
        return self._autograd(x)

    @contextlib.contextmanager
    def _autocast(self, x: torch.Tensor) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
            return
        handles = []
        if self._head is not None:

            def head_fp32(m: nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> object:
                # Replaces the autocast output by the fp32 one; the head is a small matmul.
                assert isinstance(m, nn.Linear)
                return fp32_linear(m, args[0])

            handles.append(self._head.register_forward_hook(head_fp32))

        def input_fp32(_m: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
            return tuple(
                a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            )

        for module in self._modules.values():
            if reads_fp32(module):
                handles.append(module.register_forward_pre_hook(input_fp32))
        try:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _hooks(self, make_hook: Callable[[str], _Hook]) -> Iterator[None]:
        handles = [m.register_forward_hook(make_hook(n)) for n, m in self._modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _try_analytic(self, x: torch.Tensor) -> tuple[ForwardStates | None, bool]:
        """Forward under inference_mode; use g = (p - 1/C) W if all outputs feed the head."""
        assert self._head is not None
        outputs: dict[str, torch.Tensor] = {}
        head_in: list[torch.Tensor] = []

        def capture(name: str) -> _Hook:
            def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
                outputs[name] = out

            return hook

        def capture_head(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            head_in.append(args[0])

        head_out: list[torch.Tensor] = []

        def capture_head_out(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            head_out.append(out)

        with torch.inference_mode(), self._hooks(capture), self._autocast(x):
            # Registered after the autocast hooks, so the head's output seen here is the final
            # one (under autocast, the fp32 head output that replaces the low-precision one).
            pre = self._head.register_forward_pre_hook(capture_head)
            post = self._head.register_forward_hook(capture_head_out)
            try:
                logits = self.model(x)
            finally:
                pre.remove()
                post.remove()
        if not self._feeds_head(outputs, head_in, head_out, logits):
            return None, False
        states = head_states(logits, outputs, self._head, self.betas)
        return ForwardStates(logits=logits, states=states), True

    def _feeds_head(
        self,
        outputs: dict[str, torch.Tensor],
        head_in: list[torch.Tensor],
        head_out: list[torch.Tensor],
        logits: torch.Tensor,
    ) -> bool:
        """Whether ``g = (p - 1/C) W`` is exactly every monitored layer's gradient.

        That needs: the head ran once on a [B, D] input; every monitored output is that very
        tensor (same storage and size; [B, D, 1, 1] pools count, a flattened [B, D, H, W] map
        does not, since its neurons are D channels, not D*H*W values); and the logits ARE the
        head's output (no scaling, second head or other op after it). The values are compared
        too on this first call, so a view with another layout or an in-place change after the
        head falls back to autograd instead of giving wrong numbers.
        """
        if len(head_in) != 1 or len(head_out) != 1 or head_in[0].dim() != 2:
            return False
        feature = head_in[0]
        for z in outputs.values():
            if z.data_ptr() != feature.data_ptr() or z.numel() != feature.numel():
                return False
            pooled = {4: z.shape[:2], 3: z.shape[::2], 2: z.shape}.get(z.dim())
            if pooled != feature.shape:
                return False
            if not torch.equal(z.reshape(feature.shape), feature):
                return False
        out = head_out[0]
        return (
            out.data_ptr() == logits.data_ptr()
            and out.shape == logits.shape
            and torch.equal(out, logits)
        )

    def _autograd(self, x: torch.Tensor) -> ForwardStates:
        """One forward with a graph starting at the earliest monitored output, one grad call."""
        scale = self.loss_scale
        if scale != 1.0:
            result = self._autograd_scaled(x, scale)
            if result is not None:
                return result
        result = self._autograd_scaled(x, 1.0)
        assert result is not None  # unscaled passes are returned whatever they hold
        return result

    def _autograd_scaled(self, x: torch.Tensor, scale: float) -> ForwardStates | None:
        """The autograd path with the loss multiplied by ``scale``; None if that overflowed."""
        outputs: dict[str, torch.Tensor] = {}

        def capture(name: str) -> _Hook:
            def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
                # The forward starts with grad mode off, so the layers below the first
                # monitored output run as cheaply as in inference. That output becomes the
                # only leaf, and grad mode goes on from here to the logits; later monitored
                # outputs already depend on it. The clone shields the captured value from
                # in-place ops further up (e.g. ReLU(inplace=True)).
                torch.set_grad_enabled(True)
                z = out if out.requires_grad else out.detach().requires_grad_(True)
                outputs[name] = z
                return z.clone()

            return hook

        with torch.no_grad(), self._hooks(capture), self._autocast(x):
            logits = self.model(x)
            torch.set_grad_enabled(True)  # restored by the no_grad context on exit
            names = list(outputs)
            grads = scaled_grads(uniform_loss(logits).sum(), [outputs[n] for n in names], scale)
        if grads is None:
            return None
        states = {}
        with torch.no_grad():
            for name, g in zip(names, grads, strict=True):
                z = outputs[name].detach()
                g = torch.zeros_like(z) if g is None else g
                states[name] = pool_states(z, g, self.betas[name])
        return ForwardStates(logits=logits.detach(), states=states)
