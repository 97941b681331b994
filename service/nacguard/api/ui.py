"""The operator page (``/ui``) and the read-only JSON it draws from.

The page is three static files shipped in the package (``ui_static/``: HTML, CSS, JS; no CDN,
no build step). It calls ``/predict`` like any client (same limits, same key) and polls the
endpoints below; none of them is on the ``/predict`` path and nothing runs while nobody has
the page open: no middleware, no background task.

Security: the static files carry no data and are served without a key (a browser cannot send
a header on navigation); every JSON endpoint needs one when keys are on. Each static response
has a strict Content-Security-Policy (no inline script or style, nothing from other origins,
images only from this origin or ``data:``/``blob:`` URLs), ``nosniff`` and no framing. The page
builds its DOM with ``textContent``, never ``innerHTML``.

Endpoints:

* ``GET /v1/calibration`` - the calibration score histogram, threshold, and the drift bins.
* ``GET /v1/stats`` - cumulative ``/predict`` counters per model and the drift window's bin
  counts; the page derives rates and p99 latency from two polls.
* ``GET /v1/review`` - the newest flagged images with thumbnails and marks.
* ``POST /v1/review/{id}/mark`` - mark an entry ``ind`` / ``ood`` (``null`` clears it).
* ``GET /v1/review/export`` - the marked entries as a zip (``review export`` layout + mark).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from nacguard.serving import Service
from nacguard.store.records import ReviewItem, ReviewLog, ReviewMark
from nacguard.store.review_zip import write_review_zip

from .errors import ERROR_RESPONSES
from .schemas import ErrorResponse
from .ui_data import Thumbnails, calibration_histogram, registry_stats, review_item_json

__all__ = ["CONTENT_SECURITY_POLICY", "PUBLIC_PATHS", "make_ui_router"]

#: The page's policy: everything from this origin only, no inline code, previews as data:/blob:.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

#: Paths served without an API key (the page's shell and whether it needs a key; no data).
PUBLIC_PATHS = ("/ui", "/ui/config", *(f"/ui/static/{name}" for name in _STATIC))

#: Most review entries one listing returns, and the most the export writes.
MAX_REVIEW_LIST = 100
MAX_REVIEW_EXPORT = 10_000

# What the read endpoints can answer besides 200: loading/draining; the review ones also 404
# (recording off, or no such entry), 422 (bad parameters) and 503 (review store not answering).
_READ_RESPONSES: dict[int | str, dict[str, Any]] = {503: ERROR_RESPONSES[503]}
_REVIEW_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Review recording is off, or no such entry."},
    422: ERROR_RESPONSES[422],
    503: {
        **ERROR_RESPONSES[503],
        "description": "Loading, draining, or the review store is not answering now.",
    },
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str


def _load_files() -> dict[str, _File]:
    root = resources.files("nacguard.api").joinpath("ui_static")
    files = {"index.html": _File(root.joinpath("index.html").read_bytes(), "text/html")}
    for name, media_type in _STATIC.items():
        files[name] = _File(root.joinpath(name).read_bytes(), media_type)
    return files


class MarkIn(BaseModel):
    """An operator's verdict on a flagged image."""

    model_config = ConfigDict(extra="forbid")

    mark: ReviewMark | None


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _review_log(service: Service) -> ReviewLog | None:
    service.check_ready()
    store = service.store
    review = store.review if store is not None else None
    return review if isinstance(review, ReviewLog) else None


def _unavailable(what: str) -> HTTPException:
    return HTTPException(503, f"{what}: the review store is not answering now")


def make_ui_router(max_image_pixels: int, *, auth_required: bool) -> APIRouter:
    """The page's routes. Reads the static files once (a missing file fails here, at start-up,
    not on a browser's first visit).

    Args:
        max_image_pixels: review images larger than this get no thumbnail (``/predict``'s bound).
        auth_required: whether API keys are on (``/ui/config`` tells the page, so it asks for a
            key before its first call instead of collecting a 401).
    """
    files = _load_files()
    router = APIRouter()
    thumbnails = Thumbnails(max_pixels=max_image_pixels)

    def static(name: str) -> Response:
        found = files[name]
        return Response(found.body, media_type=found.media_type, headers=_SECURITY_HEADERS)

    @router.get("/ui", include_in_schema=False)
    async def page() -> Response:
        return static("index.html")

    @router.get("/ui/config", include_in_schema=False)
    async def config() -> Response:
        return JSONResponse({"auth_required": auth_required}, headers=_SECURITY_HEADERS)

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, "no such file")
        return static(name)

    @router.get("/v1/calibration", responses=_READ_RESPONSES, summary="Calibration score histogram")
    async def calibration(request: Request) -> dict[str, Any]:
        """Calibration scores as an equal-width histogram (with the threshold), and the drift
        reference's bins: edges (finite inner ones) and the calibration share of each bin."""
        service = _service(request)
        service.check_ready()
        bundle, metrics = service.bundle, service.metrics
        assert bundle is not None and metrics is not None
        reference = metrics.drift_reference
        scores = bundle.calibration.scores if bundle.calibration is not None else np.zeros(0)
        return {
            "model": bundle.model_name,
            "profile": bundle.name,
            "identity": service.profile_id,
            "threshold": bundle.threshold,
            "histogram": calibration_histogram(scores, bundle.threshold),
            "drift_bins": {
                "edges": reference.finite_edges,
                "expected": [float(x) for x in reference.expected],
                "ood_bins": reference.ood_bins,
            },
        }

    @router.get("/v1/stats", responses=_READ_RESPONSES, summary="Request counters per model")
    async def stats(request: Request) -> dict[str, Any]:
        """Cumulative ``/predict`` counters and latency buckets per model (from the metrics),
        and the drift window's bin counts. Rates come from the difference of two polls."""
        service = _service(request)
        service.check_ready()
        metrics, store = service.metrics, service.store
        assert metrics is not None and store is not None
        await service.flush_drift()
        window = await store.drift.read(time.time())
        return {
            "time": time.time(),
            "models": registry_stats(metrics.registry),
            "drift_window": {"counts": [int(c) for c in window.counts], "scope": window.scope},
        }

    async def _shown(items: list[ReviewItem]) -> list[dict[str, Any]]:
        def draw() -> list[dict[str, Any]]:
            return [
                review_item_json(item, thumbnails.get(item.entry.id, item.entry.record.image))
                for item in items
            ]

        return await asyncio.to_thread(draw)

    @router.get("/v1/review", responses=_REVIEW_RESPONSES, summary="Recently flagged images")
    async def review(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=MAX_REVIEW_LIST)] = 24,
    ) -> dict[str, Any]:
        """The newest flagged images, newest first, each with a PNG thumbnail (``data:`` URL,
        redrawn from the decoded pixels) and the operator's mark. ``enabled`` is false when
        review recording is off (no Redis and no ``review_dir``)."""
        service = _service(request)
        log = _review_log(service)
        if log is None:
            return {"enabled": False, "backend": None, "items": []}
        items = await log.recent(limit)
        if items is None:
            raise _unavailable("review list")
        assert service.store is not None
        return {
            "enabled": True,
            "backend": service.store.backend,
            "items": await _shown(items),
        }

    @router.post(
        "/v1/review/{entry_id}/mark", responses=_REVIEW_RESPONSES, summary="Mark a flagged image"
    )
    async def mark(
        request: Request, entry_id: str, body: Annotated[MarkIn, Body()]
    ) -> dict[str, Any]:
        """Mark one entry as in-distribution (a false alarm) or OOD; ``null`` clears the mark."""
        service = _service(request)
        log = _review_log(service)
        if log is None:
            raise HTTPException(404, "review recording is off")
        done = await log.mark(entry_id, body.mark)
        if done is None:
            raise _unavailable("mark")
        if not done:
            raise HTTPException(404, "no such review entry")
        return {"id": entry_id, "mark": body.mark}

    @router.get(
        "/v1/review/export",
        responses={
            200: {"content": {"application/zip": {}}, "description": "The marked set."},
            **_REVIEW_RESPONSES,
        },
        response_class=Response,
        summary="Download the marked review set",
    )
    async def export(request: Request) -> Response:
        """Every marked entry still in the review store, as a zip: ``images/``, ``index.json``
        and ``index.csv`` (the ``nacguard review export`` rows plus ``mark``)."""
        service = _service(request)
        log = _review_log(service)
        if log is None:
            raise HTTPException(404, "review recording is off")
        items = await log.marked(MAX_REVIEW_EXPORT)
        if items is None:
            raise _unavailable("export")
        # Spooled: small sets stay in memory, large ones go to disk instead of the heap.
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
        await asyncio.to_thread(write_review_zip, items, spool)
        spool.seek(0)

        def chunks() -> Iterator[bytes]:
            with spool:
                while block := spool.read(256 * 1024):
                    yield block

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return StreamingResponse(
            chunks(),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="nacguard-review-{stamp}.zip"'},
        )

    return router
