"""In-process API fixtures: the real app (real tiny bundle, real batcher) on an httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.unit.api.helpers import Api, ApiFactory, running_api


@pytest.fixture
def make_api(tiny_bundle: Path) -> ApiFactory:
    """``async with make_api(max_batch_size=4) as api: ...`` for the tiny bundle."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[Api]:
        # These tests hold images in the queue with a long max_wait_ms: the fixed window makes
        # that wait certain (the adaptive policy has its own tests in tests/unit/engine).
        overrides.setdefault("batch_wait", "fixed")
        return running_api(tiny_bundle, **overrides)

    return factory


@pytest.fixture
async def api(make_api: ApiFactory) -> AsyncIterator[Api]:
    """The tiny bundle served with default settings."""
    async with make_api() as started:
        yield started
