"""Process-wide torch flags for a serving device, set once at service start-up."""

from __future__ import annotations

import torch

__all__ = ["set_torch_flags"]


def set_torch_flags(device: torch.device | str, precision: str, *, buckets: bool) -> None:
    """Set the process-wide cuDNN/CUDA flags that serving on ``device`` needs.

    Call once, at start-up, before the first batch (the service does; a notebook that wants the
    same numbers as the server calls it too). Nothing happens for a CPU device.

    Args:
        device: the serving device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        buckets: batches are padded to fixed bucket sizes.
    """
    if torch.device(device).type != "cuda":
        return
    if precision == "fp32":
        # fp32 means fp32: cuDNN's default TF32 convolutions keep 10 mantissa bits, which moves
        # NAC states like fp16 would (the matmul flag is off by default). For speed, choose fp16
        # and its fp32 islands instead.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if buckets:
        # Fixed shapes: let cuDNN time its algorithms once per bucket (with free batch sizes it
        # would re-time for every new size instead).
        torch.backends.cudnn.benchmark = True
