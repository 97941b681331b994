"""Batch buckets: a batch is padded with zero images up to the next of a fixed set of sizes, so a
compiled graph, a CUDA graph or a cuDNN plan made for that size is reused.

Padding is safe: the model runs in eval mode and each image's result depends on that image
alone; padded rows are dropped. A batch larger than the largest bucket is cut into
largest-bucket chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Chunk", "bucket_for", "normalize_buckets", "plan_chunks"]


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
