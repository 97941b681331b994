"""Fault isolation: a batch whose compute raises fails only its own images, and the server
keeps serving; a device out-of-memory splits the batch and retries.

The faults come from the real model: a forward pre-hook on the served bundle's first stage
raises when the batch it sees holds a sentinel image (all white) or, for out-of-memory, when the
batch is larger than the device "fits". So the exception travels the real path: torch forward
-> DeviceCompute on the runner thread -> batcher -> service -> the one error handler.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from PIL import Image

from nacguard.bundle import load_bundle
from tests.fixtures.api import PNG, Api, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images

SECRET = "allocator-state-0xdeadbeef"  # must never reach a client


def _sentinel_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 255).save(buf, format="PNG")
    return buf.getvalue()


SENTINEL = _sentinel_png()


@contextmanager
def model_fault(
    api: Api, fails: Callable[[torch.Tensor], BaseException | None]
) -> Iterator[list[int]]:
    """Make the served model raise ``fails(x)`` (when not None) on its input batch ``x``.

    Yields the sizes of every batch the model saw meanwhile.
    """
    bundle = api.service.bundle
    assert bundle is not None
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        (x,) = args
        seen.append(int(x.shape[0]))
        exc = fails(x)
        if exc is not None:
            raise exc

    # block1 is the first stage of the tiny bundle's FashionCNN: it sees the raw input however
    # the NAC scorer drives the model.
    first = bundle.model.get_submodule("block1")
    handle = first.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _holds_sentinel(x: torch.Tensor) -> bool:
    # An all-white image is the only input whose every pixel is at the normalised maximum.
    peak = x.flatten(1).amax(dim=1, keepdim=True)
    return bool(((x.flatten(1) == peak).all(dim=1) & (peak[:, 0] > 2.0)).any())


def _inference_failed(r: httpx.Response) -> None:
    assert r.status_code == 500, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == "inference_failed"
    assert SECRET not in r.text and "Traceback" not in r.text
    assert r.headers["X-Request-ID"]


async def _rejections(api: Api, reason: str) -> float:
    text = (await api.client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("nacguard_rejections_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_failing_batch_fails_only_its_images(
    make_api: ApiFactory, tiny_bundle: Path
) -> None:
    good = encoded_images(5, seed=801)
    offline = load_bundle(tiny_bundle)
    want = [offline.predict([Image.open(io.BytesIO(d))])[0] for d in good]

    def fails(x: torch.Tensor) -> BaseException | None:
        return RuntimeError(f"sentinel seen; {SECRET}") if _holds_sentinel(x) else None

    # Batches of exactly two (a full batch runs at once; the 10 s wait never ends a batch).
    async with make_api(max_batch_size=2, max_wait_ms=10_000, cache_enabled=False) as api:
        with model_fault(api, fails) as seen:
            post = api.client.post
            # The sentinel and a good image from another request share a batch: both fail...
            bad, mate = await asyncio.gather(
                post("/predict", content=SENTINEL, headers=PNG),
                post("/predict", content=good[0], headers=PNG),
            )
            _inference_failed(bad)
            _inference_failed(mate)
            # ...and the very next batches are computed normally, by the same runner thread.
            after = await asyncio.gather(
                post("/predict", files=multipart(good[1:3])),
                post("/predict", files=multipart(good[3:5])),
            )
            # A request whose images span a failing batch and a later one fails as a whole (a
            # partial answer would silently drop an image), and its images still queued are
            # dropped without costing compute.
            split = await post("/predict", files=multipart([good[0], SENTINEL, good[1], good[2]]))
        assert seen == [2, 2, 2, 2]
        _inference_failed(split)
        got = [p for r in after for p in r.json()["predictions"]]
        assert all(r.status_code == 200 for r in after)
        assert [p["label"] for p in got] == [w.label for w in want[1:]]
        assert [round(p["nac_score"], 5) for p in got] == [round(w.nac_score, 5) for w in want[1:]]
        assert (await api.client.get("/readyz")).status_code == 200
        assert await _rejections(api, "inference_error") == 3
        # Hook removed: the sentinel is an ordinary image again.
        r = await post("/predict", files=multipart([SENTINEL, good[4]]))
        assert r.status_code == 200, r.text


async def test_any_exception_type_keeps_the_runner_alive(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=802)
    raised: list[BaseException] = [
        ValueError(SECRET),
        MemoryError(),  # "out of memory" at batch size 1: nothing left to split
        SystemExit(3),  # not an Exception: must not kill the runner thread
        KeyboardInterrupt(),
    ]
    async with make_api(cache_enabled=False) as api:
        for exc in raised:

            def fails(x: torch.Tensor, exc: BaseException = exc) -> BaseException:
                return exc

            with model_fault(api, fails):
                _inference_failed(await api.client.post("/predict", content=SENTINEL, headers=PNG))
            r = await api.client.post("/predict", content=image, headers=PNG)
            assert r.status_code == 200, (exc, r.text)


async def test_out_of_memory_splits_the_batch_and_retries(
    make_api: ApiFactory, tiny_bundle: Path
) -> None:
    images = encoded_images(4, seed=803)
    offline = load_bundle(tiny_bundle)
    want = [offline.predict([Image.open(io.BytesIO(d))])[0] for d in images]

    def fails(x: torch.Tensor) -> BaseException | None:
        if x.shape[0] > 1:  # the "device" holds one image at a time
            return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2 GiB; {SECRET}")
        return None

    async with make_api(max_batch_size=4, max_wait_ms=10_000, cache_enabled=False) as api:
        with model_fault(api, fails) as seen:
            r = await api.client.post("/predict", files=multipart(images))
        assert r.status_code == 200, r.text
        # 4 -> 2 + 2 -> 1 + 1 + 1 + 1, in order.
        assert seen == [4, 2, 1, 1, 2, 1, 1]
        assert r.headers["X-Batch-Sizes"] == "1,1,1,1"
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [w.label for w in want]
        assert [round(p["nac_score"], 5) for p in got] == [round(w.nac_score, 5) for w in want]


async def test_out_of_memory_on_one_image_is_inference_failed(make_api: ApiFactory) -> None:
    images = encoded_images(2, seed=804)

    def fails(x: torch.Tensor) -> BaseException | None:
        return torch.OutOfMemoryError(f"CUDA out of memory; {SECRET}")

    async with make_api(max_batch_size=2, max_wait_ms=10_000, cache_enabled=False) as api:
        with model_fault(api, fails) as seen:
            _inference_failed(await api.client.post("/predict", files=multipart(images)))
        # Split once; the first half fails even alone, which answers the request, so the
        # second half is not computed for nobody.
        assert seen == [2, 1]
        r = await api.client.post("/predict", files=multipart(images))
        assert r.status_code == 200, r.text
