"""The lean path of the inference routes (``POST /predict`` and the Open Inference Protocol's
``POST /v2/models/{name}[/versions/{version}]/infer``): a request goes from the app's own
middleware straight to the route's endpoint, past the framework's per-request layers.

Between the last middleware and the endpoint FastAPI runs an exception middleware, an exit-stack
middleware, the router (matching every route in turn), the included routers, the route's
request-response wrappers, a second exception wrapper and the dependency solver, even for an
endpoint that takes only the request and string path parameters. For a single small image that
is a visible share of the server's CPU (a FastAPI route cost 0.093 ms of CPU per request against
0.052 ms for a plain Starlette route in a micro-benchmark; see loadtest/README.md for the
server's profile).

What the skipped layers did for these routes is done here: the route and its path parameters
recorded in the scope (the request metrics' endpoint label), and the exceptions the app's
handler takes turned into their response by that same function
(:func:`~nacguard.api.errors.error_response`, which answers in the protocol's shape under
``/v2``); anything else propagates to the request middleware, as it would from the router. The
FastAPI routes stay registered: they document the routes in OpenAPI and serve whatever this does
not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette.convertors import StringConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import HANDLED_ERRORS, error_response

__all__ = ["LeanRoutes"]


Endpoint = Callable[..., Awaitable[Response]]


def _check(route: APIRoute) -> None:
    """A lean route's endpoint takes the request and its path's string parameters, no more:
    there is nothing else for FastAPI to resolve or validate."""
    names = set(inspect.signature(route.endpoint).parameters) - {"request"}
    convertors = route.param_convertors
    if names != set(convertors) or not all(
        isinstance(c, StringConvertor) for c in convertors.values()
    ):
        raise ValueError(f"{route.path} takes more than the request and its string path parameters")
    if route.methods != {"POST"}:
        raise ValueError(f"{route.path} is not a POST-only route")


class LeanRoutes:
    """Serves the given ``POST`` routes with their endpoints directly (see the module docstring).

    The innermost of the app's middleware: authentication, CORS and the request context still
    apply to them as to every route.

    Args:
        app: the wrapped ASGI app (the framework's stack, which serves every other request).
        routes: registered ``POST`` routes whose endpoints take the request and string path
            parameters only.

    Raises:
        ValueError: a route takes anything else (FastAPI would have to resolve it).
    """

    def __init__(self, app: ASGIApp, routes: Sequence[APIRoute]) -> None:
        for route in routes:
            _check(route)
        self.app = app
        # /predict is one dictionary lookup; routes with parameters are matched by their regex.
        self._exact = {r.path: r for r in routes if not r.param_convertors}
        self._templated = [r for r in routes if r.param_convertors]

    def _match(self, scope: Scope) -> tuple[APIRoute, dict[str, Any]] | None:
        route = self._exact.get(scope["path"])
        if route is not None:
            return route, {}
        for route in self._templated:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return route, child["path_params"]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        found = None
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")  # mounted under a prefix: the router knows the rules
        ):
            found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        route, params = found
        endpoint: Endpoint = route.endpoint
        scope["route"] = route
        scope["endpoint"] = endpoint
        scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request, **params)
        except HANDLED_ERRORS as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)
