"""One loaded model version: its bundles (one per device), runners, batcher, metrics, store,
drift window and request pipeline; and the pool that lets versions with equal weights share them.

:func:`load_version` builds and warms one up (off the event loop where it runs torch). Requests
hold a *lease* (:meth:`LoadedVersion.acquire`) from the moment they pick a version until they
are answered, so a version swapped out finishes the work already given to it: :meth:`retire`
waits for its leases to end, then drains its batcher and frees its weights.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

import nacguard
from nacguard.accel import set_torch_flags
from nacguard.bundle import Bundle, load_bundle
from nacguard.engine import AdaptiveWait, Batcher, FixedWait, Runner
from nacguard.errors import BundleError
from nacguard.imaging.decode import InputLimits, OffLoop, RawImage
from nacguard.imaging.gpu_decode import GpuJpegDecoder
from nacguard.monitoring import Metrics
from nacguard.monitoring.exposition import RepositoryMetrics
from nacguard.monitoring.tracing import Tracing
from nacguard.serving.admission import Admission
from nacguard.serving.compute import DeviceCompute, ImageResult
from nacguard.serving.drift import DriftRecorder
from nacguard.serving.pipeline import Pipeline, PredictOutcome
from nacguard.serving.repository import VersionEntry
from nacguard.settings import Settings
from nacguard.store import Store, make_store

if TYPE_CHECKING:
    from nacguard.serving.shadow import Shadow

__all__ = ["LoadedVersion", "WeightsPool", "load_bundles", "load_version"]

log = logging.getLogger("nacguard.service")


@dataclass
class _Shared:
    module: nn.Module
    lock: threading.Lock
    users: int = 0


class WeightsPool:
    """Loaded classifiers by (weights sha256, device), shared by the versions that use them.

    A profile-only update (new NAC tables or threshold, same weights) reuses the module of the
    version it replaces instead of reading the weights again; the two then share one lock, so
    they never compute at the same time on the one module.
    """

    def __init__(self) -> None:
        self._shared: dict[tuple[str, str], _Shared] = {}
        self._guard = threading.Lock()

    def take(self, sha256: str, device: str) -> _Shared | None:
        """The shared module for these weights, counted as one more user; None if not loaded."""
        with self._guard:
            shared = self._shared.get((sha256, device)) if sha256 else None
            if shared is not None:
                shared.users += 1
            return shared

    def put(self, sha256: str, device: str, module: nn.Module) -> _Shared:
        """Register freshly loaded weights, with one user."""
        shared = _Shared(module, threading.Lock(), users=1)
        with self._guard:
            if sha256:
                self._shared[(sha256, device)] = shared
        return shared

    def drop(self, sha256: str, device: str) -> None:
        """One user fewer; the module is forgotten with its last user."""
        with self._guard:
            shared = self._shared.get((sha256, device))
            if shared is not None:
                shared.users -= 1
                if shared.users <= 0:
                    del self._shared[(sha256, device)]


@dataclass
class LoadedVersion:
    """A loaded, warmed-up model version and what serves it."""

    entry: VersionEntry
    bundles: list[Bundle]
    batcher: Batcher[torch.Tensor, ImageResult]
    metrics: Metrics
    store: Store
    drift: DriftRecorder
    pipeline: Pipeline
    profile_id: str
    weights_reused: bool
    computes: list[DeviceCompute] = field(default_factory=list)
    leases: int = 0
    retiring: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def bundle(self) -> Bundle:
        """The first device's bundle (what ``describe()`` reports)."""
        return self.bundles[0]

    @property
    def name(self) -> str:
        """``model/version``, for logs."""
        return f"{self.entry.model}/{self.entry.version}"

    def acquire(self) -> LoadedVersion:
        """One more request using this version (until :meth:`release`)."""
        self.leases += 1
        self._idle.clear()
        return self

    def release(self) -> None:
        """A request using this version is answered (or failed)."""
        self.leases -= 1
        if self.leases <= 0:
            self._idle.set()

    def set_shadow(self, shadow: Shadow | None) -> None:
        """Score every batch against ``shadow`` too from now on (None: no longer)."""
        for compute in self.computes:
            compute.shadow = shadow.plan_for(compute.bundle) if shadow is not None else None

    async def refresh_gauges(self) -> None:
        """Bring the scrape-time gauges (queue, in flight, drift) up to date."""
        self.metrics.set_queue_depth(self.batcher.queue_depth)
        self.metrics.set_in_flight(self.batcher.in_flight)
        self.metrics.set_drift(await self.drift.report())

    async def predict(
        self, images: Sequence[RawImage], *, deadline: float, request_id: str, admission: Admission
    ) -> PredictOutcome:
        """Run one request through the pipeline under the lease taken by :meth:`acquire`, and
        release it once the answer's side effects are done (see ``Service.predict``)."""
        try:
            outcome = await self.pipeline.predict(
                images, deadline=deadline, request_id=request_id, admission=admission
            )
        except BaseException:
            self.release()
            raise
        outcome.model, outcome.version = self.entry.model, self.entry.version
        outcome.profile = self.bundle.name
        effects = outcome.after_response
        if effects is None:
            self.release()
            return outcome

        async def after_response() -> None:
            try:
                await effects()
            finally:
                self.release()

        outcome.after_response = after_response
        return outcome

    async def retire(self, pool: WeightsPool, timeout: float) -> None:  # noqa: ASYNC109
        """Let the requests holding it finish (at most ``timeout`` seconds), then drain the
        batcher, close the store and free the weights."""
        self.retiring = True
        started = time.monotonic()
        if self.leases > 0:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("%s: %d request(s) still running at unload", self.name, self.leases)
        left = max(0.0, timeout - (time.monotonic() - started))
        await self.batcher.stop(drain=True, timeout=left)
        await self.drift.flush()
        await self.store.close()
        for bundle in self.bundles:
            pool.drop(self.entry.weights_sha256, str(bundle.device))
        self.bundles.clear()
        log.info("unloaded %s", self.name)


def load_bundles(
    entry: VersionEntry, settings: Settings, pool: WeightsPool
) -> tuple[list[Bundle], list[threading.Lock], bool]:
    """Load ``entry`` on every device, sharing loaded weights of the same sha256 (a pool user
    each). Returns the bundles, their models' locks, and whether every device's weights were
    shared. Raises BundleError (also for a profile without calibration); nothing stays taken."""
    s = settings
    bundles: list[Bundle] = []
    locks: list[threading.Lock] = []
    reused = True
    for device in s.devices:
        # Process-wide flags, once per device type, before the first forward.
        set_torch_flags(device, s.precision, buckets=bool(s.batch_buckets))
        shared = pool.take(entry.weights_sha256, device)
        log.info(
            "loading %s/%s from %s onto %s%s",
            entry.model,
            entry.version,
            entry.path,
            device,
            " (weights shared with a loaded version)" if shared else "",
        )
        try:
            bundle = load_bundle(
                entry.path,
                device,
                precision=s.precision,
                channels_last=s.channels_last,
                compile=s.compile,
                compile_mode=s.compile_mode,
                batch_buckets=s.batch_buckets,
                ood_alpha=s.ood_alpha,
                ood_detector=s.ood_detector,
                model=shared.module if shared is not None else None,
            )
        except BaseException:
            if shared is not None:
                pool.drop(entry.weights_sha256, device)
            for done in bundles:
                pool.drop(entry.weights_sha256, str(done.device))
            raise
        if shared is None:
            reused = False
            shared = pool.put(entry.weights_sha256, device, bundle.model)
        bundles.append(bundle)
        locks.append(shared.lock)
    if bundles[0].calibration is None:
        for done in bundles:
            pool.drop(entry.weights_sha256, str(done.device))
        raise BundleError(f"{entry.path}: the profile has no calibration, so no OOD threshold")
    return bundles, locks, reused


async def load_version(
    entry: VersionEntry,
    settings: Settings,
    pool: WeightsPool,
    repo_metrics: RepositoryMetrics,
    *,
    limits: InputLimits,
    offloop: OffLoop,
    tracing: Tracing,
    process_metrics: bool,
) -> LoadedVersion:
    """Load, check and warm up one version; it serves nothing until the caller swaps it in.

    Raises:
        BundleError: invalid bundle (schema, sha256, files, model/profile mismatch).
        Exception: whatever loading or warming up raised; nothing is left loaded.
    """
    s = settings
    bundles, locks, reused = await asyncio.to_thread(load_bundles, entry, s, pool)
    if not reused:
        repo_metrics.weights_loaded(entry.model)
    bundle = bundles[0]
    calibration = bundle.calibration
    assert calibration is not None  # checked in _load_bundles
    profile_id = bundle.identity
    if not s.scoring:
        profile_id += ":noscore"
    if s.precision != "fp32":
        profile_id += f":{s.precision}"
    drift = DriftRecorder(calibration, s)
    metrics = Metrics(
        model=entry.model,
        profile=bundle.name,
        version=str(entry.version),
        drift_reference=drift.reference,
        expected_ood_rate=calibration.expected_ood_rate,
        max_queue_images=s.max_queue_images,
        classes=bundle.classes,
        layers=[lp.name for lp in bundle.layers],
        process_metrics=process_metrics,
        info={
            "nacguard_version": nacguard.__version__,
            "device": s.device,
            "precision": s.precision,
            "identity": bundle.identity,
            "architecture": bundle.model_name,
        },
    )
    computes = [DeviceCompute(b, s, lock) for b, lock in zip(bundles, locks, strict=True)]
    runners = [Runner(c, name=c.device) for c in computes]
    store: Store | None = None
    try:
        store = make_store(
            s,
            profile_id,
            metrics,
            drift_bins=drift.reference.n_bins,
            drift_key=f"{entry.model}/{entry.version}/primary",
            model=entry.model,
            version=entry.version,
        )
        await store.start()
        drift.attach(store.drift)
        spec = bundle.preprocess
        dummy = torch.zeros(spec.channels, *spec.size)
        for runner in runners:
            # The first batch a runner computes warms its bundle up on the runner's own thread.
            await runner.run([dummy])
    except BaseException:
        for runner in runners:
            runner.close()
        if store is not None:
            await store.close()
        for b in bundles:
            pool.drop(entry.weights_sha256, str(b.device))
        raise
    wait = AdaptiveWait if s.batch_wait == "adaptive" else FixedWait
    batcher = Batcher(
        runners,
        max_batch_size=s.max_batch_size,
        policy=wait(s.max_wait_ms / 1000.0),
        max_queue=s.max_queue_images,
        retry_after_s=s.retry_after_s,
        on_batch=metrics.observe_batch,
    )
    await batcher.start()
    gpu = None
    if s.gpu_decode and bundle.device.type == "cuda":  # JPEGs decode on the first device
        gpu = GpuJpegDecoder(bundle.device, max_pixels=s.max_image_pixels)
        await asyncio.to_thread(gpu.warmup)
    pipeline = Pipeline(bundle, batcher, store, metrics, drift, limits, offloop, gpu, tracing)
    return LoadedVersion(
        entry=entry,
        bundles=bundles,
        batcher=batcher,
        metrics=metrics,
        store=store,
        drift=drift,
        pipeline=pipeline,
        profile_id=profile_id,
        weights_reused=reused,
        computes=computes,
    )
