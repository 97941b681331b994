"""What the operator page reads, shaped for drawing: the calibration histogram, request counters
read back from the metrics registry, review entries with safe thumbnails.

Everything here runs only when the page (or someone) calls the page's endpoints; nothing is
kept or computed on the ``/predict`` path.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry

from nacguard.store.records import ReviewItem

__all__ = [
    "THUMBNAIL_PX",
    "Thumbnails",
    "calibration_histogram",
    "finite_or_none",
    "registry_stats",
    "review_item_json",
]

#: Longest side of a review thumbnail, in pixels.
THUMBNAIL_PX = 96

_PREDICT = ("/predict", "POST")


def finite_or_none(value: float | None) -> float | None:
    """``value``, or ``None`` for NaN/inf (not JSON)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def calibration_histogram(scores: np.ndarray, threshold: float, bins: int = 40) -> dict[str, Any]:
    """Equal-width histogram of the calibration scores, over a range that holds the threshold.

    Args:
        scores: the held-out InD calibration scores.
        threshold: the OOD threshold (marked on the chart).
        bins: number of bars.

    Returns:
        ``{"edges": [bins + 1 floats], "counts": [bins ints], "samples": n}``.
    """
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return {"edges": [], "counts": [], "samples": 0}
    low = min(float(finite.min()), threshold)
    high = max(float(finite.max()), threshold)
    if high <= low:
        high = low + 1e-6
    counts, edges = np.histogram(finite, bins=bins, range=(low, high))
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "samples": int(finite.size),
    }


def registry_stats(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """Cumulative ``/predict`` counters per model, read from the service's own metrics.

    The page polls this and turns differences between two polls into a request rate and a p99
    latency, so the server keeps no state for it. Models are keyed by their ``model`` label and,
    where the metrics carry one, ``version``.

    Returns:
        One dict per model: ``model``, ``profile``, ``version`` (or ``None``), ``requests``
        (answered ``/predict`` calls), ``by_status``, ``latency_buckets`` (``[le, cumulative
        count]``, ``le`` ``None`` for +Inf), ``images_scored``, ``images_ood``.
    """
    models: dict[tuple[str, str], dict[str, Any]] = {}

    def slot(labels: dict[str, str]) -> dict[str, Any]:
        key = (labels.get("model", ""), labels.get("version", ""))
        found = models.get(key)
        if found is None:
            found = {
                "model": key[0],
                "profile": labels.get("profile", ""),
                "version": key[1] or None,
                "requests": 0,
                "by_status": {},
                "latency_buckets": {},
                "images_scored": 0,
                "images_ood": 0,
            }
            models[key] = found
        return found

    for family in registry.collect():
        for sample in family.samples:
            labels = sample.labels
            is_predict = (labels.get("endpoint"), labels.get("method")) == _PREDICT
            if sample.name == "nacguard_http_requests_total" and is_predict:
                entry = slot(labels)
                entry["requests"] += int(sample.value)
                status = labels.get("status", "")
                entry["by_status"][status] = entry["by_status"].get(status, 0) + int(sample.value)
            elif sample.name == "nacguard_http_request_duration_seconds_bucket" and is_predict:
                buckets = slot(labels)["latency_buckets"]
                buckets[labels["le"]] = buckets.get(labels["le"], 0) + int(sample.value)
            elif sample.name == "nacguard_images_scored_total":
                slot(labels)["images_scored"] += int(sample.value)
            elif sample.name == "nacguard_images_ood_total":
                slot(labels)["images_ood"] += int(sample.value)
    out = []
    for entry in models.values():
        pairs = sorted(((float(le), n) for le, n in entry["latency_buckets"].items()))
        entry["latency_buckets"] = [[le if math.isfinite(le) else None, n] for le, n in pairs]
        out.append(entry)
    return out


class Thumbnails:
    """Small PNG thumbnails of review images, as ``data:`` URLs, cached by entry id.

    Re-encoding is also the safety step: the page only ever shows a PNG this process drew from
    decoded pixels, never the bytes a client sent (which could be a polyglot file).

    Args:
        max_pixels: images with more pixels than this (read from the header) get no thumbnail;
            the same bound ``/predict`` applies.
        max_entries: thumbnails kept (a few KB each).
    """

    def __init__(self, *, max_pixels: int, max_entries: int = 512) -> None:
        self._max_pixels = max_pixels
        self._max_entries = max_entries
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, entry_id: str, image: bytes | None) -> str | None:
        """The thumbnail of one entry (``None`` without bytes or when they do not decode).
        Blocking (decodes): call from a worker thread."""
        if image is None:
            return None
        with self._lock:
            if entry_id in self._cache:
                self._cache.move_to_end(entry_id)
                return self._cache[entry_id]
        url = self._draw(image)
        with self._lock:
            self._cache[entry_id] = url
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return url

    def _draw(self, image: bytes) -> str | None:
        try:
            with Image.open(io.BytesIO(image)) as img:
                width, height = img.size
                if width * height > self._max_pixels:
                    return None
                img.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at reduced size
                small = img.convert("RGBA" if "A" in img.getbands() else "RGB")
                # Nearest neighbour: a 28x28 image stays crisp when the page scales it up.
                small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.NEAREST)
                out = io.BytesIO()
                small.save(out, format="PNG")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def review_item_json(item: ReviewItem, thumbnail: str | None) -> dict[str, Any]:
    """One review entry as the page shows it."""
    entry, rec = item.entry, item.entry.record
    return {
        "id": entry.id,
        "request_id": rec.request_id,
        "profile": entry.profile,
        "label": rec.label,
        "class_index": rec.class_index,
        "score": finite_or_none(rec.score),
        "threshold": finite_or_none(rec.threshold),
        "time": finite_or_none(rec.time),
        "content_type": rec.content_type,
        "image_size": entry.image_size,
        "thumbnail": thumbnail,
        "mark": item.mark,
    }
