"""The one place errors become HTTP responses.

:func:`error_response` maps every failure to ``{"error": {"code", "message"}}``: domain errors
(:class:`~nacguard.errors.NacguardError`, with their own status, code and ``Retry-After``),
request validation errors (422), Starlette's HTTP exceptions (404, 405, ...) and anything
unexpected (500, logged with its traceback, never sent to the client). It is registered as the
app's exception handler and also called by the request middleware for exceptions that escape
the app, so there is no second error shape anywhere.
"""

from __future__ import annotations

import logging
import math
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from nacguard import errors
from nacguard.openinference.errors import is_v2_path, rest_status

from .schemas import ErrorResponse

__all__ = [
    "ERROR_RESPONSES",
    "HANDLED_ERRORS",
    "WWW_AUTHENTICATE",
    "error_response",
    "install_error_handler",
    "rejection_reason",
    "retry_after_header",
]

log = logging.getLogger("nacguard.api")

# Rejection reason (nacguard_rejections_total) per domain error.
_REASONS: dict[type[errors.NacguardError], str] = {
    errors.Overloaded: "queue_full",
    errors.DeadlineExceeded: "deadline",
    errors.PayloadTooLarge: "too_large",
    errors.BadImage: "bad_input",
    errors.InvalidRequest: "bad_input",
    errors.ModelNotFound: "bad_input",
    errors.UnsupportedMediaType: "unsupported",
    errors.AuthenticationRequired: "unauthorized",
    errors.NotFound: "bad_input",
    errors.ShuttingDown: "shutting_down",
    errors.InferenceFailed: "inference_error",
}


def rejection_reason(exc: errors.NacguardError) -> str | None:
    """The ``nacguard_rejections_total`` reason of a domain error (``None``: not counted)."""
    return next((r for t, r in _REASONS.items() if isinstance(exc, t)), None)


def _describe(text: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": text}


_RETRY = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}

#: ``WWW-Authenticate`` challenge of a 401 (RFC 9110: a 401 must carry one).
WWW_AUTHENTICATE = 'Bearer realm="nacguard"'

#: OpenAPI ``responses`` of the error statuses ``/predict`` can answer.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _describe("An image does not decode (`bad_image`)."),
    404: _describe("The model or version named is not served (`model_not_found`)."),
    413: _describe(
        "Body, image count, image size or pixel count over its limit (`payload_too_large`)."
    ),
    415: _describe("Content type or image format not accepted (`unsupported_media_type`)."),
    422: _describe("Malformed JSON, base64, multipart, parameters or headers (`invalid_request`)."),
    429: {**_describe("Queue full; retry later (`overloaded`)."), "headers": _RETRY},
    500: _describe("Inference failed or an internal error."),
    503: {
        **_describe("Loading (`not_ready`) or draining (`shutting_down`)."),
        "headers": _RETRY,
    },
    504: _describe("The deadline passed before compute (`deadline_exceeded`)."),
}


def retry_after_header(seconds: float | None) -> str | None:
    """``Retry-After`` value: whole seconds rounded up, at least 1; ``None`` without a value."""
    if seconds is None or not math.isfinite(seconds):
        return None
    return str(max(1, math.ceil(seconds)))


def _status_code_name(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "http_error"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _count_rejection(request: Request, reason: str) -> None:
    service = getattr(request.app.state, "service", None)
    metrics = getattr(service, "metrics", None)
    if metrics is not None:
        metrics.reject(reason)


def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The JSON error response for ``exc`` (the app's only exception handler)."""
    status, headers, body, reason = error_parts(exc, request.url.path)
    if reason is not None:
        _count_rejection(request, reason)
    return JSONResponse(body, status_code=status, headers=headers)


def error_parts(
    exc: Exception, path: str
) -> tuple[int, dict[str, str], dict[str, Any], str | None]:
    """What :func:`error_response` answers for ``exc`` on ``path``: status, headers, JSON body
    and the rejection reason it counts (``None``: not a rejection)."""
    headers: dict[str, str] = {}
    reason = None
    if isinstance(exc, errors.NacguardError):
        status, code, message = exc.status, exc.code, exc.message
        retry = retry_after_header(exc.retry_after)
        if retry is not None:
            headers["Retry-After"] = retry
        if isinstance(exc, errors.AuthenticationRequired):
            headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        reason = rejection_reason(exc)
        if status >= 500 and not isinstance(exc, errors.NotReady | errors.ShuttingDown):
            log.warning("%s: %s", code, message)
    elif isinstance(exc, RequestValidationError):
        status, code, message = 422, errors.InvalidRequest.code, _validation_message(exc)
        reason = "bad_input"
    elif isinstance(exc, StarletteHTTPException):
        status, code = exc.status_code, _status_code_name(exc.status_code)
        message = str(exc.detail)
        headers.update(exc.headers or {})
    else:
        status, code, message = 500, "internal_error", "internal server error"
        log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if is_v2_path(path):
        # The Open Inference Protocol's routes answer in its own shape (same causes, metrics).
        status, body = rest_status(status), {"error": message}
    return status, headers, body, reason


#: The exception types :func:`error_response` is registered for (in the app, and in the lean
#: ``/predict`` path, which stands where the router's handling would).
HANDLED_ERRORS: tuple[type[Exception], ...] = (
    errors.NacguardError,
    RequestValidationError,
    StarletteHTTPException,
)


def install_error_handler(app: FastAPI) -> None:
    """Register :func:`error_response` for domain, validation and HTTP exceptions.

    Exceptions of any other type are turned into responses by the request middleware, which
    calls the same function.
    """
    for exc_type in HANDLED_ERRORS:
        app.add_exception_handler(exc_type, error_response)
