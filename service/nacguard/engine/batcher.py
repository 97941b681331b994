"""Dynamic batching: many concurrent requests, few large forward passes.

A request submits its images and awaits one future; the images join one shared FIFO queue. Each
:class:`~nacguard.engine.runner.Runner` (one per device) has one consumer task that takes the next
batch off that queue whenever its device is free, so a free device always takes the next batch
and images of one request may be spread over several batches (and devices) while one batch mixes
images of many requests. Results are put back in the request's item order.

**Continuous batching.** While a device computes one batch, new images keep queueing; the moment
it is free it takes what has accumulated. Under load, batches therefore fill up by themselves
with no waiting at all, and the batch size follows the load.

**Waiting is measured from the oldest queued image.** Only an idle device with fewer than
``max_batch_size`` images queued waits, for batch-mates, and only until the *oldest* queued image
has waited ``max_wait_s``. Measuring from the oldest image (rather than restarting a timer on
every arrival, or from the moment the device became free) bounds the extra latency any one image
pays for batching to ``max_wait_s``: a steady trickle of arrivals cannot postpone a batch
indefinitely, and an image that already waited while the device was busy is not made to wait
again. A full batch, or a batcher that is draining, runs at once.

**Backpressure and lost causes are shed before they cost compute.** The queue is bounded: a
submit that does not fit is refused at once (:class:`~nacguard.errors.Overloaded`, with
``retry_after``), all or nothing. A request whose deadline passes while some of its images are
still queued is answered with :class:`~nacguard.errors.DeadlineExceeded` and its queued images
are removed; a cancelled submit (the client went away) likewise removes its queued images.

**Failures touch only what they must.** A batch whose compute raises fails only its own images
(:class:`~nacguard.errors.InferenceFailed`); the consumer lives on. An out-of-memory error first
splits the batch in halves and retries each (recursively, down to single images).

Everything here runs on the event loop and is event-driven (``asyncio.Event``); the only timed
wait is the one for the oldest image's ``max_wait_s``. No torch is imported: the engine is generic
over the items it batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, cast

from nacguard import errors
from nacguard.engine.runner import In, Out, Runner

__all__ = ["BatchStats", "Batcher"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """What happened to one batch taken off the queue; reported after it is computed.

    Attributes:
        device: name of the runner that computed it.
        size: images sent to compute (expired or cancelled images are not counted).
        queue_wait_s: per image, seconds from enqueue to the start of the batch.
        compute_s: seconds of compute, including out-of-memory retries.
        failed: images of the batch whose compute failed (after any retries).
    """

    device: str
    size: int
    queue_wait_s: list[float]
    compute_s: float
    failed: int = 0


@dataclass(eq=False)
class _Request(Generic[Out]):
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
class _Item(Generic[In, Out]):
    """One image waiting in the queue."""

    value: In
    request: _Request[Out]
    index: int
    enqueued_at: float


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure that a smaller batch might avoid.

    Decided by type name and message so the engine need not import torch:
    ``torch.cuda.OutOfMemoryError`` (and other backends' ``RuntimeError: ... out of memory``).
    """
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Batcher(Generic[In, Out]):
    """Dynamic batcher over one or more device runners.

    Args:
        runners: one runner per device; each gets its own consumer task. The batcher owns them
            and closes them in :meth:`stop`.
        max_batch_size: most images per compute call.
        max_wait_s: longest time the oldest queued image waits for batch-mates while a device is
            idle. 0 runs whatever is queued as soon as a device is free.
        max_queue: most images queued (not yet in a batch) at once; beyond, submits are refused.
        on_batch: called on the event loop after every computed batch. Exceptions it raises are
            logged and ignored.
        retry_after_s: the ``retry_after`` that :class:`~nacguard.errors.Overloaded` and
            :class:`~nacguard.errors.ShuttingDown` carry.

    Raises:
        ValueError: no runners or a limit out of range.
    """

    def __init__(
        self,
        runners: Sequence[Runner[In, Out]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if not runners:
            raise ValueError("a Batcher needs at least one runner")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._runners = list(runners)
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._retry_after_s = retry_after_s

        self._queue: deque[_Item[In, Out]] = deque()
        self._requests: set[_Request[Out]] = set()
        self._in_flight = 0
        # Set on every change a consumer may be waiting for (arrivals, stop); consumers clear it
        # before looking at the queue, so no wake-up is lost between looking and waiting.
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False  # no new submits; queued work runs without waiting for mates
        self._closing = False  # consumers exit once the queue is empty

    # --- public API ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Images queued and not yet taken into a batch."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Images accepted whose request is not answered yet (queued or computing)."""
        return self._in_flight

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` accepts work (started and not stopping)."""
        return self._started and not self._stopping

    async def start(self) -> None:
        """Start one consumer task per runner on the running event loop. Idempotent.

        Raises:
            RuntimeError: the batcher was stopped.
        """
        if self._stopping:
            raise RuntimeError("a stopped Batcher cannot be started again")
        if self._started:
            return
        self._started = True
        self._tasks = [
            asyncio.create_task(self._consume(runner), name=f"nacguard-batcher-{runner.name}")
            for runner in self._runners
        ]

    async def submit(self, items: Sequence[In], deadline: float) -> list[Out]:
        """Queue ``items`` for compute and return their outputs in item order.

        Args:
            items: the images (already decoded and validated; a bad one must not get here).
            deadline: ``time.monotonic()`` instant after which images still queued are dropped;
                ``math.inf`` for none.

        Returns:
            One output per item, in the order of ``items``.

        Raises:
            errors.NotReady: :meth:`start` was not called yet.
            errors.ShuttingDown: :meth:`stop` has begun (also for accepted work that a
                non-draining or timed-out stop abandoned).
            errors.PayloadTooLarge: more items than the whole queue holds; retrying cannot help.
            errors.Overloaded: the items do not fit in the queue now; nothing was queued.
            errors.DeadlineExceeded: the deadline passed while some items were still queued.
            errors.InferenceFailed: the compute of a batch holding some of the items raised.
        """
        if self._stopping:
            raise errors.ShuttingDown("shutting down", retry_after=self._retry_after_s)
        if not self._started:
            raise errors.NotReady("batcher not started", retry_after=self._retry_after_s)
        n = len(items)
        if n == 0:
            return []
        if n > self._max_queue:
            raise errors.PayloadTooLarge(
                f"{n} images in one request; the queue holds at most {self._max_queue}"
            )
        if len(self._queue) + n > self._max_queue:
            raise errors.Overloaded(
                f"queue full ({len(self._queue)} of {self._max_queue} images queued)",
                retry_after=self._retry_after_s,
            )
        now = time.monotonic()
        if deadline <= now:
            raise errors.DeadlineExceeded("deadline passed before the request was queued")

        loop = asyncio.get_running_loop()
        request: _Request[Out] = _Request(
            future=loop.create_future(),
            size=n,
            deadline=deadline,
            results=[None] * n,
            pending=n,
            queued=n,
        )
        self._queue.extend(
            _Item(value=value, request=request, index=i, enqueued_at=now)
            for i, value in enumerate(items)
        )
        self._requests.add(request)
        self._in_flight += n
        self._idle.clear()
        if math.isfinite(deadline):
            # Answer 504 when the deadline passes, not when a device gets round to the images.
            request.timer = loop.call_later(deadline - now, self._expire, request)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The client went away: its queued images must not cost compute.
            self._retire(request)
            raise

    async def wait_idle(self) -> None:
        """Wait until every accepted image is answered (returns at once if none is pending)."""
        await self._idle.wait()

    # The contract names a ``timeout`` argument: it bounds only the drain, not the whole call.
    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop accepting work, finish (or abandon) accepted work, stop consumers and runners.

        New submits are refused with :class:`~nacguard.errors.ShuttingDown` from the moment this
        is called. Idempotent; a second concurrent call waits for the first to finish.

        Args:
            drain: compute and answer everything already accepted before stopping.
            timeout: seconds to wait for the drain at most; ``None`` waits as long as it takes.
                Whatever is still unanswered after a timeout, or everything with
                ``drain=False``, is answered with :class:`~nacguard.errors.ShuttingDown`.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._wakeup.set()  # waiting for batch-mates is pointless now: none can arrive
        try:
            if drain and self._in_flight:
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout)
                except TimeoutError:
                    logger.warning(
                        "drain timed out after %ss with %d images unanswered",
                        timeout,
                        self._in_flight,
                    )
            for request in list(self._requests):
                abandoned = errors.ShuttingDown(
                    "shut down before computing", retry_after=self._retry_after_s
                )
                self._fail(request, abandoned)
            self._closing = True
            self._wakeup.set()
            # Consumers are idle after a drain; otherwise they may await a batch whose answer
            # nobody wants any more. Either way cancelling them is safe.
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for runner in self._runners:
                runner.close()
        finally:
            self._stopped.set()

    # --- consumers -----------------------------------------------------------------------------

    async def _consume(self, runner: Runner[In, Out]) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            try:
                await self._run_batch(runner, batch)
            except Exception as exc:
                # Only a bug in this module gets here; keep the consumer (and the device) alive
                # and make sure no future is left pending.
                logger.exception("%s: unexpected error handling a batch", runner.name)
                for item in batch:
                    self._fail(item.request, errors.InferenceFailed(f"internal error: {exc}"))

    async def _next_batch(self) -> list[_Item[In, Out]] | None:
        """Wait until a batch is due and take it; ``None`` when the consumer should exit."""
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return None
                await self._wakeup.wait()
                continue
            if len(self._queue) < self._max_batch_size and not self._stopping:
                due = self._queue[0].enqueued_at + self._max_wait_s
                remaining = due - time.monotonic()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    continue
            batch = self._take()
            if batch:
                return batch

    def _take(self) -> list[_Item[In, Out]]:
        """Pop up to ``max_batch_size`` items, answering those past their deadline instead."""
        now = time.monotonic()
        batch: list[_Item[In, Out]] = []
        while self._queue and len(batch) < self._max_batch_size:
            item = self._queue.popleft()
            request = item.request
            request.queued -= 1
            if request.deadline <= now:
                # The deadline timer may not have fired yet; the image still must not run.
                self._fail(request, errors.DeadlineExceeded("deadline passed while queued"))
                continue
            batch.append(item)
        return [item for item in batch if not item.request.done]

    async def _run_batch(self, runner: Runner[In, Out], batch: list[_Item[In, Out]]) -> None:
        start = time.monotonic()
        queue_wait_s = [start - item.enqueued_at for item in batch]
        failed = await self._compute(runner, batch)
        stats = BatchStats(
            device=runner.name,
            size=len(batch),
            queue_wait_s=queue_wait_s,
            compute_s=time.monotonic() - start,
            failed=failed,
        )
        if self._on_batch is not None:
            try:
                self._on_batch(stats)
            except Exception:
                logger.exception("on_batch callback raised")

    async def _compute(self, runner: Runner[In, Out], batch: list[_Item[In, Out]]) -> int:
        """Compute ``batch`` and answer its items; return how many failed."""
        outputs: list[Out] | None = None
        out_of_memory = False
        message = ""
        try:
            outputs = await runner.run([item.value for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"compute returned {len(outputs)} outputs for {len(batch)}")
        except Exception as exc:
            out_of_memory = _is_out_of_memory(exc)
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
                self._deliver(item, output)
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
                    failed += await self._compute(runner, live)
            return failed
        for item in batch:
            if not item.request.done:
                self._fail(item.request, errors.InferenceFailed(f"inference failed: {message}"))
        return len(batch)

    # --- request bookkeeping -------------------------------------------------------------------

    def _deliver(self, item: _Item[In, Out], output: Out) -> None:
        request = item.request
        if request.done:
            return
        request.results[item.index] = output
        request.pending -= 1
        if request.pending == 0:
            self._retire(request)
            if not request.future.done():
                request.future.set_result(cast(list[Out], request.results))

    def _fail(self, request: _Request[Out], exc: errors.NacguardError) -> None:
        if request.done:
            return
        self._retire(request)
        if not request.future.done():
            request.future.set_exception(exc)

    def _expire(self, request: _Request[Out]) -> None:
        # Images already in a batch are computed anyway; only a request with images still queued
        # has missed its deadline "before compute".
        if not request.done and request.queued:
            self._fail(request, errors.DeadlineExceeded("deadline passed while queued"))

    def _retire(self, request: _Request[Out]) -> None:
        """Mark ``request`` answered: remove its queued items and release its accounting."""
        if request.done:
            return
        request.done = True
        if request.timer is not None:
            request.timer.cancel()
        if request.queued:
            kept = [item for item in self._queue if item.request is not request]
            self._queue.clear()
            self._queue.extend(kept)
            request.queued = 0
        self._requests.discard(request)
        self._in_flight -= request.size
        if self._in_flight == 0:
            self._idle.set()
