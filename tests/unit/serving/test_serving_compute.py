"""A device runner's compute: the model locks it holds when a shadow runs its own forward."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from nacguard.bundle import Prediction, load_bundle
from nacguard.serving.compute import DeviceCompute, ShadowPlan
from nacguard.settings import Settings


class _RecordingLock:
    """A lock that notes its name in ``taken`` each time it is entered."""

    def __init__(self, name: str, taken: list[str]) -> None:
        self.name = name
        self.taken = taken
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()
        self.taken.append(self.name)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


class _Sink:
    def __init__(self) -> None:
        self.forwards: list[str] = []

    def counted(self, forward: str) -> None:
        self.forwards.append(forward)

    def observe(self, predictions: Sequence[Prediction]) -> None:
        pass


def test_two_models_shadowed_by_each_other_take_their_locks_in_one_order(
    tiny_bundle: Path,
) -> None:
    """Model A shadowed by B's weights and B by A's: were each runner to take its own lock and
    then the shadow's, the two would wait on each other for ever."""
    taken: list[str] = []
    settings = Settings(profile=tiny_bundle, torch_threads=1, max_batch_size=4)
    a, b = load_bundle(tiny_bundle), load_bundle(tiny_bundle)
    lock_a, lock_b = _RecordingLock("a", taken), _RecordingLock("b", taken)
    compute_a = DeviceCompute(a, settings, lock_a)  # type: ignore[arg-type]
    compute_b = DeviceCompute(b, settings, lock_b)  # type: ignore[arg-type]
    sink = _Sink()
    compute_a.shadow = ShadowPlan(b, lock_b, shared=False, sink=sink)  # type: ignore[arg-type]
    compute_b.shadow = ShadowPlan(a, lock_a, shared=False, sink=sink)  # type: ignore[arg-type]
    image = [torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(3))]

    orders = []
    for compute in (compute_a, compute_b):
        taken.clear()
        (result,) = compute(image)
        assert result.shadow is not None and sink.forwards[-1] == "separate"
        orders.append(list(taken))
    assert sorted(orders[0]) == ["a", "b"]
    assert orders[0] == orders[1]
