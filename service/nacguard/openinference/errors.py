"""How domain errors read in the Open Inference Protocol: one mapping per transport.

REST: the app's one exception handler (:func:`nacguard.api.errors.error_response`) keeps its
status codes, ``Retry-After`` and rejection metrics for every route, and for paths under
``/v2`` answers the protocol's body ``{"error": "<message>"}`` with :func:`rest_status`. The
protocol has no 415 or 422: those requests are malformed, so they answer 400.

gRPC: :func:`grpc_status` gives the status code of every failure; the gRPC adapter sets it in
one place (:mod:`nacguard.openinference.rpc`).
"""

from __future__ import annotations

import grpc

from nacguard import errors

__all__ = ["V2_PREFIX", "grpc_status", "is_v2_path", "rest_status"]

#: Every REST route of the protocol lives under this prefix.
V2_PREFIX = "/v2"

_REST_STATUS = {415: 400, 422: 400}

_GRPC_CODES: tuple[tuple[type[errors.NacguardError], grpc.StatusCode], ...] = (
    (errors.BadImage, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnsupportedMediaType, grpc.StatusCode.INVALID_ARGUMENT),
    # A request over a size limit is wrong as sent (retrying it cannot help), unlike a full
    # queue: INVALID_ARGUMENT, and RESOURCE_EXHAUSTED stays the signal to back off.
    (errors.PayloadTooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AuthenticationRequired, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def is_v2_path(path: str) -> bool:
    """Whether ``path`` belongs to the protocol's REST routes."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def rest_status(status: int) -> int:
    """The v2 REST status for a status the rest of the API would answer."""
    return _REST_STATUS.get(status, status)


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for ``exc`` (INTERNAL for anything not a known domain error)."""
    for kind, code in _GRPC_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
