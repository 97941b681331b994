"""The batcher and its policy: it asks when a free device may wait, and obeys.

Gated runners as in test_engine_batcher; a scripted policy decides the waits, so these tests
say exactly when a batch may run. No test asserts on timing.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from nacguard import errors
from nacguard.engine import AdaptiveWait, Batcher, BatchStats, Runner
from tests.unit.engine.gates import FOREVER, WAIT_S, Factory, result, submit, until

LONG = 60.0  # a wait no test may sit out


class Scripted:
    """A policy that waits ``LONG`` while fewer than ``until`` images are queued."""

    def __init__(self, until: int) -> None:
        self.until = until
        self.asked: list[int] = []
        self.submits: list[int] = []
        self.batches: list[int] = []

    @property
    def max_wait_s(self) -> float:
        return LONG

    def on_submit(self, images: int) -> None:
        self.submits.append(images)

    def on_batch(self, size: int, compute_s: float) -> None:
        self.batches.append(size)

    def wait_s(self, queued: int, waited_s: float) -> float:
        self.asked.append(queued)
        return LONG if queued < self.until else 0.0


async def start(policy: Scripted, *, max_batch_size: int = 8) -> Batcher[int, int]:
    runner: Runner[int, int] = Runner(lambda xs: [10 * x for x in xs], name="cpu")
    batcher: Batcher[int, int] = Batcher(
        [runner], max_batch_size=max_batch_size, max_queue=64, policy=policy
    )
    await batcher.start()
    return batcher


async def test_lone_requests_run_at_once_under_a_long_adaptive_bound() -> None:
    stats: list[BatchStats] = []
    runner: Runner[int, int] = Runner(lambda xs: [10 * x for x in xs], name="cpu")
    batcher: Batcher[int, int] = Batcher(
        [runner], max_batch_size=8, max_queue=64, policy=AdaptiveWait(LONG), on_batch=stats.append
    )
    await batcher.start()
    try:
        # With a fixed 60 s window each of these would wait a minute for a mate.
        for x in range(20):
            assert await result(batcher.submit([x], FOREVER)) == [10 * x]
    finally:
        await batcher.stop()
    assert [s.size for s in stats] == [1] * 20
    assert all(s.policy_wait_s == 0.0 for s in stats)


async def test_free_device_holds_the_batch_while_the_policy_says_and_reasks_per_arrival() -> None:
    stats: list[BatchStats] = []
    policy = Scripted(until=3)
    runner: Runner[int, int] = Runner(lambda xs: [10 * x for x in xs], name="cpu")
    batcher: Batcher[int, int] = Batcher(
        [runner], max_batch_size=8, max_queue=64, policy=policy, on_batch=stats.append
    )
    await batcher.start()
    try:
        one = submit(batcher, [1])
        await until(lambda: policy.asked == [1])
        two = submit(batcher, [2])
        await until(lambda: policy.asked == [1, 2])
        assert batcher.queue_depth == 2  # still held
        three = submit(batcher, [3])
        assert [await result(t) for t in (one, two, three)] == [[10], [20], [30]]
    finally:
        await batcher.stop()
    assert policy.asked == [1, 2, 3]
    assert policy.submits == [1, 1, 1]
    assert policy.batches == [3]
    assert [s.size for s in stats] == [3]
    assert stats[0].policy_wait_s > 0  # the held time is reported


async def test_full_batch_runs_without_asking_the_policy() -> None:
    policy = Scripted(until=100)
    batcher = await start(policy, max_batch_size=4)
    try:
        assert await result(batcher.submit([1, 2, 3, 4], FOREVER)) == [10, 20, 30, 40]
    finally:
        await batcher.stop()
    assert policy.asked == []


async def test_image_held_for_mates_still_expires_at_its_deadline() -> None:
    # Submitted while the device is free, so no timer is armed at submit; the wait arms it.
    batcher = await start(Scripted(until=100))
    try:
        with pytest.raises(errors.DeadlineExceeded):
            await result(batcher.submit([1], time.monotonic() + 0.05))
        assert batcher.queue_depth == 0
        assert batcher.in_flight == 0
    finally:
        await batcher.stop()


async def test_rest_of_a_submit_left_behind_a_busy_device_expires(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=2)
    # The device is free at submit; [1, 2] is taken, [3] stays queued behind the busy device.
    task = submit(batcher, [1, 2, 3], deadline=time.monotonic() + 0.05)
    assert await gate.next_batch() == [1, 2]
    with pytest.raises(errors.DeadlineExceeded):
        await result(task)  # answered while the device is still busy
    assert gate.calls == [[1, 2]]
    gate.open()
    await asyncio.wait_for(batcher.wait_idle(), WAIT_S)
    assert gate.computed() == {1, 2}


async def test_stop_does_not_sit_out_a_policy_wait() -> None:
    batcher = await start(Scripted(until=100))
    held = submit(batcher, [1])
    await until(lambda: batcher.queue_depth == 1)
    await asyncio.wait_for(batcher.stop(drain=True), WAIT_S)
    assert await result(held) == [10]
