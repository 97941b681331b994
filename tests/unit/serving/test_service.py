"""The serving core on its own, without HTTP: what another protocol adapter relies on.

A real tiny bundle, a real batcher and runner; the calls an adapter makes: ``launch``,
``wait_ready``, ``admit``, ``predict``, ``drift``, ``begin_drain`` / ``drain``, ``close``.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nacguard.errors import BadImage, NotReady, Overloaded, ShuttingDown
from nacguard.imaging import RawImage
from nacguard.imaging.gpu_decode import GpuJpegDecoder
from nacguard.serving import Service
from nacguard.settings import Settings
from tests.fixtures.bundles import encoded_images


def _raw(data: bytes) -> RawImage:
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
async def service(tiny_bundle: Path) -> AsyncIterator[Service]:
    core = Service(Settings(profile=tiny_bundle, max_batch_size=4, max_queue_images=3))
    with pytest.raises(NotReady):
        core.admit()  # not launched: not ready
    core.launch()
    await core.wait_ready(30)
    try:
        yield core
        # Every answered request gave its version's lease back (a leaked one holds the close
        # for the whole drain timeout).
        assert core.served().leases == 0
    finally:
        await core.close()


async def test_predict_without_http(service: Service) -> None:
    images = [_raw(d) for d in encoded_images(3, seed=5)]
    admission = service.admit()
    try:
        outcome = await service.predict(
            images, deadline=time.monotonic() + 10, request_id="r-1", admission=admission
        )
    finally:
        admission.close()
    bundle = service.bundle
    assert bundle is not None
    assert len(outcome.predictions) == 3
    for p in outcome.predictions:
        assert p.label in bundle.classes
        assert p.ood == bundle.is_ood(p.nac_score) == (p.nac_score < bundle.threshold)
    assert sum(b.size for b in outcome.batches) == 3
    assert outcome.cache_hits == 0
    if outcome.after_response is not None:
        await outcome.after_response()
    # The same images again: answered from the result cache, flagged the same way.
    admission = service.admit()
    try:
        again = await service.predict(
            images, deadline=time.monotonic() + 10, request_id="r-2", admission=admission
        )
    finally:
        admission.close()
    assert again.cache_hits == 3 and again.batches == []
    assert [p.ood for p in again.predictions] == [p.ood for p in outcome.predictions]
    assert service.requests_in_progress == 0
    report = await service.drift()
    assert report.samples == 3  # computed images only: cache hits are not counted twice


async def test_a_bad_image_fails_its_request_before_queueing(service: Service) -> None:
    admission = service.admit()
    try:
        with pytest.raises(BadImage, match="image 1"):
            await service.predict(
                [_raw(encoded_images(1, seed=6)[0]), _raw(b"not an image")],
                deadline=time.monotonic() + 10,
                request_id="r-3",
                admission=admission,
            )
    finally:
        admission.close()
    assert service.batcher is not None and service.batcher.queue_depth == 0


async def test_admission_is_bounded_and_released(service: Service) -> None:
    first, second, third = service.admit(), service.admit(), service.admit()  # the bound: 3
    with pytest.raises(Overloaded) as refused:
        service.admit()
    assert refused.value.retry_after == service.settings.retry_after_s
    with pytest.raises(Overloaded):
        service.check_capacity()  # the bound adapters may check before parsing
    first.close()
    first.close()  # idempotent: releases once
    assert service.requests_in_progress == 2
    fourth = service.admit()
    for admission in (second, third, fourth):
        admission.close()
    assert service.requests_in_progress == 0


async def test_drain_refuses_new_work_and_reports_clean(service: Service) -> None:
    assert service.ready
    assert await service.drain(5.0)
    assert not service.ready and service.draining
    with pytest.raises(ShuttingDown):
        service.admit()
    with pytest.raises(ShuttingDown):
        service.check_ready()


async def test_gpu_decoder_takes_large_jpegs_only(service: Service) -> None:
    # The service builds a GpuJpegDecoder on CUDA only; here the same decoder runs on the CPU
    # (torchvision's libjpeg-turbo) in the pipeline's place, so the routing is what is tested.
    pipeline = service.served().pipeline  # the default model's served version
    assert pipeline is not None and pipeline.gpu is None  # CPU device: no GPU decoding
    gpu = pipeline.gpu = GpuJpegDecoder("cpu", max_pixels=service.limits.max_pixels)

    def jpeg(side: int) -> RawImage:
        pixels = np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "L").save(buf, format="JPEG", quality=95)
        return _raw(buf.getvalue())

    for image, expected in ((jpeg(300), 1), (jpeg(28), 1)):  # 300x300: pool; 28x28: inline
        admission = service.admit()
        try:
            outcome = await service.predict(
                [image], deadline=time.monotonic() + 10, request_id="g", admission=admission
            )
        finally:
            admission.close()
        if outcome.after_response is not None:  # it holds the version's lease until it ran
            await outcome.after_response()
        assert len(outcome.predictions) == 1
        assert gpu.decoded == expected and gpu.passed == 0
