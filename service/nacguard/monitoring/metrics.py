"""Every Prometheus metric nacguard exports, in one place.

Conventions: names start with ``nacguard_`` and end in their base unit (``_seconds``,
``_bytes``, ``_images``) or ``_total`` for counters; durations and sizes are histograms, which
add up across replicas (summaries do not); every series carries the constant labels ``model``
and ``profile`` so one dashboard filters by model, and the other labels are small closed sets
(endpoint templates, status codes, devices, rejection reasons, class labels up to a cap).

The NAC score histogram's buckets are the drift reference's edges (quantiles of the profile's
InD calibration scores plus the OOD threshold), and ``nacguard_nac_score_reference_cdf`` exports
the reference's cumulative share at each bucket bound, so Prometheus alone can compare the live
score distribution with the reference (see docker/prometheus/rules/nacguard.rules.yml).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
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
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nacguard.monitoring.drift import DriftReference, DriftReport

__all__ = ["REJECT_REASONS", "BatchStatsLike", "Metrics"]

log = logging.getLogger(__name__)

#: Reasons work is refused or dropped; ``Metrics.reject`` takes one of these.
REJECT_REASONS: tuple[str, ...] = (
    "queue_full",
    "deadline",
    "too_large",
    "bad_input",
    "unsupported",
    "unauthorized",
    "shutting_down",
    "inference_error",
)

#: Label value for classes past ``max_class_series`` and for unknown rejection reasons.
OTHER = "other"

# End-to-end request latency: from a cached answer (~1 ms) to the default 10 s deadline.
_REQUEST_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Queue waits are often far below a millisecond when idle and reach seconds under overload.
_QUEUE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# How long an idle device held a batch back for mates: mostly 0 (le="0.0" counts batches that
# ran at once), otherwise up to max_wait_ms.
_HOLD_BUCKETS = (0.0, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)
# One batch's forward pass: sub-millisecond for the demo net, up to seconds for big CPU batches.
_INFERENCE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Powers of two cover every max_batch_size the settings allow (<= 4096).
_BATCH_BUCKETS = tuple(float(2**i) for i in range(13))

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class BatchStatsLike(Protocol):
    """What :meth:`Metrics.observe_batch` reads (``nacguard.engine.BatchStats`` fits)."""

    @property
    def device(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def queue_wait_s(self) -> Sequence[float]: ...
    @property
    def compute_s(self) -> float: ...
    @property
    def policy_wait_s(self) -> float: ...


class _DeviceMemoryCollector(Collector):
    """Reads CUDA memory at scrape time, for devices torch has already initialised.

    torch is looked up in ``sys.modules`` instead of imported: monitoring must not pull torch in,
    and a scrape must never be the thing that initialises CUDA.
    """

    def __init__(self, model: str, profile: str) -> None:
        self._labels = [model, profile]

    def collect(self) -> Iterable[Metric]:
        names = ["model", "profile", "device"]
        allocated = GaugeMetricFamily(
            "nacguard_device_memory_allocated_bytes",
            "Accelerator memory held by tensors (torch.cuda.memory_allocated).",
            labels=names,
        )
        reserved = GaugeMetricFamily(
            "nacguard_device_memory_reserved_bytes",
            "Accelerator memory reserved by the caching allocator (torch.cuda.memory_reserved).",
            labels=names,
        )
        total = GaugeMetricFamily(
            "nacguard_device_memory_total_bytes",
            "Accelerator memory capacity.",
            labels=names,
        )
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                for index in range(torch.cuda.device_count()):
                    labels = [*self._labels, f"cuda:{index}"]
                    allocated.add_metric(labels, float(torch.cuda.memory_allocated(index)))
                    reserved.add_metric(labels, float(torch.cuda.memory_reserved(index)))
                    props = torch.cuda.get_device_properties(index)
                    total.add_metric(labels, float(props.total_memory))
        except Exception:  # a scrape must not fail because a device query did
            log.warning("device memory query failed", exc_info=True)
        yield allocated
        yield reserved
        yield total


class _Labelled(Collector):
    """Adds the constant model/profile labels to another collector's samples (the process
    collector), so every nacguard series can be filtered by model alike."""

    def __init__(self, inner: Collector, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                out.add_sample(
                    sample.name,
                    {**sample.labels, **self._labels},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield out


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
        reference_scores: np.ndarray,
        threshold: float,
        expected_ood_rate: float,
        registry: CollectorRegistry | None = None,
        drift_reference: DriftReference | None = None,
        max_queue_images: int | None = None,
        classes: Sequence[str] | None = None,
        max_class_series: int = 100,
        info: Mapping[str, str] | None = None,
        process_metrics: bool = True,
    ) -> None:
        """Create and register every metric.

        Args:
            model: model name (constant ``model`` label).
            profile: profile id (constant ``profile`` label).
            reference_scores: the profile's InD calibration scores.
            threshold: the OOD threshold (score below = OOD).
            expected_ood_rate: share flagged OOD without drift, ``1 - calibrated TPR``.
            registry: registry to use; a fresh one by default (never the global one, so several
                apps in one test process do not collide).
            drift_reference: bins for the NAC score histogram; built from ``reference_scores``
                and ``threshold`` with default bins when absent. Use :attr:`drift_reference`
                for the drift window so both share the same bins.
            max_queue_images: the batcher's queue bound, exported so saturation is a ratio.
            classes: the model's class labels. When given (and no more than
                ``max_class_series``) every class gets a series from the start, so rates of
                never-predicted classes read 0, not "no data".
            max_class_series: most class labels with a series of their own; later ones count
                under ``class="other"`` (a 1000-class model must not add 1000 series).
            info: extra constant labels of ``nacguard_model_info`` (version, device, ...).
            process_metrics: export ``nacguard_process_*`` (memory, CPU, fds) of this process.
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = model
        self.profile = profile
        self.drift_reference = drift_reference or DriftReference(reference_scores, threshold)
        base = ("model", "profile")
        base_l = {"model": model, "profile": profile}
        reg = self.registry

        # --- HTTP -----------------------------------------------------------------------------
        self._requests = Counter(
            "nacguard_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            [*base, "endpoint", "method", "status"],
            registry=reg,
        )
        self._request_seconds = Histogram(
            "nacguard_http_request_duration_seconds",
            "Time from request received to response sent.",
            [*base, "endpoint", "method"],
            buckets=_REQUEST_BUCKETS,
            registry=reg,
        )
        self._rejections = Counter(
            "nacguard_rejections",
            "Requests refused or dropped, by reason.",
            [*base, "reason"],
            registry=reg,
        )
        for reason in REJECT_REASONS:
            self._rejections.labels(model, profile, reason)

        # --- batching -------------------------------------------------------------------------
        self._queue_wait = Histogram(
            "nacguard_queue_wait_seconds",
            "Per image: time from enqueue to the start of its batch.",
            [*base, "device"],
            buckets=_QUEUE_BUCKETS,
            registry=reg,
        )
        self._inference = Histogram(
            "nacguard_inference_duration_seconds",
            "Per batch: forward pass and scoring time on the device.",
            [*base, "device"],
            buckets=_INFERENCE_BUCKETS,
            registry=reg,
        )
        self._image_latency = Histogram(
            "nacguard_image_latency_seconds",
            "Per image: time from enqueue to its batch's answer (queue wait + compute).",
            [*base, "device"],
            buckets=_QUEUE_BUCKETS,
            registry=reg,
        )
        self._batch_hold = Histogram(
            "nacguard_batch_wait_seconds",
            "Per batch: how long the idle device held it back for batch-mates, as the batching "
            "policy chose (0: it ran at once; at most max_wait_ms).",
            [*base, "device"],
            buckets=_HOLD_BUCKETS,
            registry=reg,
        )
        self._batch_size = Histogram(
            "nacguard_batch_size_images",
            "Images per computed batch.",
            [*base, "device"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        )
        self._queue_images = Gauge(
            "nacguard_queue_images", "Images queued, waiting for a batch.", base, registry=reg
        ).labels(model, profile)
        self._queue_capacity = Gauge(
            "nacguard_queue_capacity_images",
            "Queue bound (max_queue_images); queued / capacity is saturation.",
            base,
            registry=reg,
        ).labels(model, profile)
        self._queue_capacity.set(math.nan if max_queue_images is None else max_queue_images)
        self._in_flight = Gauge(
            "nacguard_in_flight_images",
            "Images accepted and not yet answered (queued or computing).",
            base,
            registry=reg,
        ).labels(model, profile)

        # --- predictions and scores -----------------------------------------------------------
        self._scored = Counter(
            "nacguard_images_scored", "Images classified and scored.", base, registry=reg
        ).labels(model, profile)
        self._ood = Counter(
            "nacguard_images_ood",
            "Images flagged out-of-distribution (NAC score below the threshold).",
            base,
            registry=reg,
        ).labels(model, profile)
        self._predictions = Counter(
            "nacguard_predictions",
            "Images by predicted class.",
            [*base, "class"],
            registry=reg,
        )
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
        if classes is not None and len(classes) <= max_class_series:
            self._classes = set(classes)
            self._classes_fixed = True
            for label in classes:
                self._predictions.labels(model, profile, label)
        self._scores = Histogram(
            "nacguard_nac_score",
            "NAC scores of scored images; buckets are the drift reference's bin edges.",
            base,
            buckets=self.drift_reference.finite_edges,
            registry=reg,
        ).labels(model, profile)
        reference_cdf = Gauge(
            "nacguard_nac_score_reference_cdf",
            "Share of the InD calibration scores <= le: the expected value of the NAC score "
            "histogram's bucket / count ratio without drift.",
            [*base, "le"],
            registry=reg,
        )
        ref = np.sort(np.asarray(reference_scores, dtype=np.float64).ravel())
        ref = ref[np.isfinite(ref)]
        for edge in self.drift_reference.finite_edges:
            share = float(np.searchsorted(ref, edge, side="right") / max(ref.size, 1))
            reference_cdf.labels(model, profile, floatToGoString(edge)).set(share)
        reference_cdf.labels(model, profile, "+Inf").set(1.0)
        Gauge(
            "nacguard_ood_threshold", "NAC score below which an image is OOD.", base, registry=reg
        ).labels(model, profile).set(threshold)
        Gauge(
            "nacguard_expected_ood_rate",
            "Share of InD images flagged OOD by design (1 - calibrated TPR).",
            base,
            registry=reg,
        ).labels(model, profile).set(expected_ood_rate)
        extra = dict(info or {})
        for key in extra:
            if not _LABEL_NAME.match(key) or key in base or key.startswith("__"):
                raise ValueError(f"invalid info label name {key!r}")
        info_keys = sorted(extra)
        Gauge(
            "nacguard_model_info",
            "Constant 1; the labels describe the served model and profile.",
            [*base, *info_keys],
            registry=reg,
        ).labels(model, profile, *(str(extra[k]) for k in info_keys)).set(1)

        # --- shared state ---------------------------------------------------------------------
        self._cache = Counter(
            "nacguard_cache_lookups",
            "Result-cache lookups, by result (hit or miss).",
            [*base, "result"],
            registry=reg,
        )
        self._cache_hit = self._cache.labels(model, profile, "hit")
        self._cache_miss = self._cache.labels(model, profile, "miss")
        self._redis_errors = Counter(
            "nacguard_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            [*base, "operation"],
            registry=reg,
        )
        # No series until Redis is in use: without Redis configured there is nothing to be down.
        self._redis_up = Gauge(
            "nacguard_redis_up", "1 if the last Redis call succeeded, else 0.", base, registry=reg
        )
        self._review = Counter(
            "nacguard_review_appends",
            "OOD images appended to the review stream (or folder).",
            base,
            registry=reg,
        ).labels(model, profile)

        # --- drift ----------------------------------------------------------------------------
        scoped = [*base, "scope"]
        self._drift_gauges = {
            "ood_rate": Gauge(
                "nacguard_drift_ood_rate",
                "Share of the drift window flagged OOD (NaN below min samples).",
                scoped,
                registry=reg,
            ),
            "psi": Gauge(
                "nacguard_drift_psi",
                "Population stability index of the drift window vs the reference.",
                scoped,
                registry=reg,
            ),
            "ks": Gauge(
                "nacguard_drift_ks",
                "Kolmogorov-Smirnov statistic of the drift window vs the reference.",
                scoped,
                registry=reg,
            ),
            "samples": Gauge(
                "nacguard_drift_samples", "Scores in the drift window.", scoped, registry=reg
            ),
            "window": Gauge(
                "nacguard_drift_window_seconds",
                "Length of the drift window.",
                scoped,
                registry=reg,
            ),
            "psi_threshold": Gauge(
                "nacguard_drift_psi_threshold",
                "PSI above this counts as drift.",
                scoped,
                registry=reg,
            ),
            "ks_threshold": Gauge(
                "nacguard_drift_ks_threshold",
                "KS above this counts as drift.",
                scoped,
                registry=reg,
            ),
            "drifting": Gauge(
                "nacguard_drift_drifting",
                "1 if PSI or KS is above its threshold, else 0.",
                scoped,
                registry=reg,
            ),
        }
        self._drift_scope: str | None = None

        # --- resources ------------------------------------------------------------------------
        if process_metrics:
            reg.register(_Labelled(ProcessCollector(namespace="nacguard", registry=None), base_l))
        reg.register(_DeviceMemoryCollector(model, profile))

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
                self._requests.labels(self.model, self.profile, endpoint, method, str(status)),
                self._request_seconds.labels(self.model, self.profile, endpoint, method),
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
        self._rejections.labels(self.model, self.profile, reason).inc()

    # --- batching -----------------------------------------------------------------------------
    def observe_batch(self, stats: BatchStatsLike) -> None:
        """Record one computed batch: its size, each image's queue wait and latency, the compute
        time and how long the batch was held for mates."""
        children = self._batch_children.get(stats.device)
        if children is None:
            labels = (self.model, self.profile, stats.device)
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
                child = self._predictions.labels(self.model, self.profile, self._class_label(label))
                if label in self._classes:  # "other" stays looked up: a new class may fit later
                    self._prediction_children[label] = child
            child.inc()
        for score in scores:
            if not math.isnan(score):
                self._scores.observe(score)

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
        self._redis_errors.labels(self.model, self.profile, operation).inc()

    def set_redis_up(self, up: bool) -> None:
        """Whether Redis answers. Call only when Redis is configured."""
        self._redis_up.labels(self.model, self.profile).set(1 if up else 0)

    def review_appended(self) -> None:
        """Count one record appended to the OOD review stream."""
        self._review.inc()

    # --- drift --------------------------------------------------------------------------------
    def set_drift(self, report: DriftReport) -> None:
        """Export a drift report as gauges labelled by its scope.

        When the scope changes (Redis lost: fleet -> local), the old scope's series are removed
        so a stale fleet value does not linger beside the live local one.
        """
        scope = report.scope
        if self._drift_scope is not None and self._drift_scope != scope:
            for gauge in self._drift_gauges.values():
                gauge.remove(self.model, self.profile, self._drift_scope)
        self._drift_scope = scope

        def value(x: float | None) -> float:
            return math.nan if x is None else float(x)

        values = {
            "ood_rate": value(report.ood_rate),
            "psi": value(report.psi),
            "ks": value(report.ks),
            "samples": float(report.samples),
            "window": report.window_s,
            "psi_threshold": report.psi_threshold,
            "ks_threshold": report.ks_threshold,
            "drifting": 1.0 if report.drifting else 0.0,
        }
        for key, gauge in self._drift_gauges.items():
            gauge.labels(self.model, self.profile, scope).set(values[key])

    # --- exposition ---------------------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type.

        Args:
            accept: the scrape's ``Accept`` header; OpenMetrics when it asks for it, else the
                Prometheus text format.
        """
        if accept:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample_names(self) -> set[str]:
        """Every sample name this registry can export, whether or not it has a value yet.

        Used by tests to check that dashboards and rules only reference real metrics.
        """
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
            "summary": ("", "_count", "_sum", "_created"),
            "info": ("_info",),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            for suffix in suffixes.get(family.type, ("",)):
                names.add(family.name + suffix)
            names.update(sample.name for sample in family.samples)
        return names
