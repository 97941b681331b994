"""How many workers a server runs, and what each one gets."""

from __future__ import annotations

import pytest

from nacguard.settings import Settings, available_cores
from nacguard.supervisor import worker_plan
from nacguard.supervisor.parent import BUNDLE_FILE


def test_auto_on_cpu_is_cores_over_torch_threads() -> None:
    cores = available_cores()
    assert Settings(workers=0).worker_count == cores
    assert Settings(workers=0, torch_threads=cores).worker_count == 1
    assert Settings(workers=3).worker_count == 3


def test_auto_on_cuda_is_one_worker_per_device() -> None:
    assert Settings(device="cuda:0,cuda:1").worker_count == 2
    assert Settings(device="cuda").worker_count == 1


@pytest.mark.parametrize(
    ("device", "workers", "want"),
    [
        ("cuda:0,cuda:1", 2, ["cuda:0", "cuda:1"]),
        ("cuda:0,cuda:1,cuda:2,cuda:3", 2, ["cuda:0,cuda:2", "cuda:1,cuda:3"]),
        ("cuda:0,cuda:1", 3, ["cuda:0", "cuda:1", "cuda:0"]),
        ("cpu", 2, ["cpu", "cpu"]),
    ],
)
def test_devices_are_dealt_out(device: str, workers: int, want: list[str]) -> None:
    plans = worker_plan(Settings(device=device, workers=workers, torch_threads=1))
    assert [p.device for p in plans] == want
    assert {p.workers for p in plans} == {workers}


def test_unset_torch_threads_share_the_cores() -> None:
    plans = worker_plan(Settings(workers=2))
    assert {p.torch_threads for p in plans} == {max(1, available_cores() // 2)}
    assert {p.torch_threads for p in worker_plan(Settings(workers=2, torch_threads=3))} == {3}


def test_the_bundle_file_name_matches_the_bundle_package() -> None:
    import nacguard.bundle

    assert nacguard.bundle.BUNDLE_FILE == BUNDLE_FILE
