"""The HTTP-free serving core: one :class:`Service` per server process.

Adapters (``api/`` for HTTP, and any other protocol) parse their requests and call the service;
nothing here imports a web framework. The public surface:

* lifecycle: :meth:`Service.launch` (start loading in the background), :meth:`~Service.wait_ready`,
  :meth:`~Service.drain` (first SIGTERM), :meth:`~Service.close` (lifespan exit);
* state: :attr:`~Service.ready`, :attr:`~Service.draining`, :meth:`~Service.check_ready`
  (readiness), :attr:`~Service.bundle` (what is served: ``describe()``, ``classes``),
  :attr:`~Service.limits` and :attr:`~Service.offloop` (input limits and where parsing runs);
* requests: :meth:`~Service.admit` (the one admission check), then :meth:`~Service.predict`
  (cache -> decode -> batch -> side effects, :mod:`nacguard.serving.pipeline`);
* monitoring: :meth:`~Service.drift` and :meth:`~Service.render_metrics`.

Lifecycle:

1. :meth:`Service.launch` starts loading in the background, so an adapter answers liveness (and
   readiness with 503) while a large model loads.
2. Loading runs off the event loop: the process-wide torch flags (once), one bundle per device,
   the drift reference, metrics, the store, one runner per device, warm-up batches (sizes 1,
   every bucket and ``max_batch_size``), then the batcher starts and the service is ready.
3. :meth:`Service.drain` (first SIGTERM): refuse new requests at once, let requests already
   admitted reach the queue, compute everything queued without waiting for batch-mates, and
   wait for the answers to be built. :meth:`Service.close` then releases the store and the
   runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence

import torch

import nacguard
from nacguard.accel import set_torch_flags
from nacguard.bundle import Bundle, load_bundle
from nacguard.engine import AdaptiveWait, Batcher, FixedWait, Runner
from nacguard.errors import BundleError, NotReady, ShuttingDown
from nacguard.imaging.decode import InputLimits, OffLoop, RawImage, decode_pool_size
from nacguard.imaging.gpu_decode import GpuJpegDecoder
from nacguard.monitoring import DriftReport, Metrics
from nacguard.monitoring.tracing import Tracing
from nacguard.serving.admission import Admission, Gate, Priority, wait_until
from nacguard.serving.compute import DeviceCompute, ImageResult
from nacguard.serving.drift import DriftRecorder
from nacguard.serving.pipeline import Pipeline, PredictOutcome
from nacguard.settings import Settings
from nacguard.store import Store, make_store

__all__ = ["Service"]

log = logging.getLogger("nacguard.service")


class Service:
    """Owns the model, batcher, metrics and store of one server process.

    Args:
        settings: the validated settings.
        tracing: OpenTelemetry spans; by default as the ``OTEL_*`` variables say (off unless
            an exporter is configured).

    Attributes:
        settings: the settings it was built with.
        limits: the request limits (adapters enforce the count and size ones while parsing).
        offloop: where CPU-bound input work runs (adapters parse bodies through it).
        bundle: the served bundle of the first device (``None`` until loaded).
        metrics: the Prometheus metrics (``None`` until loaded).
        on_fatal: called with the exception when loading fails, so the server can exit.
    """

    def __init__(self, settings: Settings, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing if tracing is not None else Tracing.from_env()
        self.limits = InputLimits.from_settings(settings)
        self.offloop = OffLoop(decode_pool_size(settings))
        self.bundle: Bundle | None = None
        self.metrics: Metrics | None = None
        self.store: Store | None = None
        self.batcher: Batcher[torch.Tensor, ImageResult] | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._runners: list[Runner[torch.Tensor, ImageResult]] = []
        self._ready = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._gate = Gate.from_settings(settings)
        self._drift: DriftRecorder | None = None
        self._pipeline: Pipeline | None = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and not draining."""
        return self._ready.is_set() and not self.draining

    @property
    def devices(self) -> list[str]:
        """The devices with a runner (empty until loaded)."""
        return [runner.name for runner in self._runners]

    @property
    def requests_in_progress(self) -> int:
        """Predict requests admitted and not yet answered."""
        return self._gate.in_progress

    @property
    def profile_id(self) -> str:
        """Identity of what is served (cache and drift keys): bundle identity, plus the scoring
        mode and precision where they change the scores."""
        if self.bundle is None:
            raise NotReady("profile not loaded")
        ident = self.bundle.identity
        if not self.settings.scoring:
            ident += ":noscore"
        if self.settings.precision != "fp32":
            ident += f":{self.settings.precision}"
        return ident

    def _not_ready(self) -> NotReady:
        retry = self.settings.retry_after_s
        if self.load_error is not None:
            return NotReady(f"the profile failed to load: {self.load_error}", retry_after=retry)
        return NotReady("loading and warming up the model", retry_after=retry)

    def check_ready(self) -> None:
        """Raise unless the service takes requests (the readiness check).

        Raises:
            ShuttingDown: draining.
            NotReady: still loading, or loading failed.
        """
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down", retry_after=self.settings.retry_after_s
            )
        if not self._ready.is_set():
            raise self._not_ready()

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - a plain bound
        """Wait until ready (for tests and tools); :meth:`launch` must have been called.

        Raises:
            Exception: the loading error, if loading failed.
            TimeoutError: not ready within ``timeout`` seconds.
        """
        if self._start_task is None:
            raise RuntimeError("the service was not launched")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait(
                {ready, self._start_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if self._ready.is_set():
            return
        if self.load_error is not None:
            raise self.load_error
        raise TimeoutError(f"service not ready after {timeout}s")

    # --- lifecycle -----------------------------------------------------------------------------

    def launch(self) -> None:
        """Start loading in the background (call on the running loop)."""
        if self._start_task is None:
            self._start_task = asyncio.create_task(self._start(), name="nacguard-load")

    def _load_bundles(self) -> list[Bundle]:
        s = self.settings
        bundles = []
        for device in s.devices:
            # Process-wide flags, once per device type, before the first forward.
            set_torch_flags(device, s.precision, buckets=bool(s.batch_buckets))
            log.info("loading profile %s onto %s", s.profile, device)
            bundles.append(
                load_bundle(
                    s.profile,
                    device,
                    precision=s.precision,
                    channels_last=s.channels_last,
                    compile=s.compile,
                    compile_mode=s.compile_mode,
                    batch_buckets=s.batch_buckets,
                    ood_alpha=s.ood_alpha,
                    ood_detector=s.ood_detector,
                )
            )
        if bundles[0].calibration is None:
            raise BundleError(f"{s.profile}: the profile has no calibration, so no OOD threshold")
        return bundles

    async def _start(self) -> None:
        try:
            await self._start_inner()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = exc
            log.error("failed to start: %s", exc, exc_info=not isinstance(exc, BundleError))
            if self.on_fatal is not None:
                self.on_fatal(exc)

    async def _start_inner(self) -> None:
        s = self.settings
        started = time.monotonic()
        bundles = await asyncio.to_thread(self._load_bundles)
        bundle = self.bundle = bundles[0]
        calibration = bundle.calibration
        assert calibration is not None  # checked in _load_bundles
        drift = self._drift = DriftRecorder(calibration, s)
        metrics = self.metrics = Metrics(
            model=bundle.model_name,
            profile=bundle.name,
            drift_reference=drift.reference,
            expected_ood_rate=calibration.expected_ood_rate,
            max_queue_images=s.max_queue_images,
            classes=bundle.classes,
            layers=[lp.name for lp in bundle.layers],
            info={
                "version": nacguard.__version__,
                "device": s.device,
                "precision": s.precision,
                "identity": bundle.identity,
            },
        )
        store = self.store = make_store(
            s, self.profile_id, metrics, drift_bins=drift.reference.n_bins
        )
        await store.start()
        drift.attach(store.drift)
        self._runners = [Runner(DeviceCompute(b, s), name=str(b.device)) for b in bundles]
        spec = bundle.preprocess
        dummy = torch.zeros(spec.channels, *spec.size)
        for runner in self._runners:
            # The first batch a runner computes warms its bundle up on the runner's own thread.
            await runner.run([dummy])
        wait = AdaptiveWait if s.batch_wait == "adaptive" else FixedWait
        self.batcher = Batcher(
            self._runners,
            max_batch_size=s.max_batch_size,
            policy=wait(s.max_wait_ms / 1000.0),
            max_queue=s.max_queue_images,
            retry_after_s=s.retry_after_s,
            on_batch=metrics.observe_batch,
        )
        await self.batcher.start()
        gpu = None
        if s.gpu_decode and bundle.device.type == "cuda":  # JPEGs decode on the first device
            gpu = GpuJpegDecoder(bundle.device, max_pixels=s.max_image_pixels)
            await asyncio.to_thread(gpu.warmup)
        parts = (bundle, self.batcher, store, metrics, drift, self.limits, self.offloop)
        self._pipeline = Pipeline(*parts, gpu, self.tracing)
        # Everything loaded so far (torch, the model, FastAPI, pydantic: ~270k objects) lives as
        # long as the service. Frozen, the collector stops re-scanning it in every full
        # collection; unfrozen, each one stalled all threads for 0.1-0.4 s, every ~1.5 s under
        # load on 2 cores (measured with gc.callbacks): that was the p99 latency. freeze() is
        # O(1); close() unfreezes, so a process that outlives the service collects it again.
        gc.freeze()
        self._ready.set()
        log.info(
            "ready: %s (%s) on %s in %.1fs",
            bundle.name,
            bundle.model_name,
            s.device,
            time.monotonic() - started,
        )

    def begin_drain(self) -> None:
        """Refuse new requests from now on (readiness turns 503). Idempotent, synchronous."""
        if not self.draining:
            self.draining = True
            log.info(
                "draining: %d requests in progress, %d images in flight",
                self._gate.in_progress,
                self.batcher.in_flight if self.batcher else 0,
            )

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a plain bound
        """Stop taking work and answer everything accepted, within ``timeout`` seconds.

        Returns:
            True when everything accepted was answered in time.
        """
        self.begin_drain()
        deadline = time.monotonic() + timeout
        # Admitted requests still reading or decoding were accepted: let them reach the queue
        # before the batcher stops taking submits.
        clean = await wait_until(self._gate.no_admitted, deadline)
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout=max(0.0, deadline - time.monotonic()))
        clean = await wait_until(self._gate.idle, deadline) and clean
        if clean:
            log.info("drained")
        else:
            log.warning("drain timed out after %ss", timeout)
        return clean

    async def close(self) -> None:
        """Release everything (the lifespan's exit). Drains first if no drain ran."""
        self.begin_drain()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout=self.settings.drain_timeout_s)
        else:
            for runner in self._runners:
                runner.close()
        await self.flush_drift()
        if self.store is not None:
            await self.store.close()
        self.offloop.close()
        self.tracing.shutdown()
        gc.unfreeze()

    # --- requests -------------------------------------------------------------------------------

    def check_capacity(self, priority: Priority = Priority.NORMAL) -> None:
        """Raise :class:`~nacguard.errors.Overloaded` if a request of ``priority`` would be shed
        (:meth:`admit`'s bound; adapters may check it before parsing anything)."""
        self._gate.check_capacity(priority)

    def admit(self, priority: Priority = Priority.NORMAL) -> Admission:
        """Let one predict request in: ready, not draining, and under the in-progress bound
        of its ``priority`` (low-priority requests are shed first).

        Call :meth:`Admission.close` when the request is answered (or failed).

        Raises:
            ShuttingDown: draining.
            NotReady: still loading, or loading failed.
            Overloaded: ``max_queue_images`` requests are in progress already.
        """
        self.check_ready()
        return self._gate.admit(priority)

    async def predict(
        self,
        images: Sequence[RawImage],
        *,
        deadline: float,
        request_id: str,
        admission: Admission,
    ) -> PredictOutcome:
        """Answer one request: cache lookups, decode the misses, batch them, side effects.

        Args:
            images: the request's encoded images (at least one).
            deadline: ``time.monotonic()`` instant after which queued images are dropped.
            request_id: recorded with flagged images.
            admission: the request's admission; released once its images are queued.

        Returns:
            The predictions in request order; run ``after_response`` once the answer is sent.

        Raises:
            NacguardError: a bad image (before anything is queued), or what the batcher raises
                (overloaded, deadline, shutting down, inference failed).
        """
        if self._pipeline is None or not self._ready.is_set():
            raise self._not_ready()
        return await self._pipeline.predict(
            images, deadline=deadline, request_id=request_id, admission=admission
        )

    # --- monitoring -----------------------------------------------------------------------------

    async def flush_drift(self) -> None:
        """Wait until every counted score is in the drift window."""
        if self._drift is not None:
            await self._drift.flush()

    async def drift(self) -> DriftReport:
        """The drift report of the current window (also exported as gauges)."""
        if self._drift is None or self.metrics is None or not self._ready.is_set():
            raise self._not_ready()
        report = await self._drift.report()
        self.metrics.set_drift(report)
        return report

    async def render_metrics(self, accept: str | None) -> tuple[bytes, str]:
        """The Prometheus exposition (and its content type), with the scrape-time gauges
        brought up to date."""
        metrics = self.metrics
        if metrics is None:
            raise self._not_ready()
        if self.batcher is not None:
            metrics.set_queue_depth(self.batcher.queue_depth)
            metrics.set_in_flight(self.batcher.in_flight)
        if self._ready.is_set():
            await self.drift()
        return metrics.render(accept)
