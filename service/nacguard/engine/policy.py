"""How long an idle device waits for batch-mates: the batching policy.

The batcher asks its policy one question, and only when a device is free and fewer than
``max_batch_size`` images are queued: *how much longer should the oldest queued image wait for
company?* A busy device never asks: while it computes, arrivals queue and the next batch fills
by itself (continuous batching). A full batch, or a draining batcher, never asks either.

:class:`FixedWait` answers "until the oldest image has waited ``max_wait_s``", the classic
dynamic-batching window. It doubles a lone request's latency on a small model: the image waits
for mates that never come.

:class:`AdaptiveWait` (the service's default) waits only when waiting is expected to pay. With
``n`` images queued, an expected gap ``g`` until the next arrival and a batch cost
``c(b) = a + k*b`` (``a``: the fixed cost of a batch, ``k``: the cost per image):

* run now: the ``n`` images finish after ``c(n)``; the next image arrives after ``g`` and, if
  ``g < c(n)``, waits for the device and then pays a batch of its own, ``a + k``;
* wait for it: all ``n + 1`` finish together after ``g + c(n + 1)``.

Summing the latency of the ``n + 1`` images, waiting saves ``2a - (n + 1) * g`` (and never saves
anything when ``g >= c(n)``: the device would be free again before the mate arrives). So the
policy waits only while ``(n + 1) * g < 2a``, for at most that break-even gap ``2a / (n + 1)``
(a mate later than that is overdue: the estimate is wrong for now), and never past
``max_wait_s`` from the oldest image's enqueue, the configured bound. Two measured conditions
guard the rule, because real traffic is not the independent arrivals it assumes:

* **A mate must actually come.** Every decision point is a trial, also when the policy runs at
  once: did an image arrive within the break-even window, before the batch's answer (after it,
  an arrival may be a client sending its next request, which could never have joined)? The
  policy waits with ``n`` images queued only if that happened at least half the time at recent
  decisions with ``n`` queued. In a closed loop of ``C`` clients the gaps are tiny while a burst
  arrives, yet nothing comes once all ``C`` are queued: the policy learns to wait for the
  clients it has and not for more.
* **The device must be busy at least half the time.** Waiting buys capacity (fewer, fuller
  batches); it pays only where capacity is short. On a lightly used device the wait is pure
  latency, and on a machine whose CPU time goes mostly to HTTP handling (this project's 2-core
  benchmark), syncing clients into one batch also loses the overlap of one request's compute
  with the next one's parsing.

**A saturated device fills its batches.** From a busy share of 80% on, queueing behind the
device is what latency is made of, and fuller batches shorten that queue: the cost rule is
dropped and the policy waits, while mates keep coming, up to ``max_wait_s`` from the oldest
image (the fixed window's behaviour, minus the wait for mates that cannot come). On a CPU shared
with HTTP handling, fewer batches also leave more CPU for the requests.

Mostly the device is busy and the question does not come up: continuous batching fills the
batches. The estimates are exponentially weighted moving averages, so they follow the load:

* ``g``: gaps between submits, each capped at ``4 * max_wait_s`` (one quiet minute must not take
  hundreds of arrivals to forget) and read at least as long as the time since the last arrival;
* ``a`` and ``k``: a least-squares line through (batch size, compute seconds) of recent batches.
  While every recent batch had the same size the line is undetermined; then ``a`` is taken as
  the whole batch cost, the optimistic guess (on a GPU a batch of 16 costs about what a batch of
  one does), corrected once batches of several sizes form;
* the busy share: per batch, its compute time over the time since the previous batch ended
  (with several devices, the previous batch of any device: an overestimate, which errs towards
  the fixed window's fuller batches).

Nothing is known before the first batches, so the policy does not wait then: a cold server
answers its first requests at once, and a lone request never waits.

Policies are pure bookkeeping over the times they are given: the clock is injected, so tests
drive them with arrival patterns on a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["AdaptiveWait", "BatchPolicy", "FixedWait"]

Clock = Callable[[], float]

BUSY = 0.5  # below this busy share, waiting only costs latency
SATURATED = 0.8  # from this busy share on, capacity decides latency: fill batches up to the bound


class BatchPolicy(Protocol):
    """What the batcher tells its policy and asks of it (all on the event loop)."""

    @property
    def max_wait_s(self) -> float:
        """The most any image may wait for batch-mates."""
        ...

    def on_submit(self, images: int) -> None:
        """``images`` were just queued by one submit."""
        ...

    def on_batch(self, size: int, compute_s: float) -> None:
        """A batch of ``size`` images took ``compute_s`` seconds of compute."""
        ...

    def wait_s(self, queued: int, waited_s: float) -> float:
        """Seconds the idle device should wait before taking a batch; 0 runs now.

        Args:
            queued: images queued (fewer than ``max_batch_size``, at least one).
            waited_s: how long the oldest of them has been queued.
        """
        ...


class FixedWait:
    """Wait until the oldest queued image has waited ``max_wait_s`` (or the batch is full).

    Args:
        max_wait_s: the window; 0 never waits.
    """

    def __init__(self, max_wait_s: float) -> None:
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._max_wait_s = max_wait_s

    @property
    def max_wait_s(self) -> float:
        """The window."""
        return self._max_wait_s

    def on_submit(self, images: int) -> None:
        """Not needed: the window does not depend on the traffic."""

    def on_batch(self, size: int, compute_s: float) -> None:
        """Not needed: the window does not depend on compute time."""

    def wait_s(self, queued: int, waited_s: float) -> float:
        """What is left of the oldest image's window."""
        return max(0.0, self._max_wait_s - waited_s)


class AdaptiveWait:
    """Wait for batch-mates only when one is expected soon enough to pay (module docstring).

    Args:
        max_wait_s: the bound: no image waits longer than this for mates; 0 never waits.
        alpha: weight of the newest observation in the moving averages (0 < alpha <= 1). Higher
            follows load changes faster and noise more.
        clock: monotonic seconds; injected so tests control time.
    """

    def __init__(
        self, max_wait_s: float, *, alpha: float = 0.2, clock: Clock = time.monotonic
    ) -> None:
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._max_wait_s = max_wait_s
        self._alpha = alpha
        self._clock = clock
        self._gap_cap = 4 * max_wait_s
        self._last_arrival = -math.inf
        self._gap = math.inf  # EWMA of the gap between submits
        # Per queue length n: EWMA of "a mate arrived within the break-even window" at decision
        # points with n images queued; and the decision awaiting its outcome: (n, when, window).
        self._hits: dict[int, float] = {}
        self._open: tuple[int, float, float] | None = None
        # EWMA of the device's busy fraction: per batch, compute / time since the last batch.
        self._busy = 0.0
        self._last_batch_end: float | None = None
        # EWMAs of b, c, b*b and b*c over recent batches (b: size, c: compute seconds).
        self._moments: list[float] | None = None
        self._overhead = 0.0  # a, refitted after every batch (decisions outnumber batches)

    @property
    def max_wait_s(self) -> float:
        """The bound."""
        return self._max_wait_s

    @property
    def gap_s(self) -> float:
        """Expected seconds between submits (``inf`` until two have been seen)."""
        return self._gap

    def hit_rate(self, queued: int) -> float:
        """Share of recent decision points with ``queued`` images at which a mate arrived
        within the window (0 where none was seen)."""
        return self._hits.get(queued, 0.0)

    @property
    def busy(self) -> float:
        """Recent share of time the device spent computing."""
        return self._busy

    @property
    def batch_overhead_s(self) -> float:
        """Estimated fixed cost of a batch, ``a`` (0 until a batch was computed)."""
        return self._overhead

    def on_submit(self, images: int) -> None:
        """Record an arrival at the clock's current time (one submit is one arrival)."""
        now = self._clock()
        if self._open is not None:
            _, decided, window = self._open
            self._outcome(now - decided <= window)
        gap = min(now - self._last_arrival, self._gap_cap)  # the first arrival: the cap
        self._last_arrival = now
        if math.isinf(self._gap):
            self._gap = gap  # the first gap replaces "unknown" outright
        else:
            self._gap += self._alpha * (gap - self._gap)

    def on_batch(self, size: int, compute_s: float) -> None:
        """Record a computed batch (sizes and times of failed batches are as good as any)."""
        if self._open is not None:
            # An arrival from now on may be the answer's own doing (a client sending its next
            # request): in a closed loop it could never have joined the batch, so it is no mate.
            self._outcome(False)
        if size < 1 or not math.isfinite(compute_s) or compute_s < 0:
            return
        now = self._clock()
        if self._last_batch_end is not None and now > self._last_batch_end:
            busy = min(1.0, compute_s / (now - self._last_batch_end))
            self._busy += self._alpha * (busy - self._busy)
        self._last_batch_end = now
        b, c = float(size), compute_s
        m = self._moments
        if m is None:
            self._moments = [b, c, b * b, b * c]
        else:
            w = self._alpha
            m[0] += w * (b - m[0])
            m[1] += w * (c - m[1])
            m[2] += w * (b * b - m[2])
            m[3] += w * (b * c - m[3])
        self._overhead = self._fit()[0]

    def wait_s(self, queued: int, waited_s: float) -> float:
        """Seconds to wait from now (0: run now); see the module docstring for the rule."""
        now = self._clock()
        if self._open is not None and now - self._open[1] > self._open[2]:
            self._outcome(False)  # the window closed without an arrival
        left = self._max_wait_s - waited_s
        if left <= 0 or queued < 1:
            return 0.0
        overhead = self._overhead
        if overhead <= 0:
            return 0.0
        break_even = 2 * overhead / (queued + 1)
        saturated = self._busy >= SATURATED
        window = left if saturated else min(left, break_even)
        # Every decision point is a trial, whether or not the policy waits this time: did a
        # mate arrive within the window? Judging the trials it declined too is what lets the
        # policy start waiting when the load changes.
        self._open = (queued, now, window)
        if self._busy < BUSY or self._hits.get(queued, 0.0) < 0.5:
            return 0.0
        if not saturated and not max(self._gap, now - self._last_arrival) < break_even:
            return 0.0
        return window

    def _outcome(self, hit: bool) -> None:
        assert self._open is not None
        queued = self._open[0]
        self._open = None
        old = self._hits.get(queued, 0.0)
        self._hits[queued] = old + self._alpha * (float(hit) - old)

    def _fit(self) -> tuple[float, float]:
        """``(a, k)`` of the batch cost line ``c(b) = a + k*b``; ``(0, 0)`` before any batch."""
        if self._moments is None:
            return 0.0, 0.0
        mb, mc, mbb, mbc = self._moments
        var = mbb - mb * mb
        if var < 0.25:  # (nearly) one batch size only: the slope is undetermined
            return mc, 0.0
        k = max(0.0, (mbc - mb * mc) / var)
        a = mc - k * mb
        # The fixed part of a batch can be neither negative nor more than the mean batch costs.
        return min(max(a, 0.0), mc), k
