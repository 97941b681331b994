"""Batcher lifecycle: start, invalid limits, stop with and without drain, concurrent stops.

Gated runners as in test_engine_batcher (see tests/unit/engine/gates.py); no test asserts on
timing.
"""

from __future__ import annotations

import asyncio

import pytest

from nacguard import errors
from nacguard.engine import Batcher, BatchStats, Runner
from tests.unit.engine.gates import FOREVER, WAIT_S, Factory, result, submit, until

# --- lifecycle -----------------------------------------------------------------------------------


async def test_submit_before_start_is_not_ready() -> None:
    runner: Runner[int, int] = Runner(lambda items: items, name="cpu")
    batcher: Batcher[int, int] = Batcher([runner], max_batch_size=2, max_wait_s=0, max_queue=4)
    with pytest.raises(errors.NotReady):
        await batcher.submit([1], FOREVER)
    await batcher.stop()
    assert runner.closed


async def test_invalid_limits_are_rejected() -> None:
    runner: Runner[int, int] = Runner(lambda items: items, name="cpu")
    with pytest.raises(ValueError):
        Batcher([], max_batch_size=2, max_wait_s=0, max_queue=4)
    with pytest.raises(ValueError):
        Batcher([runner], max_batch_size=0, max_wait_s=0, max_queue=4)
    with pytest.raises(ValueError):
        Batcher([runner], max_batch_size=2, max_wait_s=-1, max_queue=4)
    with pytest.raises(ValueError):
        Batcher([runner], max_batch_size=2, max_wait_s=0, max_queue=0)


async def test_stop_with_drain_answers_everything_accepted_and_refuses_new(
    make: Factory,
) -> None:
    stats: list[BatchStats] = []
    batcher, (gate,) = await make(max_batch_size=2, max_wait_s=60.0, on_batch=stats.append)
    first = submit(batcher, [1, 2])
    assert await gate.next_batch() == [1, 2]
    queued = submit(batcher, [3, 4, 5])  # fills one batch, leaves one image short of another
    await until(lambda: batcher.queue_depth == 3)
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await until(lambda: not batcher.accepting)
    with pytest.raises(errors.ShuttingDown) as info:
        await batcher.submit([9], FOREVER)
    assert info.value.retry_after == 3.0
    assert not stopping.done()
    gate.open()
    await asyncio.wait_for(stopping, WAIT_S)
    assert await result(first) == [10, 20]
    # The lone [5] did not wait 60 s for a mate: a draining batcher runs what it has.
    assert await result(queued) == [30, 40, 50]
    assert gate.calls == [[1, 2], [3, 4], [5]]
    assert sum(s.size for s in stats) == 5
    assert batcher.in_flight == 0
    await batcher.stop()  # idempotent


async def test_stop_without_drain_answers_pending_with_shutting_down(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    running = submit(batcher, [1])
    await gate.next_batch()
    queued = submit(batcher, [2])
    await until(lambda: batcher.queue_depth == 1)
    await asyncio.wait_for(batcher.stop(drain=False), WAIT_S)
    for task in (running, queued):
        with pytest.raises(errors.ShuttingDown):
            await result(task)
    assert batcher.in_flight == 0
    assert batcher.queue_depth == 0
    gate.open()
    assert gate.calls == [[1]]


async def test_stop_drain_timeout_answers_the_rest_with_shutting_down(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    stuck = submit(batcher, [1])
    await gate.next_batch()
    await asyncio.wait_for(batcher.stop(drain=True, timeout=0.02), WAIT_S)
    with pytest.raises(errors.ShuttingDown):
        await result(stuck)
    assert batcher.in_flight == 0


async def test_concurrent_stop_calls_both_wait_for_the_drain(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    task = submit(batcher, [1])
    await gate.next_batch()
    one = asyncio.create_task(batcher.stop())
    two = asyncio.create_task(batcher.stop())
    await until(lambda: not batcher.accepting)
    assert not one.done() and not two.done()
    gate.open()
    await asyncio.wait_for(asyncio.gather(one, two), WAIT_S)
    assert await result(task) == [10]
