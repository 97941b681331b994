"""The HTTP-free serving core: one :class:`Service` per server process.

Adapters (``api/`` for HTTP, and any other protocol) parse their requests and call the service;
nothing here imports a web framework. The public surface:

* lifecycle: :meth:`Service.launch` (start loading in the background), :meth:`~Service.wait_ready`,
  :meth:`~Service.drain` (first SIGTERM), :meth:`~Service.close` (lifespan exit);
* state: :attr:`~Service.ready`, :attr:`~Service.draining`, :meth:`~Service.check_ready`
  (readiness), :attr:`~Service.bundle` (the default model's served bundle: ``describe()``,
  ``classes``), :meth:`~Service.served` (any loaded model and version), :attr:`~Service.table`,
  :attr:`~Service.limits` and :attr:`~Service.offloop` (input limits and where parsing runs);
* requests: :meth:`~Service.admit` (the one admission check), then :meth:`~Service.predict`
  (cache -> decode -> batch -> side effects, :mod:`nacguard.serving.pipeline`) for a model and
  version (default: the default model's served version);
* monitoring: :meth:`~Service.drift` and :meth:`~Service.render_metrics`.

Lifecycle:

1. :meth:`Service.launch` starts loading in the background, so an adapter answers liveness (and
   readiness with 503) while a large model loads.
2. The repository (or ``profile``, a one-model repository) is scanned and the versions the
   policy wants are loaded and warmed up (:mod:`nacguard.serving.loaded`); ready once one
   serves. In poll mode new versions are then swapped in (:mod:`nacguard.serving.models`).
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

from nacguard.bundle import Bundle
from nacguard.engine import Batcher
from nacguard.errors import BundleError, NotReady, ShuttingDown
from nacguard.imaging.decode import InputLimits, OffLoop, RawImage, decode_pool_size
from nacguard.monitoring import DriftReport, Metrics
from nacguard.monitoring.exposition import RepositoryMetrics, render
from nacguard.monitoring.tracing import Tracing
from nacguard.serving.admin import RepositoryAdmin
from nacguard.serving.admission import Admission, Gate, Priority, wait_until
from nacguard.serving.compute import ImageResult
from nacguard.serving.loaded import LoadedVersion, WeightsPool, load_version
from nacguard.serving.models import ModelTable, Reconciler
from nacguard.serving.pipeline import PredictOutcome
from nacguard.serving.repository import VersionEntry, VersionPolicy, discover
from nacguard.serving.shadow import Shadow, load_shadow
from nacguard.settings import Settings
from nacguard.store import Store

__all__ = ["Service"]

log = logging.getLogger("nacguard.service")


class Service:
    """Owns the served models (batchers, metrics, stores) of one server process.

    Args: ``settings`` (validated); ``tracing``: OpenTelemetry spans (default: ``OTEL_*``).

    Attributes:
        limits: the request limits (adapters enforce the count and size ones while parsing).
        offloop: where CPU-bound input work runs (adapters parse bodies through it).
        table: the loaded models and versions; admin: load/unload/promote/rollback on it;
        on_fatal: called with the exception when loading fails, so the server can exit.
    """

    def __init__(self, settings: Settings, *, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing if tracing is not None else Tracing.from_env()
        self.limits = InputLimits.from_settings(settings)
        self.offloop = OffLoop(decode_pool_size(settings))
        self.table = ModelTable(settings.default_model)
        self.repository_metrics = RepositoryMetrics()
        self.load_error: BaseException | None = None
        self.draining = False
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._pool = WeightsPool()
        self.reconciler = Reconciler(
            self.table,
            VersionPolicy.parse(settings.version_policy),
            self._load,
            self._pool,
            self.repository_metrics,
            retire_timeout_s=settings.drain_timeout_s,
            load_shadow=lambda e: load_shadow(e, settings, self._pool, self.repository_metrics),
        )
        self.admin = RepositoryAdmin(self.table, self.reconciler, settings.repository)
        self._ready = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._gate = Gate.from_settings(settings)

    # --- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and not draining."""
        return self._ready.is_set() and not self.draining

    def _default(self) -> LoadedVersion | None:
        return self.table.served_or_none(None)

    @property
    def bundle(self) -> Bundle | None:
        """The default model's served bundle (first device; None until loaded)."""
        served = self._default()
        return served.bundle if served is not None else None

    @property
    def metrics(self) -> Metrics | None:
        """The default model's served version's metrics (None until loaded)."""
        served = self._default()
        return served.metrics if served is not None else None

    @property
    def store(self) -> Store | None:
        """The default model's served version's store (None until loaded)."""
        served = self._default()
        return served.store if served is not None else None

    @property
    def batcher(self) -> Batcher[torch.Tensor, ImageResult] | None:
        """The default model's served version's batcher (None until loaded)."""
        served = self._default()
        return served.batcher if served is not None else None

    @property
    def devices(self) -> list[str]:
        """The devices with a runner (empty until loaded)."""
        return list(self.settings.devices) if self._ready.is_set() else []

    @property
    def requests_in_progress(self) -> int:
        """Predict requests admitted and not yet answered."""
        return self._gate.in_progress

    @property
    def profile_id(self) -> str:
        """Identity of the default model's served version (cache and drift keys): bundle
        identity, plus the scoring mode and precision where they change the scores."""
        served = self._default()
        if served is None:
            raise NotReady("profile not loaded")
        return served.profile_id

    def served(self, model: str | None = None, version: int | None = None) -> LoadedVersion:
        """The loaded version a request for ``model`` / ``version`` gets (default: the default
        model's served version). Raises NotReady before loading, ModelNotFound (404)."""
        if not self._ready.is_set():
            raise self._not_ready()
        return self.table.get(model, version)

    def _not_ready(self) -> NotReady:
        retry = self.settings.retry_after_s
        if self.load_error is not None:
            return NotReady(f"the profile failed to load: {self.load_error}", retry_after=retry)
        return NotReady("loading and warming up the model", retry_after=retry)

    def check_ready(self) -> None:
        """Raise ShuttingDown (draining) or NotReady (loading, or failed) unless the service
        takes requests: the readiness check."""
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

    async def _load(self, entry: VersionEntry) -> LoadedVersion:
        default = self.table.default or self.settings.default_model
        return await load_version(
            entry,
            self.settings,
            self._pool,
            self.repository_metrics,
            limits=self.limits,
            offloop=self.offloop,
            tracing=self.tracing,
            process_metrics=default in (None, entry.model),
        )

    async def rescan(self) -> None:
        """Scan the repository once and apply what changed (what each poll does)."""
        found = await asyncio.to_thread(discover, self.settings)
        await self.reconciler.apply(found, unload_missing=self.settings.repository_mode == "poll")

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
        await self.reconciler.initial(await asyncio.to_thread(discover, s), s)
        # Everything loaded so far (torch, the model, FastAPI, pydantic: ~270k objects) lives as
        # long as the service. Frozen, the collector stops re-scanning it in every full
        # collection; unfrozen, each one stalled all threads for 0.1-0.4 s, every ~1.5 s under
        # load on 2 cores (measured with gc.callbacks): that was the p99 latency. freeze() is
        # O(1); close() unfreezes, so a process that outlives the service collects it again.
        gc.freeze()
        self._ready.set()
        log.info("ready: %s on %s in %.1fs",
                 ", ".join(f"{m} {v}" for m, v in self.table.models().items()),
                 s.device, time.monotonic() - started)  # fmt: skip
        if s.repository is not None and s.repository_mode == "poll":
            self._poll_task = asyncio.create_task(
                self.reconciler.poll(self.rescan, s.poll_interval_s), name="nacguard-poll"
            )

    def begin_drain(self) -> None:
        """Refuse new requests from now on (readiness turns 503). Idempotent, synchronous."""
        if not self.draining:
            self.draining = True
            if self._poll_task is not None:
                self._poll_task.cancel()
            log.info(
                "draining: %d requests in progress, %d images in flight",
                self._gate.in_progress,
                sum(lv.batcher.in_flight for lv in self.table.all()),
            )

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - a plain bound
        """Stop taking work and answer everything accepted, within ``timeout`` seconds.

        Returns:
            True when everything accepted was answered in time.
        """
        self.begin_drain()
        deadline = time.monotonic() + timeout
        # Admitted requests still reading or decoding were accepted: let them reach the queue
        # before the batchers stop taking submits.
        clean = await wait_until(self._gate.no_admitted, deadline)
        await self._stop_polling()
        await asyncio.gather(
            *(
                lv.batcher.stop(drain=True, timeout=max(0.0, deadline - time.monotonic()))
                for lv in self.table.all()
            )
        )
        clean = await wait_until(self._gate.idle, deadline) and clean
        if clean:
            log.info("drained")
        else:
            log.warning("drain timed out after %ss", timeout)
        return clean

    async def _stop_polling(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task

    async def close(self) -> None:
        """Release everything (the lifespan's exit). Drains first if no drain ran."""
        self.begin_drain()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        await self._stop_polling()
        await self.flush_drift()
        for model, versions in self.table.models().items():
            self.reconciler.drop_shadow(model)
            for version in versions:
                self.reconciler.retire(model, version)
        await self.reconciler.close()
        self.offloop.close()
        self.tracing.shutdown()
        gc.unfreeze()

    # --- requests -------------------------------------------------------------------------------

    def check_capacity(self, priority: Priority = Priority.NORMAL) -> None:
        """Raise :class:`~nacguard.errors.Overloaded` if a request of ``priority`` would be shed
        (:meth:`admit`'s bound; adapters may check it before parsing anything)."""
        self._gate.check_capacity(priority)

    def admit(self, priority: Priority = Priority.NORMAL) -> Admission:
        """Let one predict request in: ready, not draining, under its ``priority``'s bound.

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
        model: str | None = None,
        version: int | None = None,
    ) -> PredictOutcome:
        """Answer one request: cache lookups, decode the misses, batch them, side effects.

        The version is chosen and leased in one step, so a swap never splits a request, and the
        version keeps serving it (side effects included) after it is swapped out.

        Args:
            images: the request's encoded images (at least one).
            deadline: ``time.monotonic()`` instant after which queued images are dropped.
            request_id: recorded with flagged images.
            admission: the request's admission; released once its images are queued.
            model: the model's name (default: the default model).
            version: the version (default: the model's served version).

        Returns:
            The predictions in request order, with the model and version that computed them;
            run ``after_response`` once the answer is sent.

        Raises:
            NacguardError: no such model or version (404), a bad image (before anything is
                queued), or what the batcher raises (overloaded, deadline, shutting down, ...).
        """
        if not self._ready.is_set():
            raise self._not_ready()
        return await self.table.lease(model, version).predict(
            images, deadline=deadline, request_id=request_id, admission=admission
        )

    # --- monitoring -----------------------------------------------------------------------------

    async def flush_drift(self) -> None:
        """Wait until every counted score is in the drift windows (shadows' included)."""
        parts: list[LoadedVersion | Shadow] = [*self.table.all(), *self.table.shadows()]
        await asyncio.gather(*(p.drift.flush() for p in parts))

    async def drift(self, model: str | None = None, version: int | None = None) -> DriftReport:
        """The drift report of a version's current window (also exported as gauges); raises
        like :meth:`served`."""
        served = self.served(model, version)
        report = await served.drift.report()
        served.metrics.set_drift(report)
        return report

    async def render_metrics(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition of every loaded version and the repository (with several workers:
        the default version's, summed over the workers' files), gauges brought up to date."""
        if not self._ready.is_set() and not self.table:
            raise self._not_ready()
        parts: list[LoadedVersion | Shadow] = [*self.table.all(), *self.table.shadows()]
        for part in parts:
            await part.refresh_gauges()
        if parts and parts[0].metrics.multiprocess:
            return parts[0].metrics.render(accept)
        return render([*(p.metrics.registry for p in parts), self.repository_metrics.registry],
                      accept)  # fmt: skip
