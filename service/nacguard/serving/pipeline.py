"""One request's path through the core: cache lookups -> decode the misses -> submit to the
batcher -> side effects once the answer is sent.

Side effects happen once per *computed* image: the result is cached, a flagged image goes to
the review sink, and its score is counted in the drift window. A cache hit repeats none of them
(its computation already did); it is counted in the prediction metrics like any served image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nacguard.bundle import Bundle, Prediction
from nacguard.engine import Batcher
from nacguard.errors import InferenceFailed
from nacguard.imaging.decode import (
    DecodedImage,
    InputLimits,
    OffLoop,
    RawImage,
    decode_images,
    open_if_cheap,
)
from nacguard.imaging.gpu_decode import GpuJpegDecoder
from nacguard.monitoring import Metrics
from nacguard.monitoring.tracing import Tracing
from nacguard.serving.admission import Admission
from nacguard.serving.compute import BatchInfo, ImageResult, ShadowSink
from nacguard.serving.drift import DriftRecorder
from nacguard.store import ReviewRecord, Store
from nacguard.store.codec import decode_prediction, encode_prediction

__all__ = ["Pipeline", "PredictOutcome"]

log = logging.getLogger("nacguard.service")


@dataclass
class PredictOutcome:
    """The answer to one predict request, and what happened on the way.

    Attributes:
        predictions: one per image, in request order.
        batches: the distinct batches the request's computed images ran in, by start time.
        queue_s: from submit until the last of those batches started (0 without compute).
        inference_s: summed compute time of those batches.
        cache_hits: images answered from the result cache.
        after_response: side effects (cache puts, review records) to run once the response is
            sent; ``None`` when there are none.
        model: the model that answered (set by the service).
        version: its version.
        profile: its profile's name.
    """

    predictions: list[Prediction]
    batches: list[BatchInfo] = field(default_factory=list)
    queue_s: float = 0.0
    inference_s: float = 0.0
    cache_hits: int = 0
    after_response: Callable[[], Coroutine[Any, Any, None]] | None = None
    model: str = ""
    version: int = 0
    profile: str = ""


@dataclass(frozen=True)
class _Computed:
    """A computed image, kept until its side effects (cache, review) are done."""

    raw: RawImage
    content_type: str
    prediction: Prediction


@dataclass
class Pipeline:
    """The loaded parts one request passes through (built by the service once it is ready)."""

    bundle: Bundle
    batcher: Batcher[torch.Tensor, ImageResult]
    store: Store
    metrics: Metrics
    drift: DriftRecorder
    limits: InputLimits
    offloop: OffLoop
    gpu: GpuJpegDecoder | None = None
    tracing: Tracing = field(default_factory=Tracing)

    async def predict(
        self,
        images: Sequence[RawImage],
        *,
        deadline: float,
        request_id: str,
        admission: Admission,
    ) -> PredictOutcome:
        """See :meth:`nacguard.serving.Service.predict`."""
        bundle, batcher, store, tracing = self.bundle, self.batcher, self.store, self.tracing
        caching = store.caching
        hits: dict[int, Prediction] = {}
        if caching:
            # gather() wraps each lookup in a task; with the cache off every lookup misses, and
            # those tasks were a measurable share of a small request's event-loop time.
            with tracing.span("cache lookup", **{"nacguard.images": len(images)}):
                cached = await asyncio.gather(*(store.cache.get(raw.sha256) for raw in images))
            hits = {
                i: p
                for i, v in enumerate(cached)
                if v
                and (p := decode_prediction(v, len(bundle.classes), bundle.prediction)) is not None
            }
        misses = [i for i in range(len(images)) if i not in hits]
        decoded = []
        if misses:
            with tracing.span("decode", **{"nacguard.images": len(misses)}):
                decoded = await self._decode([images[i] for i in misses], misses)
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

        if self.metrics.multiprocess:
            # Other workers answer scrapes too: keep this one's queue gauges current.
            self.metrics.set_queue_depth(batcher.queue_depth)
            self.metrics.set_in_flight(batcher.in_flight)
        predictions: list[Prediction | None] = [hits.get(i) for i in range(len(images))]
        for i, result in zip(misses, results, strict=True):
            predictions[i] = result.prediction
        served = [p for p in predictions if p is not None]
        self.metrics.observe_predictions(
            [p.label for p in served], [p.nac_score for p in served], [p.ood for p in served]
        )
        self.metrics.observe_layer_scores([p.layer_scores for p in served])
        batches = sorted({r.batch for r in results}, key=lambda b: b.started)
        if tracing.enabled:
            for b in batches:
                tracing.record("queue wait", submitted, max(submitted, b.started))
                tracing.record("compute", b.started, b.started + b.compute_s,
                               **{"nacguard.batch.size": b.size, "nacguard.device": b.device})  # fmt: skip
        outcome = PredictOutcome(
            predictions=served,
            batches=batches,
            queue_s=max((max(0.0, b.started - submitted) for b in batches), default=0.0),
            inference_s=sum(b.compute_s for b in batches),
            cache_hits=len(hits),
        )
        if results:
            self.drift.add([r.prediction.nac_score for r in results])
            if any(r.shadow is not None for r in results):
                _observe_shadow(results)
            # Only what a side effect will use: every result when caching, flagged images when
            # they are recorded for review. Nothing to do (cache off, nothing flagged or no
            # review sink) means no background task at all.
            reviewing = store.reviewing
            computed = [
                _Computed(images[i], decoded[k].content_type, results[k].prediction)
                for k, i in enumerate(misses)
                if caching or (reviewing and results[k].prediction.ood)
            ]
            if computed:
                parent = tracing.current()

                async def after_response() -> None:
                    with tracing.span_in(parent, "store", **{"nacguard.images": len(computed)}):
                        await self._record(computed, request_id, caching=caching)

                outcome.after_response = after_response
        return outcome

    async def _decode(self, images: list[RawImage], positions: list[int]) -> list[DecodedImage]:
        """Decode and preprocess ``images``, inline or in the pool (one hop for all): the
        policy of :mod:`nacguard.imaging.decode`; JPEGs on the GPU when it decodes them, never
        from the event loop)."""
        opened = open_if_cheap(images)
        if opened is not None:  # the headers just read are decoded from, not parsed again
            return decode_images(
                images, self.bundle.preprocess, self.limits, positions, None, opened
            )
        return await self.offloop.run(
            False, decode_images, images, self.bundle.preprocess, self.limits, positions, self.gpu
        )

    async def _record(self, computed: list[_Computed], request_id: str, *, caching: bool) -> None:
        """Cache computed results (when ``caching``) and record flagged images for review."""
        store = self.store
        now = time.time()
        calls = []
        for item in computed:
            raw, p = item.raw, item.prediction
            if caching:
                calls.append(store.cache.put(raw.sha256, encode_prediction(p)))
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


def _observe_shadow(results: Sequence[ImageResult]) -> None:
    """Hand the shadow profiles' predictions of computed images to their sinks."""
    by_sink: dict[ShadowSink, list[Prediction]] = {}
    for r in results:
        if r.shadow is not None:
            by_sink.setdefault(r.shadow[0], []).append(r.shadow[1])
    for sink, predictions in by_sink.items():
        sink.observe(predictions)
