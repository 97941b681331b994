"""Runner: compute runs on one dedicated thread, never the loop's; errors reach the caller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nacguard.engine import Runner


async def test_compute_runs_on_one_dedicated_thread() -> None:
    threads: list[int] = []

    def compute(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        return [x + 1 for x in items]

    runner: Runner[int, int] = Runner(compute, name="cpu")
    assert await runner.run([1, 2]) == [2, 3]
    assert await runner.run([5]) == [6]
    assert len(set(threads)) == 1
    assert threads[0] != threading.get_ident()  # not the event loop's thread
    runner.close()
    assert runner.join(2)


async def test_exception_reaches_caller_and_thread_lives_on() -> None:
    def compute(items: list[int]) -> list[int]:
        if items[0] < 0:
            raise ValueError("negative input")
        return items

    runner: Runner[int, int] = Runner(compute, name="cpu")
    with pytest.raises(ValueError, match="negative input"):
        await runner.run([-1])
    assert await runner.run([3]) == [3]
    runner.close()
    assert runner.join(2)


async def test_base_exception_in_compute_becomes_an_ordinary_error() -> None:
    def compute(items: list[int]) -> list[int]:
        raise KeyboardInterrupt

    runner: Runner[int, int] = Runner(compute, name="cpu")
    with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
        await runner.run([1])
    runner.close()
    assert runner.join(2)


async def test_cancelled_caller_does_not_break_the_runner() -> None:
    release = threading.Event()
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()

    def compute(items: list[int]) -> list[int]:
        loop.call_soon_threadsafe(entered.set)
        assert release.wait(5)
        return items

    runner: Runner[int, int] = Runner(compute, name="cpu")
    task = asyncio.create_task(runner.run([1]))
    await asyncio.wait_for(entered.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    # The late result of the cancelled call is dropped; the next call works.
    assert await asyncio.wait_for(runner.run([7]), 2) == [7]
    runner.close()
    assert runner.join(2)


async def test_run_after_close_raises() -> None:
    runner: Runner[int, int] = Runner(lambda items: items, name="cpu")
    runner.close()
    runner.close()  # idempotent
    assert runner.closed
    assert runner.join(1)  # never started
    with pytest.raises(RuntimeError, match="closed"):
        await runner.run([1])
