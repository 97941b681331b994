"""The catalogue of every Prometheus metric nacguard exports: names (after the ``nacguard_``
prefix) and help texts, histogram buckets and the closed label sets. The metrics themselves are
created and recorded in :mod:`nacguard.monitoring.metrics`, and nowhere else."""

from __future__ import annotations

import re

__all__ = [
    "BASE_LABELS",
    "BATCH_BUCKETS",
    "HELP",
    "HOLD_BUCKETS",
    "INFERENCE_BUCKETS",
    "LABEL_NAME",
    "LAYER_BUCKETS",
    "OTHER",
    "QUEUE_BUCKETS",
    "REJECT_REASONS",
    "REQUEST_BUCKETS",
]

#: The constant labels of every series: which model, profile, version and role it describes.
BASE_LABELS = ("model", "profile", "version", "role")
#: What an extra label name may look like.
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

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


def _seconds(bounds: str) -> tuple[float, ...]:
    return tuple(float(b) for b in bounds.split())


# End-to-end request latency: from a cached answer (~1 ms) to the default 10 s deadline.
REQUEST_BUCKETS = _seconds("0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1.0 2.5 5.0 10.0 30.0")
# Queue waits are often far below a millisecond when idle and reach seconds under overload.
QUEUE_BUCKETS = _seconds(
    "0.0001 0.00025 0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1.0 2.5 5.0 10.0"
)
# How long an idle device held a batch back for mates: mostly 0 (le="0.0" counts batches that
# ran at once), otherwise up to max_wait_ms.
HOLD_BUCKETS = (0.0, *_seconds("0.0001 0.00025 0.0005 0.001 0.002 0.005 0.01 0.025 0.05 0.1 1.0"))
# One batch's forward pass: sub-millisecond for the demo net, up to seconds for big CPU batches.
INFERENCE_BUCKETS = _seconds(
    "0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25 0.5 1.0 2.5 5.0 10.0"
)
# Powers of two cover every max_batch_size the settings allow (<= 4096).
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))
# Per-layer NAC scores: coarse below 0.8, where InD images rarely score, fine above it.
LAYER_BUCKETS = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)

#: Help text of every metric, by name after the ``nacguard_`` prefix.
HELP: dict[str, str] = {
    # HTTP
    "http_requests": "HTTP requests answered, by route template, method and status code.",
    "http_request_duration_seconds": "Time from request received to response sent.",
    "rejections": "Requests refused or dropped, by reason.",
    # batching
    "queue_wait_seconds": "Per image: time from enqueue to the start of its batch.",
    "inference_duration_seconds": "Per batch: forward pass and scoring time on the device.",
    "image_latency_seconds": "Per image: time from enqueue to its batch's answer "
    "(queue wait + compute).",
    "batch_wait_seconds": "Per batch: how long the idle device held it back for batch-mates, as "
    "the batching policy chose (0: it ran at once; at most max_wait_ms).",
    "batch_size_images": "Images per computed batch.",
    "queue_images": "Images queued, waiting for a batch.",
    "queue_capacity_images": "Queue bound (max_queue_images); queued / capacity is saturation.",
    "in_flight_images": "Images accepted and not yet answered (queued or computing).",
    # predictions and scores
    "images_scored": "Images classified and scored.",
    "images_ood": "Images flagged out-of-distribution (NAC score below the threshold).",
    "predictions": "Images by predicted class.",
    "nac_score": "NAC scores of scored images; buckets are the drift reference's bin edges.",
    "layer_nac_score": "Per-layer NAC scores of scored images (their mean is nacguard_nac_score), "
    "so drift can be read layer by layer.",
    "nac_score_reference_cdf": "Share of the InD calibration scores <= le: the expected value "
    "of the NAC score histogram's bucket / count ratio without drift.",
    "ood_threshold": "NAC score below which an image is OOD.",
    "expected_ood_rate": "Share of InD images flagged OOD by design (1 - calibrated TPR).",
    "model_info": "Constant 1; the labels describe the served model and profile.",
    # shared state
    "cache_lookups": "Result-cache lookups, by result (hit or miss).",
    "redis_errors": "Redis calls that failed or timed out, by operation.",
    "redis_up": "1 if the last Redis call succeeded, else 0.",
    "review_appends": "OOD images appended to the review stream (or folder).",
    # the model repository (nacguard.monitoring.exposition.RepositoryMetrics)
    "model_load_failures": "Model versions refused: failed validation, loading or warm-up "
    "(the version served before keeps serving).",
    "model_weight_loads": "Times model weights were read from disk (a profile-only update "
    "with the same weights sha256 does not read them).",
    "model_swaps": "Times a model's served version changed.",
    "model_versions_loaded": "1 for each loaded model version, by role.",
    "shadow_batches": "Batches a shadow profile scored, by forward: shared (the primary's "
    "layer states, no forward of its own) or separate (a forward on the shadow's weights).",
    # drift, labelled by scope (fleet or local)
    "drift_ood_rate": "Share of the drift window flagged OOD (NaN below min samples).",
    "drift_psi": "Population stability index of the drift window vs the reference.",
    "drift_ks": "Kolmogorov-Smirnov statistic of the drift window vs the reference.",
    "drift_samples": "Scores in the drift window.",
    "drift_window_seconds": "Length of the drift window.",
    "drift_psi_threshold": "PSI above this counts as drift.",
    "drift_ks_threshold": "KS above this counts as drift.",
    "drift_drifting": "1 if PSI or KS is above its threshold, else 0.",
}
