"""The running service: bundle, batcher, metrics and store, and the ``/predict`` pipeline.

No HTTP here beyond the domain errors: routes parse requests and call :meth:`Service.predict`;
the server calls :meth:`Service.drain` on SIGTERM. Lifecycle:

1. :meth:`Service.launch` (in the app's lifespan) starts loading in the background, so the HTTP
   server answers ``/healthz`` (and ``/readyz`` with 503) while a large model loads.
2. Loading runs off the event loop: one bundle per device, metrics, the store, one runner per
   device, warm-up batches (sizes 1, every bucket and ``max_batch_size``), then the batcher
   starts and the service is ready.
3. :meth:`Service.drain` (first SIGTERM): refuse new requests at once, let requests already
   admitted reach the queue, compute everything queued without waiting for batch-mates, and
   wait for the answers to be built. :meth:`Service.close` (lifespan exit) then releases the
   store and the runners.

Side effects happen once per *computed* image: the result is cached, a flagged image goes to
the review sink, and its score is counted in the drift window. A cache hit repeats none of them
(its computation already did); it is counted in the prediction metrics like any served image.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import nacguard
from nacguard.engine import AdaptiveWait, Batcher, FixedWait, Runner
from nacguard.errors import BundleError, InferenceFailed, NotReady, Overloaded, ShuttingDown
from nacguard.models.bundle import Bundle, Prediction, load_bundle
from nacguard.models.preprocess import PreprocessSpec
from nacguard.monitoring import DriftReport, Metrics, drift_report
from nacguard.settings import Settings
from nacguard.store import ReviewRecord, Store, make_store
from nacguard.store.local import NullCache, NullReviewSink

from .inference import BatchInfo, DeviceCompute, ImageResult
from .inputs import DecodedImage, InputLimits, RawImage, cheap_to_decode, decode_images

__all__ = ["Admission", "PredictOutcome", "Service"]

log = logging.getLogger("nacguard.service")

_CACHE_VERSION = 1


@dataclass
class PredictOutcome:
    """The answer to one ``/predict`` request, and what happened on the way.

    Attributes:
        predictions: one per image, in request order.
        batches: the distinct batches the request's computed images ran in, by start time.
        queue_s: from submit until the last of those batches started (0 without compute).
        inference_s: summed compute time of those batches.
        cache_hits: images answered from the result cache.
        after_response: side effects (cache puts, review records) to run once the response is
            sent; ``None`` when there are none.
    """

    predictions: list[Prediction]
    batches: list[BatchInfo] = field(default_factory=list)
    queue_s: float = 0.0
    inference_s: float = 0.0
    cache_hits: int = 0
    after_response: Callable[[], Coroutine[Any, Any, None]] | None = None


@dataclass(frozen=True)
class _Computed:
    """A computed image, kept until its side effects (cache, review) are done."""

    raw: RawImage
    content_type: str
    prediction: Prediction


class Admission:
    """A ``/predict`` request let in by :meth:`Service.admit`.

    While admitted and not yet queued, the request holds up the drain (it was accepted, so it
    must be answered); :meth:`queued` marks the hand-over to the batcher, :meth:`close` the end
    of the request. Both are idempotent.
    """

    def __init__(self, service: Service) -> None:
        self._service = service
        self._admitted = True
        self._open = True

    def queued(self) -> None:
        """The request's images are in the batcher (or it needs none): stop holding the drain."""
        if self._admitted:
            self._admitted = False
            self._service._release_admitted()

    def close(self) -> None:
        """The request is answered (or failed)."""
        self.queued()
        if self._open:
            self._open = False
            self._service._release_request()


async def _wait_until(event: asyncio.Event, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    if event.is_set():
        return True
    if remaining <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), remaining)
    except TimeoutError:
        return False
    return True


class Service:
    """Owns the model, batcher, metrics and store of one server process.

    Args:
        settings: the validated settings.

    Attributes:
        on_fatal: called with the exception when loading fails, so the server can exit.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = InputLimits.from_settings(settings)
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
        self._admitted = 0
        self._no_admitted = asyncio.Event()
        self._no_admitted.set()
        self._requests = 0
        self._no_requests = asyncio.Event()
        self._no_requests.set()
        self._drift_pending: np.ndarray | None = None
        self._drift_task: asyncio.Task[None] | None = None
        # Threads start on demand; the default size (cores + 4, at most 32) as for asyncio's.
        self._decode_pool = ThreadPoolExecutor(thread_name_prefix="nacguard-decode")

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
        """``/predict`` requests admitted and not yet answered."""
        return self._requests

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
        """Raise unless the service takes requests.

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
        metrics = self.metrics = Metrics(
            model=bundle.model_name,
            profile=bundle.name,
            reference_scores=calibration.scores,
            threshold=calibration.threshold,
            expected_ood_rate=calibration.expected_ood_rate,
            max_queue_images=s.max_queue_images,
            classes=bundle.classes,
            info={
                "version": nacguard.__version__,
                "device": s.device,
                "precision": s.precision,
                "identity": bundle.identity,
            },
        )
        self.store = make_store(
            s, self.profile_id, metrics, drift_bins=metrics.drift_reference.n_bins
        )
        await self.store.start()
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
                self._requests,
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
        clean = await _wait_until(self._no_admitted, deadline)
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout=max(0.0, deadline - time.monotonic()))
        clean = await _wait_until(self._no_requests, deadline) and clean
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
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    # --- admission ----------------------------------------------------------------------------

    def admit(self) -> Admission:
        """Let one ``/predict`` request in.

        Raises:
            ShuttingDown: draining.
            NotReady: still loading, or loading failed.
            Overloaded: ``max_queue_images`` requests are in progress already.
        """
        self.check_ready()
        if self._requests >= self.settings.max_queue_images:
            # Requests still being read or decoded have not reached the batcher's bounded queue;
            # without this bound a flood waits there (decode pool, event loop), unbounded and
            # never shed. Each request holds at least one image, so this keeps the queue bound's
            # promise: latency up to about max_queue_images / throughput, then 429.
            raise Overloaded(
                "too many requests in progress", retry_after=self.settings.retry_after_s
            )
        self._admitted += 1
        self._no_admitted.clear()
        self._requests += 1
        self._no_requests.clear()
        return Admission(self)

    def _release_admitted(self) -> None:
        self._admitted -= 1
        if self._admitted == 0:
            self._no_admitted.set()

    def _release_request(self) -> None:
        self._requests -= 1
        if self._requests == 0:
            self._no_requests.set()

    # --- the pipeline ---------------------------------------------------------------------------

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

        Raises:
            NacguardError: a bad image (before anything is queued), or what the batcher raises
                (overloaded, deadline, shutting down, inference failed).
        """
        bundle, batcher, store, metrics = self._parts()
        caching = not isinstance(store.cache, NullCache)
        hits: dict[int, Prediction] = {}
        if caching:
            # gather() wraps each lookup in a task; with the cache off every lookup misses, and
            # those tasks were a measurable share of a small request's event-loop time.
            cached = await asyncio.gather(*(store.cache.get(raw.sha256) for raw in images))
            hits = {
                i: p for i, v in enumerate(cached) if v and (p := self._from_cache(v)) is not None
            }
        misses = [i for i in range(len(images)) if i not in hits]
        decoded = (
            await self._decode([images[i] for i in misses], bundle.preprocess, misses)
            if misses
            else []
        )
        admission.queued()
        submitted = time.monotonic()
        try:
            results = await batcher.submit([d.tensor for d in decoded], deadline) if decoded else []
        except InferenceFailed as exc:
            # The engine's message carries the model's exception text (allocator state, shapes,
            # paths): it belongs in the log, with the request id, not in the client's answer.
            log.warning("inference failed for %d image(s): %s", len(decoded), exc.message)
            raise InferenceFailed(
                "inference failed for a batch holding this request's images; the server keeps "
                "serving, so a retry may succeed"
            ) from None

        predictions: list[Prediction | None] = [hits.get(i) for i in range(len(images))]
        for i, result in zip(misses, results, strict=True):
            predictions[i] = result.prediction
        served = [p for p in predictions if p is not None]
        metrics.observe_predictions(
            [p.label for p in served], [p.nac_score for p in served], [p.ood for p in served]
        )
        batches = sorted({r.batch for r in results}, key=lambda b: b.started)
        outcome = PredictOutcome(
            predictions=served,
            batches=batches,
            queue_s=max((max(0.0, b.started - submitted) for b in batches), default=0.0),
            inference_s=sum(b.compute_s for b in batches),
            cache_hits=len(hits),
        )
        if results:
            self._add_drift([r.prediction.nac_score for r in results])
            # Only what a side effect will use: every result when caching, flagged images when
            # they are recorded for review. Nothing to do (cache off, nothing flagged or no
            # review sink) means no background task at all.
            reviewing = not isinstance(store.review, NullReviewSink)
            computed = [
                _Computed(images[i], decoded[k].content_type, results[k].prediction)
                for k, i in enumerate(misses)
                if caching or (reviewing and results[k].prediction.ood)
            ]
            if computed:

                async def after_response() -> None:
                    await self._record(computed, request_id, store, caching=caching)

                outcome.after_response = after_response
        return outcome

    async def _decode(
        self, images: list[RawImage], preprocess: PreprocessSpec, positions: list[int]
    ) -> list[DecodedImage]:
        """Decode and preprocess ``images``: on the loop when they are small (see
        :func:`~nacguard.api.inputs.cheap_to_decode`), else in the decode pool (one hop for all).

        A plain executor rather than ``run_in_threadpool``: under load anyio's hop cost about
        50 us of CPU per call here against about 20 us, a visible share of a small request. As
        with anyio, a cancelled caller waits for a decode already running, so the request's
        admission covers the work it started.
        """
        if cheap_to_decode(images):
            return decode_images(images, preprocess, self.limits, positions)
        work = functools.partial(
            contextvars.copy_context().run,
            decode_images,
            images,
            preprocess,
            self.limits,
            positions,
        )
        job = self._decode_pool.submit(work)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if not job.cancel():  # already running: let it finish first
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(job)
            raise

    def _parts(self) -> tuple[Bundle, Batcher[torch.Tensor, ImageResult], Store, Metrics]:
        if (
            self.bundle is None
            or self.batcher is None
            or self.store is None
            or self.metrics is None
            or not self._ready.is_set()
        ):
            raise self._not_ready()
        return self.bundle, self.batcher, self.store, self.metrics

    async def _record(
        self, computed: list[_Computed], request_id: str, store: Store, *, caching: bool = True
    ) -> None:
        """Cache computed results (when ``caching``) and record flagged images for review."""
        now = time.time()
        calls = []
        for item in computed:
            raw, p = item.raw, item.prediction
            if caching:
                calls.append(store.cache.put(raw.sha256, self._to_cache(p)))
            if p.ood:
                record = ReviewRecord(
                    request_id=request_id,
                    score=p.nac_score,
                    label=p.label,
                    class_index=p.class_index,
                    threshold=p.threshold,
                    time=now,
                    image=raw.data,
                    content_type=item.content_type,
                )
                calls.append(store.review.append(record))
        await asyncio.gather(*calls)

    @staticmethod
    def _to_cache(p: Prediction) -> dict[str, Any]:
        return {
            "v": _CACHE_VERSION,
            "class_index": p.class_index,
            "confidence": p.confidence,
            "nac_score": p.nac_score,
            "msp": p.msp,
            "energy": p.energy,
            "probabilities": p.probabilities,
        }

    def _from_cache(self, value: dict[str, Any]) -> Prediction | None:
        """Rebuild a cached prediction; ``None`` (a miss) for anything unexpected."""
        bundle = self.bundle
        assert bundle is not None
        try:
            if value.get("v") != _CACHE_VERSION:
                return None
            index = int(value["class_index"])
            score = float(value["nac_score"])
            probabilities = [float(x) for x in value["probabilities"]]
            if len(probabilities) != len(bundle.classes):
                return None
            return Prediction(
                class_index=index,
                label=bundle.classes[index],
                confidence=float(value["confidence"]),
                nac_score=score,
                ood=bool(score < bundle.threshold),
                threshold=bundle.threshold,
                msp=float(value["msp"]),
                energy=float(value["energy"]),
                probabilities=probabilities,
                classes=bundle.classes,
            )
        except (KeyError, TypeError, ValueError, IndexError):
            log.warning("unreadable cache entry ignored")
            return None

    # --- drift ----------------------------------------------------------------------------------

    def _add_drift(self, scores: Sequence[float]) -> None:
        """Count computed scores into the drift window. Counts coalesce while a write to the
        store is in progress, so a busy server makes one store call per write, not per batch."""
        metrics = self.metrics
        if metrics is None:
            return
        counts = metrics.drift_reference.bin_counts(scores)
        if not counts.any():
            return
        self._drift_pending = (
            counts if self._drift_pending is None else self._drift_pending + counts
        )
        if self._drift_task is None or self._drift_task.done():
            self._drift_task = asyncio.create_task(self._write_drift(), name="nacguard-drift")

    async def _write_drift(self) -> None:
        while self._drift_pending is not None and self.store is not None:
            counts, self._drift_pending = self._drift_pending, None
            await self.store.drift.add(counts, time.time())

    async def flush_drift(self) -> None:
        """Wait until every counted score is in the drift window."""
        task = self._drift_task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def drift(self) -> DriftReport:
        """The drift report of the current window (also exported as gauges)."""
        _, _, store, metrics = self._parts()
        await self.flush_drift()
        window = await store.drift.read(time.time())
        s = self.settings
        calibration = self.bundle.calibration if self.bundle else None
        report = drift_report(
            metrics.drift_reference,
            window.counts,
            window_s=s.drift_window_s,
            min_samples=s.drift_min_samples,
            psi_threshold=s.drift_psi_threshold,
            ks_threshold=s.drift_ks_threshold,
            scope=window.scope,
            expected_ood_rate=calibration.expected_ood_rate if calibration else None,
        )
        metrics.set_drift(report)
        return report

    async def render_metrics(self, accept: str | None) -> tuple[bytes, str]:
        """The Prometheus exposition, with the scrape-time gauges brought up to date."""
        metrics = self.metrics
        if metrics is None:
            raise self._not_ready()
        if self.batcher is not None:
            metrics.set_queue_depth(self.batcher.queue_depth)
            metrics.set_in_flight(self.batcher.in_flight)
        if self._ready.is_set():
            await self.drift()
        return metrics.render(accept)
