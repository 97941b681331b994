"""Per-request context: request id, access log, request metrics, last-resort error response.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which buffers responses and
runs the app in another task): it wraps ``send`` to add ``X-Request-ID`` and note the status,
and times the request until the app returns (background tasks included).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nacguard.serving.admission import Priority

from .errors import error_response
from .logs import request_id_var

__all__ = [
    "PRIORITY_HEADER",
    "REQUEST_ID_HEADER",
    "SHED_PATHS",
    "RequestContextMiddleware",
    "access_log",
    "request_context",
]

REQUEST_ID_HEADER = "X-Request-ID"

log = logging.getLogger("nacguard.access")

# A client's id is echoed and logged, so it must be short and harmless in a header and a log.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Probes and scrapes arrive every few seconds from every replica's kubelet and Prometheus.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Status logged and counted for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499
# The routes that queue images, shed before routing when the service is full: /predict and the
# Open Inference Protocol's infer (with or without a version).
SHED_PATHS = re.compile(r"^(/predict|/v2/models/[^/]+(/versions/[^/]+)?/infer)$")


# Generated ids: a random prefix per process and a counter. uuid4() per request read the
# kernel's random source every time (a system call: 8% of the event loop's time on this VM).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)
PRIORITY_HEADER = "X-Priority"
_PRIORITIES = {b"low": Priority.LOW, b"normal": Priority.NORMAL, b"high": Priority.HIGH}


def request_context(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, Priority | None]:
    """The request id (the client's when sane, else a new one) and the ``X-Priority``
    (``None`` when the header holds something else), from one pass over the (lower-cased)
    headers."""
    request_id = None
    priority: Priority | None = Priority.NORMAL
    for name, value in headers:
        if name == b"x-request-id" and request_id is None:
            text = value.decode("latin-1")
            if _VALID_ID.match(text):
                request_id = text
        elif name == b"x-priority":
            priority = _PRIORITIES.get(value.strip().lower())
    return request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):016x}", priority


def _shed_if_full(scope: Scope, priority: Priority | None) -> None:
    """Refuse a ``/predict`` or v2 infer request here, before routing, when the service is full
    for its ``X-Priority``.

    The bound is the service's (:meth:`Service.check_capacity`, which :meth:`Service.admit`
    applies too): checked this early, a rejection skips the framework's routing, dependency and
    exception layers and costs about a third as much, which under overload is what is left for
    the requests being served.

    Raises:
        Overloaded: ``max_queue_images`` requests are in progress.
    """
    app = scope.get("app")
    service = getattr(getattr(app, "state", None), "service", None)
    if service is None or not service.ready or priority is None:
        return  # not started, draining or a bad X-Priority: the route answers (503, 422)
    service.check_capacity(priority)


class RequestContextMiddleware:
    """Adds the request id, logs one line per request, observes request metrics, sheds
    ``/predict`` and v2 infer early when the service is full for the request's ``X-Priority``
    (429; low first, high last), and answers exceptions that escaped the app with the JSON error
    shape (500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, priority = request_context(scope.get("headers", ()))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["priority"] = priority
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            if scope["method"] == "POST" and SHED_PATHS.match(scope["path"]):
                _shed_if_full(scope, priority)
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = CLIENT_CLOSED
        except Exception as exc:
            if response_started:
                log.error("error after the response started", exc_info=exc)
            else:
                await error_response(Request(scope), exc)(scope, receive, send_with_id)
        finally:
            self._finish(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    def _finish(scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        method = scope.get("method", "")
        app = scope.get("app")
        service = getattr(getattr(app, "state", None), "service", None)
        metrics = getattr(service, "metrics", None)
        if metrics is not None:
            metrics.observe_request(endpoint, method, status, seconds)
        access_log(method, scope.get("path", ""), status, seconds)


def access_log(method: str, path: str, status: int, seconds: float) -> None:
    """The access-log line of one answered request (probes and scrapes at debug level)."""
    level = logging.DEBUG if path in _QUIET_PATHS and status < 400 else logging.INFO
    if not log.isEnabledFor(level):
        return  # the record and its extras are not even built
    log.log(
        level,
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        },
    )
