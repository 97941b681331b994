"""Helpers for the in-process API tests: the real app on an httpx client, polling, bodies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from nacguard.api import create_app
from nacguard.api.service import Service
from nacguard.settings import Settings

__all__ = ["PNG", "Api", "ApiFactory", "client_for", "multipart", "running_api", "until"]

#: Headers of a raw PNG body.
PNG = {"Content-Type": "image/png"}


@dataclass
class Api:
    """A started app and a client talking to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def service(self) -> Service:
        """The app's service."""
        service: Service = self.app.state.service
        return service

    @property
    def queued(self) -> int:
        """Images waiting in the batcher's queue."""
        batcher = self.service.batcher
        assert batcher is not None, "not started"
        return batcher.queue_depth


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


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for one PNG part per image."""
    return [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
