"""The model repository's admin API (explicit mode), behind admin keys.

Off unless ``admin_keys`` (or ``admin_keys_file``) is set and ``repository_mode`` is
``explicit``. Every call needs ``X-Admin-Key``: the client API keys never open it, and the
client-key middleware leaves these paths to it. A missing or wrong key is a 401.

``GET /v1/admin/models``; ``POST /v1/admin/models/{model}/versions/{version}/load``,
``.../unload``, ``.../promote``, ``.../shadow``; ``POST /v1/admin/models/{model}/rollback``,
``.../shadow/promote``, ``.../shadow/unload``. Each answers the table after the change (models,
loaded versions, served, promoted and shadow version).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from nacguard.errors import AuthenticationRequired
from nacguard.serving import Service

from .auth import ApiKeys
from .errors import ERROR_RESPONSES

__all__ = ["ADMIN_PREFIX", "make_admin_router"]

#: Where the admin API lives; the client-key middleware does not check below it.
ADMIN_PREFIX = "/v1/admin/"

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid admin key (`unauthorized`)."},
    404: ERROR_RESPONSES[404],
    409: {"description": "Already loaded, refused, or the last version (`repository_conflict`)."},
    422: ERROR_RESPONSES[422],
    503: ERROR_RESPONSES[503],
}

ModelName = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Version = Annotated[int, Path(ge=1, le=999_999_999)]


async def _admin(request: Request) -> Service:
    """The service, once the request's ``X-Admin-Key`` is one of the admin keys."""
    keys: ApiKeys = request.app.state.admin_keys
    presented = request.headers.get("x-admin-key")
    if presented is None or not keys.accepts(presented.strip().encode("utf-8")):
        raise AuthenticationRequired(
            "missing admin key: send X-Admin-Key" if presented is None else "invalid admin key"
        )
    service: Service = request.app.state.service
    service.check_ready()
    return service


AdminDep = Annotated[Service, Depends(_admin)]


def make_admin_router() -> APIRouter:
    """The admin routes; they check ``X-Admin-Key`` against ``app.state.admin_keys`` (an
    :class:`~nacguard.api.auth.ApiKeys` the app factory sets)."""
    router = APIRouter(prefix=ADMIN_PREFIX.rstrip("/"), tags=["admin"], responses=_RESPONSES)

    @router.get("/models", summary="Loaded models and versions")
    async def models(service: AdminDep) -> dict[str, Any]:
        """Every loaded model: its versions, the served one, the promoted one."""
        return service.admin.describe()

    @router.post("/models/{model}/versions/{version}/load", summary="Load a version")
    async def load(service: AdminDep, model: ModelName, version: Version) -> dict[str, Any]:
        """Load ``DIR/model/version``: checked, loaded and warmed up beside what serves; it
        serves at once if it is the model's highest version and none is promoted."""
        return await service.admin.load(model, version)

    @router.post("/models/{model}/versions/{version}/unload", summary="Unload a version")
    async def unload(service: AdminDep, model: ModelName, version: Version) -> dict[str, Any]:
        """Stop addressing the version now; it unloads once its requests are answered."""
        return service.admin.unload(model, version)

    @router.post("/models/{model}/versions/{version}/promote", summary="Serve a version")
    async def promote(service: AdminDep, model: ModelName, version: Version) -> dict[str, Any]:
        """Serve this loaded version for requests naming none."""
        return service.admin.promote(model, version)

    @router.post("/models/{model}/rollback", summary="Serve the previous version")
    async def rollback(service: AdminDep, model: ModelName) -> dict[str, Any]:
        """Serve the highest loaded version below the served one."""
        return service.admin.rollback(model)

    @router.post("/models/{model}/versions/{version}/shadow", summary="Shadow a version")
    async def shadow(service: AdminDep, model: ModelName, version: Version) -> dict[str, Any]:
        """Load ``DIR/model/version`` as the model's shadow profile: it scores every image the
        model computes (metrics with ``role="shadow"``); the answers stay the primary's."""
        return await service.admin.shadow(model, version)

    @router.post("/models/{model}/shadow/promote", summary="Serve the shadow")
    async def promote_shadow(service: AdminDep, model: ModelName) -> dict[str, Any]:
        """Serve the shadow's version (its weights shared when they are equal), no shadow."""
        return await service.admin.promote_shadow(model)

    @router.post("/models/{model}/shadow/unload", summary="Unload the shadow")
    async def unload_shadow(service: AdminDep, model: ModelName) -> dict[str, Any]:
        """Stop shadowing the model and unload its shadow profile."""
        return service.admin.unload_shadow(model)

    return router
