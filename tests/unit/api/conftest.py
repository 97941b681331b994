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
        return running_api(tiny_bundle, **overrides)

    return factory


@pytest.fixture
async def api(make_api: ApiFactory) -> AsyncIterator[Api]:
    """The tiny bundle served with default settings."""
    async with make_api() as started:
        yield started
