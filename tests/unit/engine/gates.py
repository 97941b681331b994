"""Helpers for the engine tests: a gated compute function, a batcher factory, polling."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nacguard.engine import Batcher

__all__ = ["FOREVER", "WAIT_S", "Factory", "Gate", "clock_past", "result", "submit", "until"]

WAIT_S = 2.0  # upper bound for anything a test awaits; reached only when a test fails
FOREVER = math.inf


class Gate:
    """A compute function (x -> 10x) whose calls block until the test lets them finish."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, open_: bool = False) -> None:
        self.loop = loop
        self.calls: list[list[int]] = []
        self.started: asyncio.Queue[list[int]] = asyncio.Queue()
        self.raise_for: Callable[[list[int]], BaseException | None] = lambda items: None
        self._cond = threading.Condition()
        self._permits = 0
        self._open = open_

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.loop.call_soon_threadsafe(self.started.put_nowait, list(items))
        with self._cond:
            if not self._cond.wait_for(lambda: self._open or self._permits > 0, timeout=5):
                raise RuntimeError("gate never released")
            if not self._open:
                self._permits -= 1
        exc = self.raise_for(items)
        if exc is not None:
            raise exc
        return [10 * x for x in items]

    def release(self, n: int = 1) -> None:
        """Let ``n`` blocked (or future) calls finish."""
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def open(self) -> None:
        """Let every call finish from now on."""
        with self._cond:
            self._open = True
            self._cond.notify_all()

    async def next_batch(self) -> list[int]:
        """The items of the next compute call, once it has started."""
        return await asyncio.wait_for(self.started.get(), WAIT_S)

    def computed(self) -> set[int]:
        return {x for call in self.calls for x in call}


Factory = Callable[..., Awaitable[tuple[Batcher[int, int], list[Gate]]]]


def submit(batcher: Batcher[int, int], items: list[int], deadline: float = FOREVER) -> Any:
    return asyncio.create_task(batcher.submit(items, deadline))


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def clock_past(instant: float) -> None:
    """Let real time pass ``instant`` (for max_wait/deadline tests, whose subject is time)."""
    # asyncio may fire a timer up to its clock resolution early; the margin covers that.
    await asyncio.sleep(max(0.0, instant - time.monotonic()) + 0.002)
    assert time.monotonic() > instant


async def result(task: Any) -> Any:
    return await asyncio.wait_for(task, WAIT_S)
