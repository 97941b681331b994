"""Batcher: deterministic tests driven by a compute function that blocks until released.

A :class:`Gate` is the compute function of a real :class:`Runner`. Each call reports its batch on
an asyncio queue and then blocks its runner thread until the test releases it, so a test decides
exactly when a device is busy and when it becomes free. No test asserts on timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from nacguard import errors
from nacguard.engine import Batcher, BatchStats, Runner
from tests.unit.engine.gates import FOREVER, WAIT_S, Factory, clock_past, result, submit, until

# --- batching ------------------------------------------------------------------------------------


async def test_submits_arriving_while_busy_share_the_next_batch(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    first = submit(batcher, [1])
    assert await gate.next_batch() == [1]  # device now busy
    a, b, c = submit(batcher, [2, 3]), submit(batcher, [4]), submit(batcher, [5, 6])
    await until(lambda: batcher.queue_depth == 5)
    gate.open()
    assert await gate.next_batch() == [2, 3, 4, 5, 6]  # continuous batching: one batch
    assert await result(first) == [10]
    assert await result(a) == [20, 30]
    assert await result(b) == [40]
    assert await result(c) == [50, 60]
    assert gate.calls == [[1], [2, 3, 4, 5, 6]]


async def test_max_batch_size_respected_and_one_submit_split_in_order(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=3)
    first = submit(batcher, [0])
    await gate.next_batch()
    big = submit(batcher, list(range(1, 8)))
    other = submit(batcher, [100])
    await until(lambda: batcher.queue_depth == 8)
    gate.open()
    assert await result(big) == [10 * x for x in range(1, 8)]
    assert await result(other) == [1000]
    await result(first)
    assert gate.calls == [[0], [1, 2, 3], [4, 5, 6], [7, 100]]


async def test_idle_device_waits_for_mates_and_a_full_batch_runs_at_once(make: Factory) -> None:
    # max_wait is far longer than the test may take: only a full batch can run.
    batcher, (gate,) = await make(open_=True, max_batch_size=4, max_wait_s=60.0)
    lone = submit(batcher, [1])
    await until(lambda: batcher.queue_depth == 1)
    rest = submit(batcher, [2, 3, 4])
    assert await result(lone) == [10]
    assert await result(rest) == [20, 30, 40]
    assert gate.calls == [[1, 2, 3, 4]]


async def test_partial_batch_runs_once_the_oldest_has_waited_max_wait(make: Factory) -> None:
    batcher, (gate,) = await make(open_=True, max_batch_size=8, max_wait_s=0.01)
    assert await result(submit(batcher, [1, 2])) == [10, 20]
    assert gate.calls == [[1, 2]]


async def test_max_wait_is_measured_from_the_oldest_image(make: Factory) -> None:
    max_wait = 0.05
    batcher, (gate,) = await make(max_batch_size=8, max_wait_s=max_wait)
    first = submit(batcher, [1])
    await gate.next_batch()  # device busy with [1]
    enqueued = time.monotonic()
    second = submit(batcher, [2])
    await until(lambda: batcher.queue_depth == 1)
    await clock_past(enqueued + max_wait)  # [2] has waited its max_wait while the device was busy
    gate.release()
    assert await result(first) == [10]
    # The device is free and the oldest image already waited long enough: [2] was taken at once,
    # in the same loop step that answered [1], so an image arriving now does not join it.
    third = submit(batcher, [3])
    assert await gate.next_batch() == [2]
    gate.open()
    assert await result(second) == [20]
    assert await result(third) == [30]
    assert gate.calls == [[1], [2], [3]]


# --- backpressure --------------------------------------------------------------------------------


async def test_full_queue_refuses_a_submit_at_once_and_queues_nothing(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8, max_queue=4)
    first = submit(batcher, [1])
    await gate.next_batch()
    queued = submit(batcher, [2, 3, 4])
    await until(lambda: batcher.queue_depth == 3)
    with pytest.raises(errors.Overloaded) as info:
        await batcher.submit([50, 51], FOREVER)  # 3 + 2 > 4: all or nothing
    assert info.value.retry_after == 3.0
    assert batcher.queue_depth == 3
    assert batcher.in_flight == 4
    fits = submit(batcher, [5])  # 3 + 1 == 4 still fits
    await until(lambda: batcher.queue_depth == 4)
    gate.open()
    assert await result(first) == [10]
    assert await result(queued) == [20, 30, 40]
    assert await result(fits) == [50]
    assert not {50, 51} & gate.computed()
    assert batcher.in_flight == 0


async def test_submit_larger_than_the_queue_is_too_large(make: Factory) -> None:
    batcher, _ = await make(max_queue=4)
    with pytest.raises(errors.PayloadTooLarge):
        await batcher.submit([1, 2, 3, 4, 5], FOREVER)
    assert batcher.queue_depth == 0


async def test_empty_submit_returns_empty(make: Factory) -> None:
    batcher, (gate,) = await make()
    assert await batcher.submit([], FOREVER) == []
    assert gate.calls == []


async def test_deadline_already_passed_is_refused_without_queueing(make: Factory) -> None:
    batcher, _ = await make(open_=True)
    with pytest.raises(errors.DeadlineExceeded):
        await batcher.submit([1], time.monotonic() - 1)
    assert batcher.queue_depth == 0
    assert batcher.in_flight == 0


async def test_expired_images_are_dropped_before_compute(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    first = submit(batcher, [1])
    await gate.next_batch()
    late = submit(batcher, [7, 8], deadline=time.monotonic() + 0.05)
    on_time = submit(batcher, [2])
    with pytest.raises(errors.DeadlineExceeded):
        await result(late)  # answered when the deadline passes, while the device is still busy
    assert gate.calls == [[1]]
    assert batcher.queue_depth == 1
    gate.open()
    assert await result(first) == [10]
    assert await result(on_time) == [20]
    assert not {7, 8} & gate.computed()
    assert batcher.in_flight == 0


async def test_deadline_passing_during_compute_still_answers(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    deadline = time.monotonic() + 0.05
    task = submit(batcher, [1, 2], deadline=deadline)
    assert await gate.next_batch() == [1, 2]
    await clock_past(deadline)
    gate.open()
    assert await result(task) == [10, 20]  # its images were computing, not queued


async def test_cancelled_submit_removes_its_queued_images(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=8)
    first = submit(batcher, [1])
    await gate.next_batch()
    gone = submit(batcher, [7, 8])
    stays = submit(batcher, [2])
    await until(lambda: batcher.queue_depth == 3)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queue_depth == 1
    assert batcher.in_flight == 2
    gate.open()
    assert await result(first) == [10]
    assert await result(stays) == [20]
    assert gate.calls == [[1], [2]]
    assert batcher.in_flight == 0


async def test_cancelled_submit_split_over_batches_stops_costing_compute(make: Factory) -> None:
    batcher, (gate,) = await make(max_batch_size=2)
    task = submit(batcher, [1, 2, 3, 4, 5])
    assert await gate.next_batch() == [1, 2]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert batcher.queue_depth == 0
    gate.open()
    await asyncio.wait_for(batcher.wait_idle(), WAIT_S)
    after = await result(submit(batcher, [6]))
    assert after == [60]
    assert gate.calls == [[1, 2], [6]]


# --- failures ------------------------------------------------------------------------------------


async def test_raising_batch_fails_only_its_items_and_the_runner_lives_on(make: Factory) -> None:
    stats: list[BatchStats] = []
    batcher, (gate,) = await make(max_batch_size=2, on_batch=stats.append)
    gate.raise_for = lambda items: ValueError("bad tensor") if -1 in items else None
    first = submit(batcher, [1])
    await gate.next_batch()
    doomed, mate, later = submit(batcher, [-1]), submit(batcher, [2]), submit(batcher, [3])
    await until(lambda: batcher.queue_depth == 3)
    gate.open()
    with pytest.raises(errors.InferenceFailed, match="bad tensor"):
        await result(doomed)
    with pytest.raises(errors.InferenceFailed):
        await result(mate)  # same batch as -1
    assert await result(first) == [10]
    assert await result(later) == [30]  # next batch, same runner
    assert await result(submit(batcher, [4, 5])) == [40, 50]
    assert [s.failed for s in stats] == [0, 2, 0, 0]
    assert batcher.in_flight == 0


async def test_wrong_number_of_outputs_fails_the_batch() -> None:
    runner: Runner[int, int] = Runner(lambda items: items[:-1], name="short")
    batcher: Batcher[int, int] = Batcher([runner], max_batch_size=4, max_wait_s=0, max_queue=8)
    await batcher.start()
    try:
        with pytest.raises(errors.InferenceFailed, match="outputs"):
            await asyncio.wait_for(batcher.submit([1, 2], FOREVER), WAIT_S)
    finally:
        await batcher.stop()
    assert runner.join(WAIT_S)


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, matched by class name."""


def _oom_errors() -> list[Callable[[], BaseException]]:
    makers: list[Callable[[], BaseException]] = [
        lambda: OutOfMemoryError("allocator gave up"),
        lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]
    try:
        import torch

        makers.append(lambda: torch.cuda.OutOfMemoryError("CUDA out of memory."))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return makers


@pytest.mark.parametrize("oom", _oom_errors(), ids=["by-name", "by-message", "torch"])
async def test_out_of_memory_splits_the_batch_in_halves(
    make: Factory, oom: Callable[[], BaseException]
) -> None:
    stats: list[BatchStats] = []
    batcher, (gate,) = await make(max_batch_size=8, on_batch=stats.append)
    # Batches of more than two images, and any batch holding 99, run out of memory.
    gate.raise_for = lambda items: oom() if len(items) > 2 or 99 in items else None
    first = submit(batcher, [0])
    await gate.next_batch()
    big = submit(batcher, [1, 2, 3])
    poisoned = submit(batcher, [99])
    small = submit(batcher, [4])
    await until(lambda: batcher.queue_depth == 5)
    gate.open()
    assert await result(big) == [10, 20, 30]
    assert await result(small) == [40]
    with pytest.raises(errors.InferenceFailed, match=r"out of memory|allocator"):
        await result(poisoned)
    await result(first)
    # [1,2,3,99,4] -> [1,2] ok + [3,99,4] -> [3] ok + [99,4] -> [99] fails + [4] ok
    assert gate.calls[1:] == [[1, 2, 3, 99, 4], [1, 2], [3, 99, 4], [3], [99, 4], [99], [4]]
    assert (stats[-1].size, stats[-1].failed) == (5, 1)


async def test_plain_runtime_error_is_not_retried(make: Factory) -> None:
    batcher, (gate,) = await make(open_=True, max_batch_size=8, max_wait_s=60.0)
    gate.raise_for = lambda items: RuntimeError("shape mismatch")
    task = submit(batcher, list(range(8)))
    with pytest.raises(errors.InferenceFailed, match="shape mismatch"):
        await result(task)
    assert len(gate.calls) == 1


async def test_on_batch_reports_every_batch_and_its_errors_are_contained(make: Factory) -> None:
    stats: list[BatchStats] = []

    def on_batch(s: BatchStats) -> None:
        stats.append(s)
        raise RuntimeError("metrics broke")

    batcher, (gate,) = await make(max_batch_size=4, on_batch=on_batch)
    began = time.monotonic()
    first = submit(batcher, [1])
    await gate.next_batch()
    computing_since = time.monotonic()  # batch 1 started before this
    rest = submit(batcher, [2, 3])
    await until(lambda: batcher.queue_depth == 2)
    queued_by = time.monotonic()  # [2, 3] were enqueued before this
    gate.open()  # batch 1 ends, and batch 2 starts, after this
    opened = time.monotonic()
    assert await result(first) == [10]
    assert await result(rest) == [20, 30]
    await until(lambda: len(stats) == 2)
    answered = time.monotonic()
    assert [(s.device, s.size, len(s.queue_wait_s), s.failed) for s in stats] == [
        ("dev0", 1, 1, 0),
        ("dev0", 2, 2, 0),
    ]
    # The reported spans contain what the test saw from outside, and fit in the test's span.
    assert opened - computing_since <= stats[0].compute_s <= answered - began
    assert stats[0].queue_wait_s[0] <= computing_since - began
    assert all(opened - queued_by <= w <= answered - computing_since for w in stats[1].queue_wait_s)
    assert stats[1].compute_s <= answered - opened


# --- several devices -----------------------------------------------------------------------------


async def test_a_free_device_takes_the_next_batch(make: Factory) -> None:
    stats: list[BatchStats] = []
    batcher, gates = await make(runners=2, max_batch_size=2, on_batch=stats.append)
    a = submit(batcher, [1, 2])
    b = submit(batcher, [3, 4])
    # Both devices are busy at the same time, one batch each.
    started = [await asyncio.wait_for(g.started.get(), WAIT_S) for g in gates]
    assert sorted(started) == [[1, 2], [3, 4]]
    for gate in gates:
        gate.open()
    assert await result(a) == [10, 20]
    assert await result(b) == [30, 40]
    assert sorted(s.device for s in stats) == ["dev0", "dev1"]


async def test_one_submit_spreads_over_devices_in_order(make: Factory) -> None:
    batcher, gates = await make(runners=2, open_=True, max_batch_size=2)
    assert await result(submit(batcher, [1, 2, 3, 4, 5, 6])) == [10, 20, 30, 40, 50, 60]
    assert sorted(x for g in gates for call in g.calls for x in call) == [1, 2, 3, 4, 5, 6]
