"""``torch.compile`` with an eager fallback: any compile failure is logged once and that
callable runs eagerly from then on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

__all__ = ["CompileConfig", "SafeCompiled"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# One torch.compile at a time in this process: runners of several devices warm up concurrently,
# and Dynamo's tracing and cache bookkeeping are not meant to run in two threads at once.
_COMPILE_LOCK = threading.Lock()


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
