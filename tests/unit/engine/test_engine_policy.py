"""Batching policies on a fake clock: lone requests, bursts, steady rates, load changes.

The policies only do arithmetic over the times they are given, so every test here drives the
clock itself and is exact: no sleeps, no real time.
"""

from __future__ import annotations

import math

import pytest

from nacguard.engine import AdaptiveWait, FixedWait

MS = 1e-3


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def learn_batches(
    policy: AdaptiveWait,
    clock: FakeClock,
    sizes: list[int],
    *,
    a: float,
    k: float,
    busy: float = 1.0,
) -> None:
    """Batches costing ``a + k * size`` seconds each, the device busy ``busy`` of the time."""
    for size in sizes:
        clock.advance((a + k * size) / busy)
        policy.on_batch(size, a + k * size)


def steady(
    policy: AdaptiveWait, clock: FakeClock, *, gap: float, decisions: int, queued: int = 1
) -> None:
    """Arrivals every ``gap`` s, each finding the device free with ``queued`` images: a decision
    per arrival, the next arrival judging it."""
    for _ in range(decisions):
        policy.on_submit(1)
        policy.wait_s(queued=queued, waited_s=0.0)
        clock.advance(gap)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_fixed_wait_returns_what_is_left_of_the_oldest_images_window() -> None:
    policy = FixedWait(2 * MS)
    assert policy.wait_s(queued=1, waited_s=0.0) == pytest.approx(2 * MS)
    assert policy.wait_s(queued=3, waited_s=1.5 * MS) == pytest.approx(0.5 * MS)
    assert policy.wait_s(queued=1, waited_s=5 * MS) == 0.0


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        FixedWait(-1)
    with pytest.raises(ValueError):
        AdaptiveWait(-1)
    with pytest.raises(ValueError):
        AdaptiveWait(1, alpha=0)


def test_cold_policy_runs_at_once(clock: FakeClock) -> None:
    policy = AdaptiveWait(10 * MS, clock=clock)
    for _ in range(5):  # arrivals without any computed batch: nothing is known about cost
        policy.on_submit(1)
        assert policy.wait_s(queued=1, waited_s=0.0) == 0.0
        clock.advance(0.01 * MS)


def test_batch_cost_line_is_recovered_from_mixed_sizes(clock: FakeClock) -> None:
    policy = AdaptiveWait(10 * MS, clock=clock)
    learn_batches(policy, clock, [1, 16, 4, 8, 2, 12] * 10, a=0.5 * MS, k=0.2 * MS)
    assert policy.batch_overhead_s == pytest.approx(0.5 * MS, rel=1e-6)
    # One size only: the slope is unknown and the whole cost counts as fixed (optimistic).
    single = AdaptiveWait(10 * MS, clock=clock)
    learn_batches(single, clock, [1] * 5, a=0.5 * MS, k=0.2 * MS)
    assert single.batch_overhead_s == pytest.approx(0.7 * MS)


def test_lone_requests_never_wait(clock: FakeClock) -> None:
    policy = AdaptiveWait(2 * MS, clock=clock)
    for _ in range(50):  # one request every 50 ms, each computed alone in 1 ms
        policy.on_submit(1)
        assert policy.wait_s(queued=1, waited_s=0.0) == 0.0
        clock.advance(1 * MS)
        policy.on_batch(1, 1 * MS)
        clock.advance(49 * MS)
    assert policy.hit_rate(1) == 0.0


def test_a_mostly_idle_device_does_not_wait_even_when_mates_come(clock: FakeClock) -> None:
    # Two clients in lockstep: the second request always follows the first within 0.2 ms, but
    # each 1 ms batch is followed by 4 ms of HTTP work: the device is busy a fifth of the time.
    policy = AdaptiveWait(2 * MS, clock=clock)
    for _ in range(40):
        policy.on_submit(1)
        policy.wait_s(queued=1, waited_s=0.0)
        clock.advance(0.2 * MS)
        policy.on_submit(1)
        clock.advance(1 * MS)
        policy.on_batch(2, 1 * MS)
        clock.advance(4 * MS)
    assert policy.hit_rate(1) > 0.9
    assert policy.busy < 0.3
    policy.on_submit(1)
    assert policy.wait_s(queued=1, waited_s=0.0) == 0.0


def test_closed_loop_waits_for_the_clients_it_has_and_not_for_more(clock: FakeClock) -> None:
    # Eight clients, each sending its next request when answered: bursts of 8 arrivals 10 us
    # apart, a decision at each (the device is free), then silence until the batch's answer.
    policy = AdaptiveWait(2 * MS, clock=clock)
    learn_batches(policy, clock, [8, 4, 8, 2], a=1 * MS, k=0.05 * MS)
    for _ in range(30):
        waits = []
        for queued in range(1, 9):
            policy.on_submit(1)
            waits.append(policy.wait_s(queued=queued, waited_s=(queued - 1) * 0.01 * MS))
            clock.advance(0.01 * MS)
        clock.advance(1.4 * MS)
        policy.on_batch(8, 1.4 * MS)
    assert policy.gap_s < 1 * MS  # the mean gap alone says "wait", also with 8 queued
    # It learnt that a mate comes while fewer than 8 wait, and none once all 8 do.
    assert all(w > 0 for w in waits[:7])
    assert waits[7] == 0.0
    assert policy.hit_rate(8) < 0.5 < policy.hit_rate(1)


def test_steady_high_rate_waits_and_stays_within_the_bounds(clock: FakeClock) -> None:
    policy = AdaptiveWait(2 * MS, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS, busy=0.6)
    overhead = policy.batch_overhead_s
    steady(policy, clock, gap=0.1 * MS, decisions=40, queued=3)
    steady(policy, clock, gap=0.1 * MS, decisions=40)
    assert policy.hit_rate(1) > 0.9
    policy.on_submit(1)
    # One image queued: wait up to the break-even gap 2a / (n + 1) = a.
    assert policy.wait_s(queued=1, waited_s=0.0) == pytest.approx(overhead)
    # More images already queued: each more image waits too, so the window shrinks.
    assert policy.wait_s(queued=3, waited_s=0.0) == pytest.approx(overhead / 2)
    # Never past max_wait from the oldest image's enqueue.
    assert policy.wait_s(queued=1, waited_s=1.8 * MS) == pytest.approx(0.2 * MS)
    assert policy.wait_s(queued=1, waited_s=2 * MS) == 0.0


def test_queue_long_enough_for_the_gap_stops_waiting(clock: FakeClock) -> None:
    policy = AdaptiveWait(5 * MS, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS, busy=0.6)
    n = math.ceil(2 * policy.batch_overhead_s / (0.3 * MS))
    steady(policy, clock, gap=0.3 * MS, decisions=40, queued=n)
    steady(policy, clock, gap=0.3 * MS, decisions=40)
    policy.on_submit(1)
    assert policy.wait_s(queued=1, waited_s=0.0) > 0  # (1 + 1) * 0.3 ms < 2a
    # (n + 1) * gap >= 2a: one more mate would save less than the n queued images lose.
    assert policy.wait_s(queued=n, waited_s=0.0) == 0.0


def test_saturated_device_waits_for_mates_up_to_the_bound(clock: FakeClock) -> None:
    policy = AdaptiveWait(2 * MS, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS, busy=1.0)
    steady(policy, clock, gap=1.5 * MS, decisions=40)
    policy.on_submit(1)
    # A 1.5 ms gap is longer than the break-even 2a / 2 = 1 ms, but at saturation fuller
    # batches are what shortens the queue: wait what is left of the bound.
    assert policy.busy > 0.8
    assert policy.wait_s(queued=1, waited_s=0.5 * MS) == pytest.approx(1.5 * MS)


def test_waits_that_bring_no_mate_switch_waiting_off(clock: FakeClock) -> None:
    policy = AdaptiveWait(2 * MS, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS)
    steady(policy, clock, gap=0.1 * MS, decisions=40)
    policy.on_submit(1)
    waits = []
    # Traffic stops: every wait runs out without an arrival.
    for _ in range(10):
        delay = policy.wait_s(queued=1, waited_s=0.0)
        waits.append(delay)
        clock.advance(max(delay, 0.01 * MS) + 0.01 * MS)
    assert waits[0] > 0
    assert waits[-1] == 0.0
    assert waits.index(0.0) <= 5  # it gives up within a few empty waits


def test_rising_load_turns_waiting_on(clock: FakeClock) -> None:
    policy = AdaptiveWait(2 * MS, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS)
    steady(policy, clock, gap=20 * MS, decisions=10)
    policy.on_submit(1)
    assert policy.wait_s(queued=1, waited_s=0.0) == 0.0
    # The declined decisions are judged too: arrivals now come within the window.
    steady(policy, clock, gap=0.1 * MS, decisions=15)
    policy.on_submit(1)
    assert policy.wait_s(queued=1, waited_s=0.0) > 0


def test_zero_bound_never_waits(clock: FakeClock) -> None:
    policy = AdaptiveWait(0.0, clock=clock)
    learn_batches(policy, clock, [1, 4, 2, 8] * 3, a=1 * MS, k=0.05 * MS)
    steady(policy, clock, gap=0.01 * MS, decisions=20)
    assert policy.wait_s(queued=1, waited_s=0.0) == 0.0
