"""Dynamic batching: many concurrent requests, few large forward passes.

A request submits its images and awaits one future; the images join one shared FIFO queue. Each
:class:`~nacguard.engine.runner.Runner` (one per device) has one consumer task that takes the next
batch off that queue whenever its device is free, so a free device always takes the next batch
and images of one request may be spread over several batches (and devices) while one batch mixes
images of many requests. Results are put back in the request's item order.

**Continuous batching.** While a device computes one batch, new images keep queueing; the moment
it is free it takes what has accumulated. Under load, batches therefore fill up by themselves
with no waiting at all, and the batch size follows the load.

**Waiting is the policy's decision, bounded from the oldest queued image.** Only a free device
with fewer than ``max_batch_size`` images queued may hold a batch back for batch-mates, for as
long as its :class:`~nacguard.engine.policy.BatchPolicy` says (asked again at every arrival):
:class:`~nacguard.engine.policy.AdaptiveWait` waits only when a mate is expected soon enough to
pay for the wait, so a lone request runs at once as with ``max_batch_size=1``;
:class:`~nacguard.engine.policy.FixedWait` waits until the oldest image has waited
``max_wait_s``. The bound is measured from the *oldest* image's enqueue, so a trickle of
arrivals cannot postpone a batch indefinitely and an image that already waited while the device
was busy does not wait again. A full batch, or a draining batcher, runs at once.

**Backpressure and lost causes are shed before they cost compute.** The queue is bounded: a
submit that does not fit is refused at once (:class:`~nacguard.errors.Overloaded`, with
``retry_after``), all or nothing. A request whose deadline passes while some of its images are
still queued is answered with :class:`~nacguard.errors.DeadlineExceeded` and its queued images
are removed; a cancelled submit (the client went away) likewise removes its queued images.

**Failures touch only what they must** (:func:`~nacguard.engine.work.compute`): a batch whose
compute raises fails only its own images; the consumer lives on. Out of memory splits the batch.

Everything here runs on the event loop and is event-driven (``asyncio.Event``); the only timed
waits are the policy's and the deadlines. No torch is imported: the engine is generic
over the items it batches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Generic

from nacguard import errors
from nacguard.engine.policy import BatchPolicy, FixedWait
from nacguard.engine.runner import In, Out, Runner
from nacguard.engine.work import BatchStats, Item, Ledger, Request, compute

__all__ = ["BatchStats", "Batcher"]

logger = logging.getLogger(__name__)


class Batcher(Generic[In, Out]):
    """Dynamic batcher over one or more device runners.

    Args:
        runners: one runner per device; each gets its own consumer task. The batcher owns them
            and closes them in :meth:`stop`.
        max_batch_size: most images per compute call.
        max_wait_s: the window of the default policy, :class:`~nacguard.engine.policy.FixedWait`
            (ignored when ``policy`` is given). 0 runs whatever is queued as soon as a device is
            free.
        max_queue: most images queued (not yet in a batch) at once; beyond, submits are refused.
        on_batch: called on the event loop after every computed batch. Exceptions it raises are
            logged and ignored.
        retry_after_s: the ``retry_after`` that :class:`~nacguard.errors.Overloaded` and
            :class:`~nacguard.errors.ShuttingDown` carry.
        policy: decides how long a free device waits for batch-mates (see
            :mod:`nacguard.engine.policy`); it owns its bound (``policy.max_wait_s``).

    Raises:
        ValueError: no runners or a limit out of range.
    """

    def __init__(
        self,
        runners: Sequence[Runner[In, Out]],
        *,
        max_batch_size: int,
        max_wait_s: float = 0.0,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        retry_after_s: float = 1.0,
        policy: BatchPolicy | None = None,
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
        self._policy: BatchPolicy = policy if policy is not None else FixedWait(max_wait_s)
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._retry_after_s = retry_after_s

        self._ledger: Ledger[In, Out] = Ledger()
        self._queue = self._ledger.queue  # the same deque, for brevity
        self._free = 0  # consumers looking for a batch (their device is not computing)
        self._unarmed: list[Request[Out]] = []  # submitted without a deadline timer
        # Set on every change a consumer may be waiting for (arrivals, stop); consumers clear it
        # before looking at the queue, so no wake-up is lost between looking and waiting.
        self._wakeup = asyncio.Event()
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
        return self._ledger.in_flight

    @property
    def policy(self) -> BatchPolicy:
        """The batching policy (read-only: for its estimates, e.g. in metrics)."""
        return self._policy

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
        request: Request[Out] = Request(
            future=loop.create_future(),
            size=n,
            deadline=deadline,
            results=[None] * n,
            pending=n,
            queued=n,
        )
        self._ledger.add(request, items, now)
        self._policy.on_submit(n)
        if math.isfinite(deadline):
            if self._free:
                # A free device takes these images within one loop step (and the take checks
                # the deadline); a timer is armed only if they stay queued (_arm_timers).
                self._unarmed.append(request)
            else:
                # Answer 504 when the deadline passes, not when a device gets round to it.
                request.timer = loop.call_later(deadline - now, self._ledger.expire, request)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            # The client went away: its queued images must not cost compute.
            self._ledger.retire(request)
            raise

    async def wait_idle(self) -> None:
        """Wait until every accepted image is answered (returns at once if none is pending)."""
        await self._ledger.idle.wait()

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
            if drain and self._ledger.in_flight:
                try:
                    await asyncio.wait_for(self._ledger.idle.wait(), timeout)
                except TimeoutError:
                    logger.warning(
                        "drain timed out after %ss with %d images unanswered",
                        timeout,
                        self._ledger.in_flight,
                    )
            for request in list(self._ledger.requests):
                abandoned = errors.ShuttingDown(
                    "shut down before computing", retry_after=self._retry_after_s
                )
                self._ledger.fail(request, abandoned)
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
            self._free += 1
            try:
                taken = await self._next_batch()
            finally:
                self._free -= 1
            if taken is None:
                return
            batch, policy_wait_s = taken
            try:
                await self._run_batch(runner, batch, policy_wait_s)
            except Exception as exc:
                # Only a bug in this module gets here; keep the consumer (and the device) alive
                # and make sure no future is left pending.
                logger.exception("%s: unexpected error handling a batch", runner.name)
                for item in batch:
                    self._ledger.fail(
                        item.request, errors.InferenceFailed(f"internal error: {exc}")
                    )

    async def _next_batch(self) -> tuple[list[Item[In, Out]], float] | None:
        """Wait until a batch is due and take it, with the seconds spent waiting on the policy;
        ``None`` when the consumer should exit."""
        loop = asyncio.get_running_loop()
        policy_wait_s = 0.0
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return None
                policy_wait_s = 0.0
                await self._wakeup.wait()
                continue
            queued = len(self._queue)
            if queued < self._max_batch_size and not self._stopping:
                now = time.monotonic()
                delay = self._policy.wait_s(queued, now - self._queue[0].enqueued_at)
                if delay > 0:
                    self._arm_timers()  # the queued images may now wait past their deadline
                    # A timer handle, not asyncio.wait_for: no task per wait.
                    timer = loop.call_later(delay, self._wakeup.set)
                    try:
                        await self._wakeup.wait()
                    finally:
                        timer.cancel()
                    policy_wait_s += time.monotonic() - now
                    continue
            batch = self._take()
            self._arm_timers()  # for what stays queued; clears the list either way
            if batch:
                return batch, policy_wait_s

    def _arm_timers(self) -> None:
        """Arm the deadline timers that submits skipped because a device was free.

        A lone request's path stays short: a submit that finds a device free arms no timer (the
        device takes it within one loop step, and the take checks the deadline); only requests
        that stay queued, behind a busy device or waiting for mates, get one.
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for request in self._unarmed:
            if not request.done and request.queued and request.timer is None:
                request.timer = loop.call_later(
                    request.deadline - now, self._ledger.expire, request
                )
        self._unarmed.clear()

    def _take(self) -> list[Item[In, Out]]:
        """Pop up to ``max_batch_size`` items, answering those past their deadline instead."""
        now = time.monotonic()
        batch: list[Item[In, Out]] = []
        while self._queue and len(batch) < self._max_batch_size:
            item = self._queue.popleft()
            request = item.request
            request.queued -= 1
            if request.deadline <= now:
                # The deadline timer may not have fired yet; the image still must not run.
                self._ledger.fail(request, errors.DeadlineExceeded("deadline passed while queued"))
                continue
            batch.append(item)
        return [item for item in batch if not item.request.done]

    async def _run_batch(
        self, runner: Runner[In, Out], batch: list[Item[In, Out]], policy_wait_s: float
    ) -> None:
        start = time.monotonic()
        queue_wait_s = [start - item.enqueued_at for item in batch]
        failed = await compute(runner, batch, self._ledger)
        compute_s = time.monotonic() - start
        self._policy.on_batch(len(batch), compute_s)
        stats = BatchStats(
            device=runner.name,
            size=len(batch),
            queue_wait_s=queue_wait_s,
            compute_s=compute_s,
            failed=failed,
            policy_wait_s=policy_wait_s,
        )
        if self._on_batch is not None:
            try:
                self._on_batch(stats)
            except Exception:
                logger.exception("on_batch callback raised")
