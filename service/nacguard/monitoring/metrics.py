"""Every Prometheus metric nacguard exports, created and recorded in one place (names, help
texts and buckets: :mod:`nacguard.monitoring.catalogue`).

Conventions: names start with ``nacguard_`` and end in their base unit (``_seconds``,
``_bytes``, ``_images``) or ``_total`` for counters; durations and sizes are histograms, which
add up across replicas (summaries do not); every series carries the constant labels ``model``,
``profile``, ``version`` and ``role`` so one dashboard filters by model, and the other labels are small closed sets
(endpoint templates, status codes, devices, rejection reasons, class labels up to a cap).

The NAC score histogram's buckets are the drift reference's edges (quantiles of the profile's
InD calibration scores plus the OOD threshold), and ``nacguard_nac_score_reference_cdf`` exports
the reference's cumulative share at each bucket bound, so Prometheus alone can compare the live
score distribution with the reference (see docker/prometheus/rules/nacguard.rules.yml).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from nacguard.monitoring.catalogue import (
    BASE_LABELS,
    BATCH_BUCKETS,
    HELP,
    HOLD_BUCKETS,
    INFERENCE_BUCKETS,
    LABEL_NAME,
    LAYER_BUCKETS,
    OTHER,
    QUEUE_BUCKETS,
    REJECT_REASONS,
    REQUEST_BUCKETS,
)
from nacguard.monitoring.collectors import DeviceMemoryCollector, Labelled, multiprocess_registry
from nacguard.monitoring.drift import DriftReference, DriftReport
from nacguard.monitoring.drift_gauges import DriftGauges
from nacguard.monitoring.inputs import BatchStatsLike

__all__ = ["REJECT_REASONS", "BatchStatsLike", "Metrics"]

log = logging.getLogger(__name__)


_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """The service's Prometheus metrics, on a registry of their own.

    Calls are thread-safe (prometheus_client locks per series), so the device threads and the
    event loop may both report.
    """

    def __init__(
        self,
        *,
        model: str,
        profile: str,
        drift_reference: DriftReference,
        expected_ood_rate: float,
        registry: CollectorRegistry | None = None,
        max_queue_images: int | None = None,
        classes: Sequence[str] | None = None,
        max_class_series: int = 100,
        info: Mapping[str, str] | None = None,
        process_metrics: bool = True,
        layers: Sequence[str] = (),
        version: str = "1",
        role: str = "primary",
    ) -> None:
        """Create and register every metric.

        Args:
            model: model name (constant ``model`` label).
            profile: profile id (constant ``profile`` label).
            drift_reference: the drift bins (built by the serving core from the calibration):
                the NAC score histogram's buckets, the reference CDF and the threshold.
            expected_ood_rate: share flagged OOD without drift, ``1 - calibrated TPR``.
            registry: registry to use; a fresh one by default (never the global one, so several
                apps in one test process do not collide).
            max_queue_images: the batcher's queue bound, exported so saturation is a ratio.
            classes: the model's class labels. When given (and no more than
                ``max_class_series``) every class gets a series from the start, so rates of
                never-predicted classes read 0, not "no data".
            max_class_series: most class labels with a series of their own; later ones count
                under ``class="other"`` (a 1000-class model must not add 1000 series).
            info: extra constant labels of ``nacguard_model_info`` (version, device, ...).
            process_metrics: export ``nacguard_process_*`` (memory, CPU, fds) of this process.
            layers: the monitored layers: a per-layer score histogram each (a handful of series).
            process_metrics: export ``nacguard_process_*`` and the device memory gauges.
            version: the model version (constant label); role: ``primary`` or ``shadow``.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        self._base = (model, profile, version, role)
        self.model, self.profile, self.version, self.role = self._base
        self.drift_reference = drift_reference
        # prometheus_client's labels() validates, builds a key and takes a lock on every call;
        # the hot path keeps the children it has looked up (children are never removed).
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._batch_children: dict[
            str, tuple[Histogram, Histogram, Histogram, Histogram, Histogram]
        ] = {}
        self._prediction_children: dict[str, Counter] = {}
        self._max_class_series = max_class_series
        self._classes: set[str] = set()
        self._classes_fixed = False
        self._init_http()
        self._init_batching(max_queue_images)
        self._init_predictions(classes, expected_ood_rate, info)
        layer_family = self._family(Histogram, "layer_nac_score", ("layer",), buckets=LAYER_BUCKETS)
        self._layer_children = [layer_family.labels(*self._base, name) for name in layers]
        self._init_shared_state()
        self._init_drift()
        # Several workers (PROMETHEUS_MULTIPROC_DIR, set by the supervisor): every value is also
        # in a file, and a scrape of any worker renders the sum over all of them.
        self._multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._device_memory = DeviceMemoryCollector(*self._base)
        if process_metrics and self._multiprocess_dir is None:
            process = ProcessCollector(namespace="nacguard", registry=None)
            self.registry.register(
                Labelled(process, dict(zip(BASE_LABELS, self._base, strict=True)))
            )
        if process_metrics:
            self.registry.register(self._device_memory)

    def _family(self, kind: type[_M], name: str, labels: Sequence[str] = (), **kwargs: Any) -> _M:
        """Metric ``nacguard_<name>`` (help from :data:`HELP`), base labels plus ``labels``. A
        gauge's value across several workers is their ``max`` unless it says."""
        if kind is Gauge:
            kwargs.setdefault("multiprocess_mode", "max")
        return kind(
            f"nacguard_{name}",
            HELP[name],
            [*BASE_LABELS, *labels],
            registry=self.registry,
            **kwargs,
        )

    def _series(self, kind: type[_M], name: str, **kwargs: Any) -> Any:
        """The one series of an unlabelled :meth:`_family`."""
        return self._family(kind, name, **kwargs).labels(*self._base)

    def _init_http(self) -> None:
        self._requests = self._family(Counter, "http_requests", ("endpoint", "method", "status"))
        self._request_seconds = self._family(
            Histogram, "http_request_duration_seconds", ("endpoint", "method"),
            buckets=REQUEST_BUCKETS,
        )  # fmt: skip
        self._rejections = self._family(Counter, "rejections", ("reason",))
        for reason in REJECT_REASONS:
            self._rejections.labels(*self._base, reason)

    def _init_batching(self, max_queue_images: int | None) -> None:
        device = ("device",)
        self._queue_wait = self._family(
            Histogram, "queue_wait_seconds", device, buckets=QUEUE_BUCKETS
        )
        self._inference = self._family(
            Histogram, "inference_duration_seconds", device, buckets=INFERENCE_BUCKETS
        )
        self._image_latency = self._family(
            Histogram, "image_latency_seconds", device, buckets=QUEUE_BUCKETS
        )
        self._batch_hold = self._family(
            Histogram, "batch_wait_seconds", device, buckets=HOLD_BUCKETS
        )
        self._batch_size = self._family(
            Histogram, "batch_size_images", device, buckets=BATCH_BUCKETS
        )
        # With several workers each one's gauge is a file: the replica's queue is their sum.
        live_sum = {"multiprocess_mode": "livesum"}
        self._queue_images = self._series(Gauge, "queue_images", **live_sum)
        self._queue_capacity = self._series(Gauge, "queue_capacity_images", **live_sum)
        self._queue_capacity.set(math.nan if max_queue_images is None else max_queue_images)
        self._in_flight = self._series(Gauge, "in_flight_images", **live_sum)

    def _init_predictions(
        self,
        classes: Sequence[str] | None,
        expected_ood_rate: float,
        info: Mapping[str, str] | None,
    ) -> None:
        self._scored = self._series(Counter, "images_scored")
        self._ood = self._series(Counter, "images_ood")
        self._predictions = self._family(Counter, "predictions", ("class",))
        if classes is not None and len(classes) <= self._max_class_series:
            self._classes = set(classes)
            self._classes_fixed = True
            for label in classes:
                self._predictions.labels(*self._base, label)
        self._scores = self._series(
            Histogram, "nac_score", buckets=self.drift_reference.finite_edges
        )
        reference_cdf = self._family(Gauge, "nac_score_reference_cdf", ("le",))
        for edge, share in self.drift_reference.cdf_at_edges():
            reference_cdf.labels(*self._base, floatToGoString(edge)).set(share)
        reference_cdf.labels(*self._base, "+Inf").set(1.0)
        self._series(Gauge, "ood_threshold").set(self.drift_reference.threshold)
        self._series(Gauge, "expected_ood_rate").set(expected_ood_rate)
        extra = dict(info or {})
        for key in extra:
            if not LABEL_NAME.match(key) or key in BASE_LABELS or key.startswith("__"):
                raise ValueError(f"invalid info label name {key!r}")
        info_keys = sorted(extra)
        self._family(Gauge, "model_info", info_keys).labels(
            *self._base, *(str(extra[k]) for k in info_keys)
        ).set(1)

    def _init_shared_state(self) -> None:
        self._cache = self._family(Counter, "cache_lookups", ("result",))
        self._cache_hit = self._cache.labels(*self._base, "hit")
        self._cache_miss = self._cache.labels(*self._base, "miss")
        self._redis_errors = self._family(Counter, "redis_errors", ("operation",))
        # No series until Redis is in use: without Redis configured there is nothing to be down.
        self._redis_up = self._family(Gauge, "redis_up", multiprocess_mode="livemin")
        self._review = self._series(Counter, "review_appends")

    def _init_drift(self) -> None:
        gauges = {
            # Every worker reports the same replica-wide window: the latest report is the one.
            name: self._family(Gauge, name, ("scope",), multiprocess_mode="livemostrecent")
            for name in HELP
            if name.startswith("drift_")
        }
        self._drift = DriftGauges(gauges, *self._base)

    # --- HTTP ---------------------------------------------------------------------------------
    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration.

        Args:
            endpoint: the route template (``/predict``), never the raw path, so unmatched paths
                must be folded into one value by the caller (e.g. ``"other"``).
            method: HTTP method.
            status: HTTP status code answered.
            seconds: time from request received to response sent.
        """
        key = (endpoint, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self._requests.labels(*self._base, endpoint, method, str(status)),
                self._request_seconds.labels(*self._base, endpoint, method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def reject(self, reason: str) -> None:
        """Count one refused or dropped request.

        Args:
            reason: one of :data:`REJECT_REASONS`; anything else is counted as ``other`` (and
                logged) rather than raising on a request's error path.
        """
        if reason not in REJECT_REASONS:
            log.warning("unknown rejection reason %r counted as %r", reason, OTHER)
            reason = OTHER
        self._rejections.labels(*self._base, reason).inc()

    # --- batching -----------------------------------------------------------------------------
    def observe_batch(self, stats: BatchStatsLike) -> None:
        """Record one computed batch: its size, each image's queue wait and latency, the compute
        time and how long the batch was held for mates."""
        children = self._batch_children.get(stats.device)
        if children is None:
            labels = (*self._base, stats.device)
            children = (
                self._batch_size.labels(*labels),
                self._inference.labels(*labels),
                self._queue_wait.labels(*labels),
                self._image_latency.labels(*labels),
                self._batch_hold.labels(*labels),
            )
            self._batch_children[stats.device] = children
        size, inference, wait, latency, hold = children
        size.observe(stats.size)
        inference.observe(stats.compute_s)
        hold.observe(stats.policy_wait_s)
        for seconds in stats.queue_wait_s:
            wait.observe(seconds)
            latency.observe(seconds + stats.compute_s)

    def set_queue_depth(self, images: int) -> None:
        """Images waiting in the batcher's queue."""
        self._queue_images.set(images)

    def set_in_flight(self, images: int) -> None:
        """Images accepted and not yet answered."""
        self._in_flight.set(images)

    # --- predictions --------------------------------------------------------------------------
    def observe_predictions(
        self, labels: Sequence[str], scores: Sequence[float], ood: Sequence[bool]
    ) -> None:
        """Record scored images: class counts, OOD flags and the NAC score histogram.

        Args:
            labels: predicted class label per image.
            scores: NAC score per image (NaN when scoring is off: not put in the histogram).
            ood: OOD flag per image.

        Raises:
            ValueError: the three sequences differ in length.
        """
        if not len(labels) == len(scores) == len(ood):
            raise ValueError("labels, scores and ood must have one entry per image")
        self._scored.inc(len(labels))
        flagged = sum(1 for flag in ood if flag)
        if flagged:
            self._ood.inc(flagged)
        for label in labels:
            child = self._prediction_children.get(label)
            if child is None:
                child = self._predictions.labels(*self._base, self._class_label(label))
                if label in self._classes:  # "other" stays looked up: a new class may fit later
                    self._prediction_children[label] = child
            child.inc()
        for score in scores:
            if not math.isnan(score):
                self._scores.observe(score)

    def observe_layer_scores(self, rows: Sequence[Sequence[float]]) -> None:
        """Per-layer NAC scores, one row per image in ``layers`` order (NaN: not scored)."""
        for row in rows:
            for child, score in zip(self._layer_children, row, strict=False):
                if score == score:
                    child.observe(score)

    def _class_label(self, label: str) -> str:
        if label in self._classes:
            return label
        if not self._classes_fixed and len(self._classes) < self._max_class_series:
            self._classes.add(label)
            return label
        return OTHER

    # --- shared state -------------------------------------------------------------------------
    def cache_lookup(self, hit: bool) -> None:
        """Count one result-cache lookup."""
        (self._cache_hit if hit else self._cache_miss).inc()

    def redis_error(self, operation: str) -> None:
        """Count one failed Redis call; ``operation`` is a fixed name such as ``cache_get``."""
        self._redis_errors.labels(*self._base, operation).inc()

    def set_redis_up(self, up: bool) -> None:
        """Whether Redis answers. Call only when Redis is configured."""
        self._redis_up.labels(*self._base).set(1 if up else 0)

    def review_appended(self) -> None:
        """Count one record appended to the OOD review stream."""
        self._review.inc()

    # --- drift --------------------------------------------------------------------------------
    def set_drift(self, report: DriftReport) -> None:
        """Export a drift report as gauges labelled by its scope (see :class:`DriftGauges`)."""
        self._drift.set(report)

    # --- exposition ---------------------------------------------------------------------------
    @property
    def multiprocess(self) -> bool:
        """Whether scrapes sum over several workers' value files."""
        return self._multiprocess_dir is not None

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type.

        Args:
            accept: the scrape's ``Accept`` header; OpenMetrics when it asks for it, else the
                Prometheus text format.
        """
        registry = self.registry
        if self._multiprocess_dir is not None:
            registry = multiprocess_registry(self._multiprocess_dir, self._device_memory)
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(registry), content_type
        return generate_latest(registry), CONTENT_TYPE_LATEST
