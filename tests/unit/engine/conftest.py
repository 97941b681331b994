"""The engine tests' batcher factory over gated runners."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from nacguard.engine import Batcher, BatchStats, Runner
from tests.unit.engine.gates import WAIT_S, Factory, Gate


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    """Build started batchers over gated runners; stop them and check their threads exit."""
    built: list[tuple[Batcher[int, int], list[Gate], list[Runner[int, int]]]] = []

    async def factory(
        *,
        runners: int = 1,
        open_: bool = False,
        max_batch_size: int = 8,
        max_wait_s: float = 0.0,
        max_queue: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> tuple[Batcher[int, int], list[Gate]]:
        loop = asyncio.get_running_loop()
        gates = [Gate(loop, open_=open_) for _ in range(runners)]
        runner_list: list[Runner[int, int]] = [
            Runner(gate, name=f"dev{i}") for i, gate in enumerate(gates)
        ]
        batcher: Batcher[int, int] = Batcher(
            runner_list,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            on_batch=on_batch,
            retry_after_s=3.0,
        )
        await batcher.start()
        built.append((batcher, gates, runner_list))
        return batcher, gates

    yield factory
    for batcher, gates, runner_list in built:
        for gate in gates:
            gate.open()
        await asyncio.wait_for(batcher.stop(drain=False), WAIT_S)
        for runner in runner_list:
            assert runner.join(WAIT_S), f"runner thread {runner.name} did not exit"
