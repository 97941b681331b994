"""The lean path of ``POST /predict``: the request goes from the app's own middleware straight to
the route's endpoint, past the framework's per-request layers.

Between the last middleware and the endpoint FastAPI runs an exception middleware, an exit-stack
middleware, the router (matching every route in turn), the included routers, the route's
request-response wrappers, a second exception wrapper and the dependency solver, even for an
endpoint that takes only the request. For a single small image that is a visible share of the
server's CPU (a FastAPI route cost 0.093 ms of CPU per request against 0.052 ms for a plain
Starlette route in a micro-benchmark; see loadtest/README.md for the server's profile).

What the skipped layers did for ``/predict`` is done here: the route recorded in the scope (the
request metrics' endpoint label), and the exceptions the app's handler takes turned into their
response by that same function (:func:`~nacguard.api.errors.error_response`); anything else
propagates to the request middleware, as it would from the router. The FastAPI route stays
registered: it documents ``/predict`` in OpenAPI and serves whatever this does not take.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import HANDLED_ERRORS, error_response

__all__ = ["PREDICT_PATH", "PredictFastPath"]

PREDICT_PATH = "/predict"


class PredictFastPath:
    """Serves ``POST /predict`` with the route's endpoint directly (see the module docstring).

    The innermost of the app's middleware: authentication, CORS and the request context still
    apply to it as to every route.

    Args:
        app: the wrapped ASGI app (the framework's stack, which serves every other request).
        route: the registered ``POST /predict`` route; its endpoint takes the request alone.
    """

    def __init__(self, app: ASGIApp, route: APIRoute) -> None:
        self.app = app
        self.route = route
        self.endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if (
            scope["type"] != "http"
            or scope["path"] != PREDICT_PATH
            or scope["method"] != "POST"
            or scope.get("root_path")  # mounted under a prefix: the router knows the rules
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        scope["endpoint"] = self.endpoint
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except HANDLED_ERRORS as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)
