"""The HTTP endpoints. Each is a thin shell: parse, call the service, shape the answer.

``/predict`` response headers:

* ``X-Request-ID``: the client's (when given and sane) or a generated one; also in the logs.
* ``X-Queue-Time-Ms``: from queueing until the last batch holding one of the request's images
  started computing.
* ``X-Inference-Time-Ms``: summed compute time of those batches (which other requests' images
  shared).
* ``X-Batch-Sizes``: the sizes of those batches, comma-separated, in start order: how dynamic
  batching grouped this request with others (``4`` = one batch of 4 images, maybe from four
  requests). Empty when every image came from the cache.
* ``X-Cache-Hits``: images answered from the result cache.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive

from nacguard.errors import InvalidRequest
from nacguard.imaging.decode import cheap_to_parse
from nacguard.serving import PredictOutcome, Priority, Service

from .body import parse_images, read_body
from .errors import ERROR_RESPONSES
from .schemas import (
    PREDICT_REQUEST_BODY,
    DriftOut,
    ErrorResponse,
    HealthOut,
    PredictResponse,
    ProfileOut,
    ReadyOut,
)

__all__ = ["router"]

T = TypeVar("T")

router = APIRouter()

_NOT_READY: dict[int | str, dict[str, Any]] = {503: ERROR_RESPONSES[503]}


async def get_service(request: Request) -> Service:
    """The app's service (dependency). Async on purpose: FastAPI runs a sync dependency in its
    thread pool, a hop to a worker thread and back on every request for one attribute read."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone away (the body must already be read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first, so a request nobody waits
    for leaves the queue before it costs compute.

    ``work`` runs in the request's own task, which a watcher task cancels on a disconnect: one
    task per request, not two (and no ``asyncio.wait``). The cancellation lands inside
    ``work`` before this returns (the batcher removes the queued images then).
    """
    owner = asyncio.current_task()
    assert owner is not None, "called outside a task"
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request.receive)
        gone = True
        owner.cancel()

    watcher = asyncio.create_task(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (shutdown): not ours to answer
        owner.uncancel()
        raise ClientDisconnect() from None
    finally:
        watcher.cancel()
    if gone:  # the work finished anyway, swallowing the cancellation: its answer stands
        owner.uncancel()
    return result


def _prediction_json(
    outcome: PredictOutcome, top_k: int, explain: bool = False
) -> list[dict[str, Any]]:
    out = []
    for p in outcome.predictions:
        item = p.to_dict(top_k=top_k, explain=explain)
        if item["nac_score"] != item["nac_score"]:  # NaN (scoring off) is not JSON
            item["nac_score"] = None
        out.append(item)
    return out


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One prediction per image, in request order.",
        "headers": {
            "X-Request-ID": _header("The client's request id, or a generated one."),
            "X-Queue-Time-Ms": _header(
                "From queueing until the request's last batch started.", "number"
            ),
            "X-Inference-Time-Ms": _header("Compute time of the request's batches.", "number"),
            "X-Batch-Sizes": _header(
                "Sizes of the batches the request's images ran in, comma-separated "
                "(batches are shared with other requests' images)."
            ),
            "X-Cache-Hits": _header("Images answered from the result cache.", "integer"),
        },
    },
    **ERROR_RESPONSES,
}


_PREDICT_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "model",
        "in": "query",
        "required": False,
        "description": "The model to ask (default: the default model).",
        "schema": {"type": "string", "maxLength": 64},
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "description": "The model's version (default: its served version).",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": "Top classes per prediction (default: server setting).",
        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    {
        "name": "explain",
        "in": "query",
        "required": False,
        "description": "Add per-layer NAC scores (`layers`), `least_covered_layer` and every "
        "detector's p-value (`p_values`).",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "x-timeout-ms",
        "in": "header",
        "required": False,
        "description": "Deadline in milliseconds, capped by the server's request_timeout_s.",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    },
    {
        "name": "x-priority",
        "in": "header",
        "required": False,
        "description": "Under overload low-priority requests are refused first (429) and "
        "high-priority ones last.",
        "schema": {"type": "string", "enum": ["low", "normal", "high"], "default": "normal"},
    },
]


_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def _predict_params(request: Request) -> tuple[int | None, bool, float | None]:
    """``top_k``, ``explain`` and ``X-Timeout-Ms``, parsed by hand: FastAPI's parameter solving (a pass over
    path, query, header and cookie parameters per request) cost more than the JSON answer.

    Raises:
        InvalidRequest: a value that is not a number in range, or a bad ``X-Priority``.
    """
    if request.scope.get("state", {}).get("priority", Priority.NORMAL) is None:
        raise InvalidRequest("X-Priority: must be low, normal or high")
    top_k = None
    raw = request.query_params.get("top_k")
    if raw is not None:
        try:
            top_k = int(raw)
        except ValueError:
            raise InvalidRequest("top_k: must be an integer") from None
        if not 0 <= top_k <= 1000:
            raise InvalidRequest("top_k: must be between 0 and 1000")
    explain = False
    flag = request.query_params.get("explain")
    if flag is not None:
        if flag.lower() not in _TRUE | _FALSE:
            raise InvalidRequest("explain: must be a boolean")
        explain = flag.lower() in _TRUE
    timeout_ms = None
    header = request.headers.get("x-timeout-ms")
    if header is not None:
        try:
            timeout_ms = float(header)
        except ValueError:
            timeout_ms = math.nan
        if not (math.isfinite(timeout_ms) and timeout_ms > 0):
            raise InvalidRequest("X-Timeout-Ms: must be a positive number of milliseconds")
    return top_k, explain, timeout_ms


def _target(request: Request) -> tuple[str | None, int | None]:
    """The ``model`` and ``version`` query parameters (see docs/repository.md).

    Raises:
        InvalidRequest: a model name over 64 characters or a version that is not >= 1.
    """
    model = request.query_params.get("model")
    if model is not None and not 0 < len(model) <= 64:
        raise InvalidRequest("model: must be 1 to 64 characters")
    raw = request.query_params.get("version")
    if raw is None:
        return model, None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidRequest("version: must be a positive integer")
    return model, int(raw)


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_PREDICT_RESPONSES,
    openapi_extra={"requestBody": PREDICT_REQUEST_BODY, "parameters": _PREDICT_PARAMETERS},
    summary="Classify images and screen them for out-of-distribution inputs",
)
async def predict(request: Request) -> Response:
    """One prediction per image, in request order."""
    # Not a dependency here: on the hot path, FastAPI's solving of a sub-dependency (a second
    # pass over path, query, header and cookie parameters, a cache key) cost more than the
    # whole JSON answer; the other routes keep ServiceDep.
    service = await get_service(request)
    if not service.tracing.enabled:
        return await _predict(request, service)
    with service.tracing.server_span("POST /predict", request.headers) as span:
        response = await _predict(request, service)
        span.set_attribute("http.response.status_code", response.status_code)
        return response


async def _predict(request: Request, service: Service) -> Response:
    priority = request.scope.get("state", {}).get("priority", Priority.NORMAL)
    # A bad X-Priority is admitted as normal, then answered 422 by _predict_params.
    admission = service.admit(Priority.NORMAL if priority is None else priority)
    try:
        top_k, explain, x_timeout_ms = _predict_params(request)
        model, version = _target(request)
        settings = service.settings
        classes = len(service.served(model, version).bundle.classes)
        k = min(settings.top_k, classes) if top_k is None else top_k
        if k > classes:
            raise InvalidRequest(f"top_k must be at most {classes}, the number of classes")
        timeout = settings.request_timeout_s
        if x_timeout_ms is not None:
            timeout = min(timeout, x_timeout_ms / 1000.0)
        deadline = time.monotonic() + timeout
        with service.tracing.span("read body"):
            body = await read_body(request, service.limits.max_body_bytes)
            content_type = request.headers.get("content-type")
            # Splitting and hashing a small body takes microseconds; larger bodies (base64 and
            # sha256 run at ~1 GB/s) are parsed off the event loop: the imaging policy decides.
            images = await service.offloop.run(
                cheap_to_parse(len(body)), parse_images, body, content_type, service.limits
            )
            del body
        outcome = await _unless_disconnected(
            request,
            service.predict(
                images,
                deadline=deadline,
                request_id=request.state.request_id,
                admission=admission,
                model=model,
                version=version,
            ),
        )
    finally:
        admission.close()
    content = {
        "model": outcome.model,
        "version": outcome.version,
        "profile": outcome.profile,
        "predictions": _prediction_json(outcome, k, explain),
    }
    headers = {
        "X-Queue-Time-Ms": f"{outcome.queue_s * 1000:.3f}",
        "X-Inference-Time-Ms": f"{outcome.inference_s * 1000:.3f}",
        "X-Batch-Sizes": ",".join(str(b.size) for b in outcome.batches),
        "X-Cache-Hits": str(outcome.cache_hits),
    }
    background = BackgroundTask(outcome.after_response) if outcome.after_response else None
    # orjson, and no response model validation: the content is built from typed predictions.
    return Response(
        orjson.dumps(content), media_type="application/json", headers=headers, background=background
    )


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
async def healthz(service: ServiceDep) -> HealthOut:
    """Always 200 while the process runs."""
    return HealthOut(
        status="alive",
        ready=service.ready,
        draining=service.draining,
        predict_requests_in_progress=service.requests_in_progress,
        pid=os.getpid(),
        workers=service.settings.workers or 1,
    )


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses=_NOT_READY,
    summary="Readiness: loaded, warmed up, not draining",
)
async def readyz(service: ServiceDep) -> ReadyOut:
    """200 once the model and profile are loaded and warmed up; 503 while starting or draining."""
    service.check_ready()
    assert service.bundle is not None
    return ReadyOut(status="ready", profile=service.bundle.name, model=service.bundle.model_name)


@router.get(
    "/v1/profile",
    response_model=ProfileOut,
    responses={404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422], **_NOT_READY},
    summary="The served model and profile",
)
async def profile(
    service: ServiceDep,
    model: Annotated[str | None, Query(max_length=64, description="Default: the default.")] = None,
    version: Annotated[int | None, Query(ge=1, description="Default: the served one.")] = None,
) -> dict[str, Any]:
    """Model, classes, monitored layers, threshold and calibration summary of a served model
    version (the default model's served version unless named)."""
    served = service.served(model, version)
    bundle = served.bundle
    return {
        "identity": bundle.identity,
        "served_model": served.entry.model,
        "version": served.entry.version,
        **bundle.describe(),
    }


@router.get(
    "/v1/drift",
    response_model=DriftOut,
    responses=_NOT_READY,
    summary="Drift of recent NAC scores",
)
async def drift(service: ServiceDep) -> dict[str, Any]:
    """Drift statistics of the recent-score window against the calibration scores."""
    report = await service.drift()
    return report.to_dict()


@router.get(
    "/metrics",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        503: {"model": ErrorResponse, "description": "Still loading."},
    },
    response_class=Response,
    summary="Prometheus metrics",
)
async def metrics(request: Request, service: ServiceDep) -> Response:
    """Prometheus text format (OpenMetrics when the scrape asks for it)."""
    body, content_type = await service.render_metrics(request.headers.get("accept"))
    return Response(body, media_type=content_type)
