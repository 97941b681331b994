"""In-process API fixtures: the real app (real tiny bundle, real batcher) on an httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from nacguard.api import create_app
from nacguard.api.service import Service
from nacguard.settings import Settings


@dataclass
class Api:
    """A started app and a client talking to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in-process (no lifespan: start it separately)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@asynccontextmanager
async def running_api(bundle: Path, **overrides: Any) -> AsyncIterator[Api]:
    """Build the app for ``bundle`` with settings overrides, run its lifespan, wait until ready."""
    settings = Settings(profile=bundle, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.service.wait_ready(30)
        async with client_for(app) as client:
            yield Api(app=app, client=client, settings=settings)


ApiFactory = Callable[..., AbstractAsyncContextManager[Api]]


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
