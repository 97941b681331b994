"""The HTTP API: the only package that imports FastAPI.

``create_app(settings)`` builds the app (see :mod:`nacguard.api.app`); ``nacguard serve`` runs
it under uvicorn with graceful draining (:mod:`nacguard.api.server`).
"""

from nacguard.api.app import create_app

__all__ = ["create_app"]
