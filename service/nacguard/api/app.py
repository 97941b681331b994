"""The app factory: ``create_app(settings)`` builds a FastAPI app that owns one
:class:`~nacguard.serving.Service` (model, batcher, metrics, store) for its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware

import nacguard
from nacguard.monitoring.tracing import Tracing
from nacguard.serving import Service
from nacguard.settings import Settings

from .admin import ADMIN_PREFIX, make_admin_router
from .auth import ApiKeyMiddleware, ApiKeys, document_api_keys, load_api_keys
from .errors import install_error_handler
from .fastpath import LeanRoutes
from .middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from .routes import predict, router
from .ui import PUBLIC_PATHS, make_ui_router

__all__ = ["create_app"]

log = logging.getLogger("nacguard.api")

# What a browser page on an allowed origin may send and read (CORS).
_CORS_REQUEST_HEADERS = [
    "Content-Type",
    "Inference-Header-Content-Length",
    "Authorization",
    "X-API-Key",
    REQUEST_ID_HEADER,
    "X-Timeout-Ms",
]
_CORS_RESPONSE_HEADERS = [
    REQUEST_ID_HEADER,
    "X-Queue-Time-Ms",
    "X-Inference-Time-Ms",
    "X-Batch-Sizes",
    "X-Cache-Hits",
    "Retry-After",
    "Inference-Header-Content-Length",
]

_DESCRIPTION = """Classifies images and screens each one for out-of-distribution inputs with
Neuron Activation Coverage (NAC): every prediction carries a NAC score and an OOD flag.

Errors always have the body `{"error": {"code": ..., "message": ...}}`; 429 and 503 carry
`Retry-After`. Send `X-Request-ID` to correlate logs (echoed, or generated), and `X-Timeout-Ms`
for a shorter deadline than the server's."""


def create_app(settings: Settings | None = None, *, tracing: Tracing | None = None) -> FastAPI:
    """Build the app. Nothing is loaded until the lifespan starts.

    The lifespan starts loading the profile in the background and returns at once, so the
    server answers ``/healthz`` while loading; ``/readyz`` turns 200 once the model is loaded
    and warmed up. On exit it drains (if no drain ran yet) and releases the store and runners.

    Middleware, outermost first: request context (id, access log, metrics, last-resort 500),
    CORS (only with ``cors_origins``; outside authentication, so preflights need no key and a
    401 still carries the CORS headers a browser needs to read it), API keys (only with keys
    configured), the lean path of the inference routes (:mod:`~nacguard.api.fastpath`).

    Args:
        settings: the validated settings; ``Settings()`` (environment) when omitted.
        tracing: OpenTelemetry spans (tests pass an in-memory exporter's); by default as the
            ``OTEL_*`` variables say.

    Returns:
        The app; its service is ``app.state.service``.

    Raises:
        ValueError: ``api_keys_file`` is set but unreadable or empty.
    """
    settings = settings if settings is not None else Settings()
    service = Service(settings, tracing=tracing)

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
    app.include_router(router)
    # Imported here: the adapter builds on this package's modules (body reading, the service),
    # which import this one's package first.
    from nacguard.openinference.rest import model_infer, model_version_infer
    from nacguard.openinference.rest import router as v2_router

    app.include_router(v2_router)
    exempt = list(settings.auth_exempt_paths)
    keys = load_api_keys(settings)
    admin_keys = load_api_keys(settings, admin=True)
    if admin_keys and settings.repository_mode == "explicit":
        app.state.admin_keys = ApiKeys(admin_keys)
        app.include_router(make_admin_router())
    elif admin_keys:
        log.warning("admin keys are set but repository_mode is poll: the admin API is off")
    if settings.ui_enabled:
        # The page's shell holds no data; what it shows comes from calls that need the key.
        app.include_router(make_ui_router(settings.max_image_pixels, auth_required=bool(keys)))
        exempt.extend(PUBLIC_PATHS)
    # add_middleware puts each new one outside the previous ones.
    hot = (predict, model_infer, model_version_infer)
    routes = (*router.routes, *v2_router.routes)
    lean = [r for r in routes if isinstance(r, APIRoute) and r.endpoint in hot]
    app.add_middleware(LeanRoutes, routes=lean)
    if keys:
        app.add_middleware(
            ApiKeyMiddleware, keys=ApiKeys(keys), exempt_paths=exempt, exempt_prefix=ADMIN_PREFIX
        )
        document_api_keys(app, exempt)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=_CORS_REQUEST_HEADERS,
            expose_headers=_CORS_RESPONSE_HEADERS,
            # Keys travel in headers, never in cookies: no credentialed requests.
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)
    return app
