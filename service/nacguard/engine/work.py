"""The batcher's units of work: a submit's bookkeeping, a queued image, a batch's report, the
ledger of accepted work, and the compute of one batch with its out-of-memory split.

Kept apart from :mod:`nacguard.engine.batcher` so that the batcher module holds only the queue
and its consumers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, cast

from nacguard import errors
from nacguard.engine.runner import In, Out, Runner

__all__ = ["BatchStats", "Item", "Ledger", "Request", "compute", "is_out_of_memory"]

logger = logging.getLogger("nacguard.engine.batcher")


@dataclass(frozen=True)
class BatchStats:
    """What happened to one batch taken off the queue; reported after it is computed.

    Attributes:
        device: name of the runner that computed it.
        size: images sent to compute (expired or cancelled images are not counted).
        queue_wait_s: per image, seconds from enqueue to the start of the batch.
        compute_s: seconds of compute, including out-of-memory retries.
        failed: images of the batch whose compute failed (after any retries).
        policy_wait_s: seconds the free device held the batch back for batch-mates, as its
            batching policy chose (0: it ran as soon as the device was free).
    """

    device: str
    size: int
    queue_wait_s: list[float]
    compute_s: float
    failed: int = 0
    policy_wait_s: float = 0.0


@dataclass(eq=False)
class Request(Generic[Out]):
    """One submit: its future and the bookkeeping to fill it. Compared by identity."""

    future: asyncio.Future[list[Out]]
    size: int
    deadline: float
    results: list[Out | None]
    pending: int  # items not answered yet
    queued: int  # items still in the queue (not yet taken into a batch)
    done: bool = False
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


@dataclass(eq=False)
class Item(Generic[In, Out]):
    """One image waiting in the queue."""

    value: In
    request: Request[Out]
    index: int
    enqueued_at: float


class Ledger(Generic[In, Out]):
    """The queue and every accepted, unanswered request; answers them exactly once.

    Attributes:
        queue: images not yet taken into a batch, oldest first.
        requests: accepted requests not answered yet.
        in_flight: images of those requests (queued or computing).
        idle: set while ``in_flight`` is 0.
    """

    def __init__(self) -> None:
        self.queue: deque[Item[In, Out]] = deque()
        self.requests: set[Request[Out]] = set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, request: Request[Out], values: Sequence[In], now: float) -> None:
        """Queue ``request``'s images, enqueued at ``now``."""
        self.queue.extend(
            Item(value=value, request=request, index=i, enqueued_at=now)
            for i, value in enumerate(values)
        )
        self.requests.add(request)
        self.in_flight += request.size
        self.idle.clear()

    def deliver(self, item: Item[In, Out], output: Out) -> None:
        """Hand one image its output; answer its request once all its images have one."""
        request = item.request
        if request.done:
            return
        request.results[item.index] = output
        request.pending -= 1
        if request.pending == 0:
            self.retire(request)
            if not request.future.done():
                request.future.set_result(cast(list[Out], request.results))

    def fail(self, request: Request[Out], exc: errors.NacguardError) -> None:
        """Answer ``request`` with ``exc`` (unless it is answered already)."""
        if request.done:
            return
        self.retire(request)
        if not request.future.done():
            request.future.set_exception(exc)

    def expire(self, request: Request[Out]) -> None:
        """The deadline timer's callback."""
        # Images already in a batch are computed anyway; only a request with images still queued
        # has missed its deadline "before compute".
        if not request.done and request.queued:
            self.fail(request, errors.DeadlineExceeded("deadline passed while queued"))

    def retire(self, request: Request[Out]) -> None:
        """Mark ``request`` answered: remove its queued items and release its accounting."""
        if request.done:
            return
        request.done = True
        if request.timer is not None:
            request.timer.cancel()
        if request.queued:
            kept = [item for item in self.queue if item.request is not request]
            self.queue.clear()
            self.queue.extend(kept)
            request.queued = 0
        self.requests.discard(request)
        self.in_flight -= request.size
        if self.in_flight == 0:
            self.idle.set()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure that a smaller batch might avoid.

    Decided by type name and message so the engine need not import torch:
    ``torch.cuda.OutOfMemoryError`` (and other backends' ``RuntimeError: ... out of memory``).
    """
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


async def compute(
    runner: Runner[In, Out], batch: list[Item[In, Out]], ledger: Ledger[In, Out]
) -> int:
    """Compute ``batch`` on ``runner`` and answer its items; return how many failed.

    A failure fails only the batch's own requests (with
    :class:`~nacguard.errors.InferenceFailed`); an out-of-memory error first splits the batch
    in halves and retries each, recursively down to single images.

    Args:
        runner: the device.
        batch: the images (of requests not answered yet).
        ledger: answers the requests.
    """
    outputs: list[Out] | None = None
    out_of_memory = False
    message = ""
    try:
        outputs = await runner.run([item.value for item in batch])
        if len(outputs) != len(batch):
            raise RuntimeError(f"compute returned {len(outputs)} outputs for {len(batch)}")
    except Exception as exc:
        out_of_memory = is_out_of_memory(exc)
        message = str(exc) or type(exc).__name__
        if out_of_memory and len(batch) > 1:
            logger.warning(
                "%s: out of memory on a batch of %d, retrying in halves: %s",
                runner.name,
                len(batch),
                message,
            )
        else:
            logger.exception("%s: batch of %d failed", runner.name, len(batch))
        outputs = None
    if outputs is not None:
        for item, output in zip(batch, outputs, strict=True):
            ledger.deliver(item, output)
        return 0
    # Retry outside the except block, so the failed attempt's exception (and anything its
    # traceback still holds) is released before the smaller batches run.
    if out_of_memory and len(batch) > 1:
        half = len(batch) // 2
        failed = 0
        for part in (batch[:half], batch[half:]):
            # Requests answered meanwhile (cancelled, expired) need no retry.
            live = [item for item in part if not item.request.done]
            if live:
                failed += await compute(runner, live, ledger)
        return failed
    for item in batch:
        if not item.request.done:
            ledger.fail(item.request, errors.InferenceFailed(f"inference failed: {message}"))
    return len(batch)
