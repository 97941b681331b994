"""Shadow profiles: a version of a model that scores every image the model computes, and
answers none.

A :class:`Shadow` is loaded like a version (schema, sha256, weights shared through the
:class:`~nacguard.serving.loaded.WeightsPool` when their sha256 is a loaded one's) but gets no
batcher, no cache and no review sink: the primary versions' device runners score their batches
against it too (:class:`~nacguard.serving.compute.ShadowPlan`). With equal weights and the same
monitored layers that is the primary's forward's layer states looked up in a second set of
coverage tables; otherwise a forward of its own on the shadow's model. Its predictions go to
metrics of its own (``role="shadow"``: scored and flagged counts, score histograms) and a drift
window of its own; the answers are the primary's, computed as without a shadow.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import torch

from nacguard.bundle import Bundle, Prediction
from nacguard.bundle.shadow import shares_states
from nacguard.monitoring import Metrics
from nacguard.monitoring.exposition import RepositoryMetrics
from nacguard.serving.compute import ShadowPlan
from nacguard.serving.drift import DriftRecorder
from nacguard.serving.loaded import WeightsPool, load_bundles
from nacguard.serving.repository import VersionEntry
from nacguard.settings import Settings
from nacguard.store import Store, make_store

__all__ = ["Shadow", "load_shadow"]

log = logging.getLogger("nacguard.service")


class Shadow:
    """A loaded shadow profile: its bundles (one per device), metrics and drift window."""

    def __init__(
        self,
        entry: VersionEntry,
        bundles: list[Bundle],
        locks: list[threading.Lock],
        metrics: Metrics,
        drift: DriftRecorder,
        store: Store,
        repo_metrics: RepositoryMetrics,
    ) -> None:
        self.entry = entry
        self.bundles = bundles
        self._locks = locks
        self.metrics = metrics
        self.drift = drift
        self.store = store
        self._repo_metrics = repo_metrics
        self._warned: set[str] = set()

    @property
    def name(self) -> str:
        """``model/version``, for logs."""
        return f"{self.entry.model}/{self.entry.version}"

    def plan_for(self, primary: Bundle) -> ShadowPlan | None:
        """How a runner of ``primary`` scores against this shadow (None: it cannot, e.g. the
        shadow expects another input or other classes; logged once per primary)."""
        for bundle, lock in zip(self.bundles, self._locks, strict=True):
            if bundle.device != primary.device:
                continue
            if (
                bundle.preprocess.to_dict() != primary.preprocess.to_dict()
                or bundle.classes != primary.classes
            ):
                break
            return ShadowPlan(bundle, lock, shares_states(primary, bundle), self)
        key = f"{primary.name}@{primary.device}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("shadow %s cannot score %s (other input or classes)", self.name, key)
        return None

    def counted(self, forward: str) -> None:
        """One batch scored (``shared`` states or a ``separate`` forward); any thread."""
        self._repo_metrics.shadow_batch(self.entry.model, self.entry.version, forward)

    def observe(self, predictions: Sequence[Prediction]) -> None:
        """Record the shadow's predictions of computed images (on the event loop)."""
        self.metrics.observe_predictions(
            [p.label for p in predictions],
            [p.nac_score for p in predictions],
            [p.ood for p in predictions],
        )
        self.metrics.observe_layer_scores([p.layer_scores for p in predictions])
        self.drift.add([p.nac_score for p in predictions])

    async def refresh_gauges(self) -> None:
        """Bring the drift gauges up to date (at scrape time)."""
        self.metrics.set_drift(await self.drift.report())

    async def retire(self, pool: WeightsPool) -> None:
        """Flush the drift window, close the store and give the weights back."""
        await self.drift.flush()
        await self.store.close()
        for bundle in self.bundles:
            pool.drop(self.entry.weights_sha256, str(bundle.device))
        self.bundles.clear()
        log.info("unloaded shadow %s", self.name)


async def load_shadow(
    entry: VersionEntry, settings: Settings, pool: WeightsPool, repo_metrics: RepositoryMetrics
) -> Shadow:
    """Load and check a version as a shadow (not compiled: with shared states only its tables
    run; a separate forward runs eager).

    Raises:
        BundleError: invalid bundle; Exception: what loading or the check raised.
    """
    s = settings.model_copy(update={"compile": False})
    bundles, locks, reused = await asyncio.to_thread(load_bundles, entry, s, pool)
    if not reused:
        repo_metrics.weights_loaded(entry.model)
    store: Store | None = None
    try:
        bundle = bundles[0]
        calibration = bundle.calibration
        assert calibration is not None  # checked by load_bundles
        drift = DriftRecorder(calibration, s)
        metrics = Metrics(
            model=entry.model,
            profile=bundle.name,
            version=str(entry.version),
            role="shadow",
            drift_reference=drift.reference,
            expected_ood_rate=calibration.expected_ood_rate,
            classes=bundle.classes,
            layers=[lp.name for lp in bundle.layers],
            process_metrics=False,
            info={"identity": bundle.identity, "architecture": bundle.model_name},
        )
        # Only the drift window is used: no cache, no review records of its own.
        quiet = s.model_copy(update={"cache_enabled": False, "review_dir": None})
        store = make_store(
            quiet,
            bundle.identity + ":shadow",
            metrics,
            drift_bins=drift.reference.n_bins,
            drift_key=f"{entry.model}/{entry.version}/shadow",
        )
        await store.start()
        drift.attach(store.drift)
        await asyncio.to_thread(_check, bundles, locks)
    except BaseException:
        if store is not None:
            await store.close()
        for b in bundles:
            pool.drop(entry.weights_sha256, str(b.device))
        raise
    return Shadow(entry, bundles, locks, metrics, drift, store, repo_metrics)


def _check(bundles: list[Bundle], locks: list[threading.Lock]) -> None:
    """Score one blank image on each device, as a runner would (under the model's lock)."""
    for bundle, lock in zip(bundles, locks, strict=True):
        spec = bundle.preprocess
        with lock:
            bundle.predict_batch(torch.zeros(1, spec.channels, *spec.size))
