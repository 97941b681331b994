"""Domain errors. Each carries the HTTP status and the stable error code the API answers with.

No FastAPI import here: the api package maps these to responses in exactly one handler.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationRequired",
    "BadImage",
    "BundleError",
    "DeadlineExceeded",
    "InferenceFailed",
    "InvalidRequest",
    "ModelNotFound",
    "NacguardError",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RepositoryConflict",
    "ShuttingDown",
    "UnsupportedMediaType",
]


class NacguardError(Exception):
    """Base of every error nacguard raises on purpose.

    Attributes:
        status: HTTP status the API answers with.
        code: short machine-readable code, stable across releases.
        retry_after: seconds a client should wait before retrying, where that makes sense.
    """

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadImage(NacguardError):
    """The bytes are not an image we can decode (or decode into something usable)."""

    status, code = 400, "bad_image"


class AuthenticationRequired(NacguardError):
    """Missing or wrong API key."""

    status, code = 401, "unauthorized"


class NotFound(NacguardError):
    """A model (or model version) the server does not serve."""

    status, code = 404, "not_found"


class PayloadTooLarge(NacguardError):
    """Body, image count, or decoded pixel count over its configured limit."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(NacguardError):
    """Content type (or image format) the endpoint does not accept."""

    status, code = 415, "unsupported_media_type"


class InvalidRequest(NacguardError):
    """Well-typed request with malformed content: bad JSON, bad base64, bad fields."""

    status, code = 422, "invalid_request"


class ModelNotFound(NacguardError):
    """The request names a model, or a version, that is not loaded."""

    status, code = 404, "model_not_found"


class RepositoryConflict(NacguardError):
    """A model repository admin call that conflicts with what is loaded (or was refused)."""

    status, code = 409, "repository_conflict"


class Overloaded(NacguardError):
    """The queue is full; the client should back off for ``retry_after`` seconds."""

    status, code = 429, "overloaded"


class InferenceFailed(NacguardError):
    """The model raised while computing the batch this image was in."""

    status, code = 500, "inference_failed"


class NotReady(NacguardError):
    """The model is still loading or warming up."""

    status, code = 503, "not_ready"


class ShuttingDown(NacguardError):
    """The server is draining and accepts no new work."""

    status, code = 503, "shutting_down"


class DeadlineExceeded(NacguardError):
    """The request's deadline passed before its images were computed."""

    status, code = 504, "deadline_exceeded"


class BundleError(NacguardError):
    """A profile bundle is missing, malformed, incompatible, or fails its integrity check."""

    status, code = 500, "bundle_error"
