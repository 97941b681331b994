"""Acceleration: batch buckets, pinned host staging, torch.compile with an eager fallback, and
compiled NAC state paths through FX graphs.

Everything here is optional and off by default; with it off a
:class:`~nacguard.bundle.runtime.Bundle` computes exactly what the plain eager code computes.
"""

from nacguard.accel.buckets import Chunk, bucket_for, normalize_buckets, plan_chunks
from nacguard.accel.compile import CompileConfig, SafeCompiled
from nacguard.accel.flags import set_torch_flags
from nacguard.accel.paths import AcceleratedPaths, CompiledStates, accelerate
from nacguard.accel.staging import HostStager

__all__ = [
    "AcceleratedPaths",
    "Chunk",
    "CompileConfig",
    "CompiledStates",
    "HostStager",
    "SafeCompiled",
    "accelerate",
    "bucket_for",
    "normalize_buckets",
    "plan_chunks",
    "set_torch_flags",
]
