"""The HTTP API: the only package that imports FastAPI.

``create_app(settings)`` builds the app (see :mod:`nacguard.api.app`); ``nacguard serve`` runs
it under uvicorn with graceful draining (:mod:`nacguard.api.server`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from nacguard.api.app import create_app


def __getattr__(name: str) -> Any:
    # Lazy, so that the supervisor of several workers can use the logging setup in api.logs
    # without loading FastAPI and torch into a process that serves nothing.
    if name == "create_app":
        from nacguard.api.app import create_app

        return create_app
    raise AttributeError(f"module 'nacguard.api' has no attribute {name!r}")
