"""Optional API-key authentication.

Off unless keys are configured (``api_keys``, ``api_keys_file``). When on, every path except
``auth_exempt_paths`` (health, readiness and metrics by default, so kubelets and Prometheus need
no secret) needs a key, sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. A
missing or wrong key is answered 401 in the usual error shape with ``WWW-Authenticate``, before
the body is read, so an unauthenticated client cannot make the server buffer or decode anything.

Keys are compared in constant time: the presented key and every configured key are hashed to
fixed-length digests and compared with :func:`hmac.compare_digest`, against *all* keys without
stopping at a match, so neither a key's content nor its length nor its position in the list
shows in the response time. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from nacguard.errors import AuthenticationRequired
from nacguard.openinference.errors import is_v2_path
from nacguard.settings import Settings

from .errors import WWW_AUTHENTICATE, error_response

__all__ = ["ApiKeyMiddleware", "ApiKeys", "document_api_keys", "load_api_keys"]

log = logging.getLogger("nacguard.auth")

# Shorter keys are accepted (operators may have reasons) but are easy to guess: say so at start.
_MIN_KEY_LENGTH = 16


def load_api_keys(settings: Settings, *, admin: bool = False) -> list[str]:
    """The configured keys: ``api_keys`` plus one per line of ``api_keys_file`` (with
    ``admin``: ``admin_keys`` and ``admin_keys_file``).

    In the file, blank lines and lines starting with ``#`` are ignored and surrounding
    whitespace is stripped.

    Raises:
        ValueError: ``api_keys_file`` is set but unreadable or holds no key. Authentication was
            asked for, so the server refuses to start rather than run without it.
    """
    keys = [k.strip() for k in (settings.admin_keys if admin else settings.api_keys) if k.strip()]
    path: Path | None = settings.admin_keys_file if admin else settings.api_keys_file
    what = "admin_keys_file" if admin else "api_keys_file"
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{what} {path} cannot be read: {exc}") from None
        from_file = [s for line in lines if (s := line.strip()) and not s.startswith("#")]
        if not from_file:
            raise ValueError(f"{what} {path} holds no key")
        keys.extend(from_file)
    return keys


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    """A set of accepted keys, checked in constant time.

    Args:
        keys: the accepted keys (at least one).
    """

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._digests = [_digest(k.encode("utf-8")) for k in keys]
        short = sum(len(k) < _MIN_KEY_LENGTH for k in keys)
        if short:
            log.warning("%d API key(s) shorter than %d characters", short, _MIN_KEY_LENGTH)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: bytes) -> bool:
        """Whether ``presented`` is one of the keys (constant time over all keys)."""
        given = _digest(presented)
        match = False
        for digest in self._digests:
            # No early exit: every key is compared whatever the outcome.
            match |= hmac.compare_digest(given, digest)
        return match


def _presented_key(scope: Scope) -> bytes | None:
    """The key a request carries: ``X-API-Key``, else an ``Authorization: Bearer`` token."""
    bearer = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
    return bearer


class ApiKeyMiddleware:
    """Refuses requests without a valid key (except exempt paths) with a JSON 401.

    Args:
        app: the wrapped ASGI app.
        keys: the accepted keys.
        exempt_paths: paths served without a key (exact matches).
        exempt_prefix: paths starting with it are not checked here (the admin API, which
            checks its own keys).
    """

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, exempt_paths: list[str], exempt_prefix: str = "\0"
    ) -> None:
        self.app = app
        self.keys = keys
        self.exempt = frozenset(exempt_paths)
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.exempt or path.startswith(self.exempt_prefix):
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if key is not None and self.keys.accepts(key):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send X-API-Key or Authorization: Bearer"
            if key is None
            else "invalid API key"
        )
        await error_response(Request(scope), AuthenticationRequired(message))(scope, receive, send)


_SCHEMES: dict[str, Any] = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "The API key as token."},
}

# The 401 as it appears in the finished document (ErrorResponse is already a component: every
# route declares error responses with it).
_UNAUTHORIZED: dict[str, Any] = {
    "description": "Missing or invalid API key (`unauthorized`).",
    "headers": {
        "WWW-Authenticate": {
            "description": f"The scheme to authenticate with: `{WWW_AUTHENTICATE}`.",
            "schema": {"type": "string"},
        }
    },
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def document_api_keys(app: FastAPI, exempt_paths: list[str]) -> None:
    """Declare the key schemes, and a 401 answer, on every operation that needs a key.

    Only called when keys are configured: without them no 401 can happen, and the document
    says so by omission.
    """
    build = app.openapi
    exempt = frozenset(exempt_paths)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        spec.setdefault("components", {}).setdefault("securitySchemes", {}).update(_SCHEMES)
        for path, operations in spec.get("paths", {}).items():
            if path in exempt:
                continue
            unauthorized = _UNAUTHORIZED
            if is_v2_path(path):  # the Open Inference Protocol's routes: its error shape
                schema = {"$ref": "#/components/schemas/V2Error"}
                unauthorized = {
                    **_UNAUTHORIZED,
                    "content": {"application/json": {"schema": schema}},
                }
            for operation in operations.values():
                operation["security"] = [{name: []} for name in _SCHEMES]
                operation.setdefault("responses", {})["401"] = unauthorized
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
