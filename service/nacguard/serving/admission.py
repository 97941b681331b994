"""Admission: the one check that lets a request in, and the counts the drain waits on.

A request is *admitted* from :meth:`Gate.admit` until its images are queued (or it needs none)
and *in progress* until it is answered. The drain waits for both to reach zero.
"""

from __future__ import annotations

import asyncio
import math
import time
from enum import IntEnum

from nacguard.errors import Overloaded
from nacguard.settings import Settings

__all__ = ["Admission", "Gate", "Priority", "wait_until"]


class Priority(IntEnum):
    """A request's priority: under overload, ``LOW`` is shed first and ``HIGH`` last."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


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
        max_in_progress: requests in progress before even high-priority ones are shed
            (``max_queue_images``).
        retry_after_s: the ``Retry-After`` of a refusal.
        low_share: low-priority requests are shed from ``low_share * max_in_progress`` on.
        normal_share: normal ones from ``normal_share * max_in_progress`` on.
    """

    def __init__(
        self,
        max_in_progress: int,
        retry_after_s: float,
        *,
        low_share: float = 1.0,
        normal_share: float = 1.0,
    ) -> None:
        self.max_in_progress = max_in_progress
        self.retry_after_s = retry_after_s
        #: The in-progress count at which each priority is shed, by ``Priority`` value.
        # Rounded up: a small bound (a test's 3) keeps its whole size for normal traffic.
        self.limits = (
            max(1, math.ceil(max_in_progress * low_share)),
            max(1, math.ceil(max_in_progress * normal_share)),
            max_in_progress,
        )
        self.admitted = 0
        self.in_progress = 0
        self.no_admitted = asyncio.Event()
        self.no_admitted.set()
        self.idle = asyncio.Event()
        self.idle.set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Gate:
        """The gate of ``max_queue_images`` and the priority shares."""
        return cls(
            settings.max_queue_images,
            settings.retry_after_s,
            low_share=settings.low_priority_share,
            normal_share=settings.normal_priority_share,
        )

    def check_capacity(self, priority: Priority = Priority.NORMAL) -> None:
        """The overload bound, in one place (the HTTP middleware sheds early through it too).

        Requests still being read or decoded have not reached the batcher's bounded queue;
        without this bound a flood waits there (decode pool, event loop), unbounded and never
        shed. Each request holds at least one image, so this keeps the queue bound's promise:
        latency up to about max_queue_images / throughput, then 429. The bound depends on the
        request's priority (:attr:`limits`): low-priority requests are refused first, while
        there is still room for the others; high-priority ones last.

        Raises:
            Overloaded: the priority's limit of requests is in progress already.
        """
        if self.in_progress >= self.limits[priority]:
            raise Overloaded("too many requests in progress", retry_after=self.retry_after_s)

    def admit(self, priority: Priority = Priority.NORMAL) -> Admission:
        """Count one request in (after :meth:`check_capacity`)."""
        self.check_capacity(priority)
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
