"""The process-level settings ``build_server`` applies before the app exists."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from nacguard.api.server import build_server
from nacguard.settings import Settings


@pytest.fixture
def switch_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("switch_interval")
@pytest.mark.parametrize("ms", [0.5, 7.0])
def test_build_server_sets_the_gil_switch_interval(ms: float) -> None:
    sys.setswitchinterval(0.005)
    build_server(Settings(gil_switch_interval_ms=ms, grpc_port=0))
    assert sys.getswitchinterval() == pytest.approx(ms / 1000.0)


def test_the_default_is_shorter_than_pythons() -> None:
    # Python's own default (5 ms) lets the model thread wait that long for the GIL per op.
    assert Settings().gil_switch_interval_ms < 5.0
