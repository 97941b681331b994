"""Admission: the one check that lets a request in, and the counts the drain waits on.

A request is *admitted* from :meth:`Gate.admit` until its images are queued (or it needs none)
and *in progress* until it is answered. The drain waits for both to reach zero.
"""

from __future__ import annotations

import asyncio
import time

from nacguard.errors import Overloaded

__all__ = ["Admission", "Gate", "wait_until"]


async def wait_until(event: asyncio.Event, deadline: float) -> bool:
    """Wait for ``event`` until the ``time.monotonic()`` instant ``deadline``; whether it is set."""
    remaining = deadline - time.monotonic()
    if event.is_set():
        return True
    if remaining <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), remaining)
    except TimeoutError:
        return False
    return True


class Gate:
    """Counts admitted and in-progress requests against one bound.

    Args:
        max_in_progress: requests in progress before new ones are shed (``max_queue_images``).
        retry_after_s: the ``Retry-After`` of a refusal.
    """

    def __init__(self, max_in_progress: int, retry_after_s: float) -> None:
        self.max_in_progress = max_in_progress
        self.retry_after_s = retry_after_s
        self.admitted = 0
        self.in_progress = 0
        self.no_admitted = asyncio.Event()
        self.no_admitted.set()
        self.idle = asyncio.Event()
        self.idle.set()

    def check_capacity(self) -> None:
        """The overload bound, in one place (the HTTP middleware sheds early through it too).

        Requests still being read or decoded have not reached the batcher's bounded queue;
        without this bound a flood waits there (decode pool, event loop), unbounded and never
        shed. Each request holds at least one image, so this keeps the queue bound's promise:
        latency up to about max_queue_images / throughput, then 429.

        Raises:
            Overloaded: ``max_in_progress`` requests are in progress already.
        """
        if self.in_progress >= self.max_in_progress:
            raise Overloaded("too many requests in progress", retry_after=self.retry_after_s)

    def admit(self) -> Admission:
        """Count one request in (after :meth:`check_capacity`)."""
        self.check_capacity()
        self.admitted += 1
        self.no_admitted.clear()
        self.in_progress += 1
        self.idle.clear()
        return Admission(self)

    def _release_admitted(self) -> None:
        self.admitted -= 1
        if self.admitted == 0:
            self.no_admitted.set()

    def _release_request(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0:
            self.idle.set()


class Admission:
    """A request let in by :meth:`Service.admit <nacguard.serving.Service.admit>`.

    While admitted and not yet queued, the request holds up the drain (it was accepted, so it
    must be answered); :meth:`queued` marks the hand-over to the batcher, :meth:`close` the end
    of the request. Both are idempotent.
    """

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._admitted = True
        self._open = True

    def queued(self) -> None:
        """The request's images are in the batcher (or it needs none): stop holding the drain."""
        if self._admitted:
            self._admitted = False
            self._gate._release_admitted()

    def close(self) -> None:
        """The request is answered (or failed)."""
        self.queued()
        if self._open:
            self._open = False
            self._gate._release_request()
