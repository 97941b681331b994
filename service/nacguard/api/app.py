"""The app factory: ``create_app(settings)`` builds a FastAPI app that owns one
:class:`~nacguard.api.service.Service` (model, batcher, metrics, store) for its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import nacguard
from nacguard.settings import Settings

from .errors import install_error_handler
from .middleware import RequestContextMiddleware
from .routes import router
from .service import Service

__all__ = ["create_app"]

_DESCRIPTION = """Classifies images and screens each one for out-of-distribution inputs with
Neuron Activation Coverage (NAC): every prediction carries a NAC score and an OOD flag.

Errors always have the body `{"error": {"code": ..., "message": ...}}`; 429 and 503 carry
`Retry-After`. Send `X-Request-ID` to correlate logs (echoed, or generated), and `X-Timeout-Ms`
for a shorter deadline than the server's."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing is loaded until the lifespan starts.

    The lifespan starts loading the profile in the background and returns at once, so the
    server answers ``/healthz`` while loading; ``/readyz`` turns 200 once the model is loaded
    and warmed up. On exit it drains (if no drain ran yet) and releases the store and runners.

    Args:
        settings: the validated settings; ``Settings()`` (environment) when omitted.

    Returns:
        The app; its service is ``app.state.service``.
    """
    settings = settings if settings is not None else Settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.launch()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="nacguard",
        version=nacguard.__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    app.state.settings = settings
    install_error_handler(app)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(router)
    return app
