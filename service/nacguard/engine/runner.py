"""The device runner: one dedicated thread per device that runs the model's compute function.

The event loop must never run torch: a forward pass blocks for milliseconds to seconds, and while
it blocks no request is accepted, no health probe answered, no metric scraped. So every device
gets one long-lived thread, and the loop only hands it work and awaits a future. One thread (not
a pool) per device because a device computes one batch at a time anyway, and because torch keeps
per-thread state (current CUDA device and stream, grad mode) that should stay put.

The thread resolves the loop's future with ``loop.call_soon_threadsafe``: asyncio futures are not
thread-safe, so the result must be set on the loop's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["In", "Out", "Runner"]

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job(Generic[In, Out]):
    """One compute call handed to the runner's thread."""

    items: list[In]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Out]]


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    # The awaiting task may have been cancelled meanwhile; a done future must not be set again.
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Runner(Generic[In, Out]):
    """Runs ``compute`` for one device on a dedicated thread.

    The thread is started on the first :meth:`run` and lives until :meth:`close`. An exception
    raised by ``compute`` is handed to the awaiting caller; the thread lives on.

    Args:
        compute: blocking function mapping a batch to one output per item, in order. Called only
            on this runner's thread, one batch at a time.
        name: device name (e.g. ``"cpu"``, ``"cuda:0"``); names the thread and is reported in
            ``BatchStats.device``.
    """

    def __init__(self, compute: Callable[[list[In]], list[Out]], *, name: str) -> None:
        self._compute = compute
        self.name = name
        self._jobs: queue.SimpleQueue[_Job[In, Out] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def run(self, items: list[In]) -> list[Out]:
        """Compute one batch on the runner's thread and return its outputs.

        Args:
            items: the batch.

        Returns:
            Whatever ``compute`` returned for the batch.

        Raises:
            RuntimeError: the runner is closed.
            Exception: whatever ``compute`` raised.
        """
        if self._closed:
            raise RuntimeError(f"runner {self.name!r} is closed")
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Out]] = loop.create_future()
        self._jobs.put(_Job(items=items, loop=loop, future=future))
        # If the caller is cancelled the thread still finishes the batch (torch cannot be
        # interrupted) and its result is dropped by _set_result.
        return await future

    def close(self) -> None:
        """Stop the thread once its current batch (if any) is done. Does not block.

        Batches queued on the runner but not started are failed with ``RuntimeError``.
        """
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Block until the thread has exited (after :meth:`close`).

        Args:
            timeout: seconds to wait at most; ``None`` waits as long as it takes.

        Returns:
            True when no thread is running any more.
        """
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                # Daemon: a compute stuck in a driver call must not keep the process alive after
                # the server has decided to exit.
                self._thread = threading.Thread(
                    target=self._work, name=f"nacguard-runner-{self.name}", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            self._run_job(job)
        # Anything queued after close() would never run: fail it rather than leave it pending.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._resolve(job, exc=RuntimeError(f"runner {self.name!r} is closed"))

    def _run_job(self, job: _Job[In, Out]) -> None:
        try:
            result = self._compute(job.items)
        except BaseException as exc:  # the thread must survive anything compute does
            # The traceback's frames hold compute's locals (activations, possibly GiBs of device
            # memory) for as long as anyone holds the exception. Clear them now, so that an
            # out-of-memory retry on a smaller batch finds that memory free; file names and line
            # numbers survive for the log.
            traceback.clear_frames(exc.__traceback__)
            # A non-Exception (SystemExit, KeyboardInterrupt) from another thread is not meant
            # for the loop's control flow; hand it over as an ordinary error.
            err = exc if isinstance(exc, Exception) else RuntimeError(f"compute raised {exc!r}")
            self._resolve(job, exc=err)
        else:
            self._resolve(job, result=result)

    @staticmethod
    def _resolve(
        job: _Job[In, Out], *, result: list[Out] | None = None, exc: BaseException | None = None
    ) -> None:
        try:
            if exc is not None:
                job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
            else:
                job.loop.call_soon_threadsafe(_set_result, job.future, result)
        except RuntimeError:
            # The loop is closed: nobody is waiting for this answer any more.
            logger.debug("event loop closed before a runner result was delivered")
