"""``nacguard serve --workers 2``: one port, two worker processes, one replica's view.

Connections are spread over the workers by the kernel (SO_REUSEPORT); ``/healthz`` says which
worker (``pid``) answered, so a test keeps one keep-alive client per worker and knows where each
request went.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from nacguard.bundle import Prediction, load_bundle
from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import encoded_images

PNG = {"Content-Type": "image/png"}
BATCH = 4  # max_batch_size: a request of 4 images fills a batch and computes at once


@pytest.fixture(scope="module")
def fleet(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two workers; lone images wait 10 s for batch-mates (so a drain has work to finish)."""
    log = tmp_path_factory.mktemp("workers") / "server.log"
    proc = start_server(
        tiny_bundle,
        log,
        workers=2,
        max_batch_size=BATCH,
        max_wait_ms=10_000,
        batch_wait="fixed",  # a lone image waits the whole window (adaptive might not)
        max_queue_images=16,
        cache_enabled=False,
        grpc_port=0,  # HTTP is what is tested here
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def expected(tiny_bundle: Path) -> tuple[list[bytes], list[Prediction]]:
    """Images (in- and out-of-distribution-looking) and their offline predictions."""
    images = encoded_images(6, seed=701) + encoded_images(2, kind="uniform", seed=702)
    bundle = load_bundle(tiny_bundle)
    want = [bundle.predict([Image.open(io.BytesIO(d))])[0] for d in images]
    assert len({round(p.nac_score, 4) for p in want}) > 1  # the comparison can fail
    return images, want


async def _per_worker(url: str, workers: int = 2) -> dict[int, httpx.AsyncClient]:
    """One single-connection client per worker, keyed by the worker's pid."""
    found: dict[int, httpx.AsyncClient] = {}
    for _ in range(200):
        client = httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        pid = (await client.get("/healthz")).json()["pid"]
        if pid in found:
            await client.aclose()
        else:
            found[pid] = client
        if len(found) == workers:
            return found
    raise AssertionError(f"200 connections reached only workers {sorted(found)}")


@pytest.fixture
async def workers(fleet: ServerProcess) -> AsyncIterator[dict[int, httpx.AsyncClient]]:
    clients = await _per_worker(fleet.url)
    yield clients
    for client in clients.values():
        await client.aclose()


async def _predict(client: httpx.AsyncClient, images: list[bytes]) -> list[dict[str, object]]:
    files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
    response = await client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]  # type: ignore[no-any-return]


def _assert_offline(got: list[dict[str, object]], want: list[Prediction]) -> None:
    assert [p["label"] for p in got] == [p.label for p in want]
    assert [p["nac_score"] for p in got] == pytest.approx([p.nac_score for p in want], abs=1e-6)
    assert [p["ood"] for p in got] == [p.ood for p in want]


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{name}\{{[^}}]*{labels}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name} {labels} not in the exposition"
    return float(match.group(1))


async def _assert_replica_totals(client: httpx.AsyncClient, predicts: int, images: int) -> None:
    text = (await client.get("/metrics")).text
    requests = _sample(text, "nacguard_http_requests_total", 'endpoint="/predict".*status="200"')
    assert requests == predicts
    assert _sample(text, "nacguard_images_scored_total") == images
    assert _sample(text, "nacguard_queue_capacity_images") == 2 * 16  # both live workers' queues
    drift = (await client.get("/v1/drift")).json()
    assert drift["scope"] == "local"
    assert drift["samples"] == images


async def test_workers_answer_offline_scores_and_share_metrics_and_drift(
    workers: dict[int, httpx.AsyncClient], expected: tuple[list[bytes], list[Prediction]]
) -> None:
    images, want = expected
    for k, (pid, client) in enumerate(workers.items()):
        got = await _predict(client, images[k * BATCH : (k + 1) * BATCH])
        _assert_offline(got, want[k * BATCH : (k + 1) * BATCH])
        assert (await client.get("/healthz")).json()["pid"] == pid  # answered by that worker
    # Each worker computed half; either one reports the replica's totals.
    for client in workers.values():
        await _assert_replica_totals(client, predicts=2, images=2 * BATCH)


async def _wait_for_log(proc: ServerProcess, pattern: str, within: float = 120.0) -> re.Match[str]:
    deadline = time.monotonic() + within
    while True:
        match = re.search(pattern, proc.logs())
        if match:
            return match
        assert proc.process.poll() is None, proc.logs()[-3000:]
        assert time.monotonic() < deadline, f"no {pattern!r} in the log"
        await asyncio.sleep(0.1)


async def test_a_killed_worker_is_replaced_and_sigterm_drains_every_worker(
    fleet: ServerProcess,
    workers: dict[int, httpx.AsyncClient],
    expected: tuple[list[bytes], list[Prediction]],
) -> None:
    images, want = expected
    (victim, on_victim), (survivor, on_survivor) = workers.items()
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(httpx.TransportError):  # only the dead worker's connections fail
        await on_victim.get("/healthz")
    _assert_offline(await _predict(on_survivor, images[:BATCH]), want[:BATCH])

    ready = r"worker \d \(pid (\d+)\) ready"
    await _wait_for_log(fleet, rf"died with status -9: starting a replacement[\s\S]*{ready}")
    replacement = int(re.findall(ready, fleet.logs())[-1])
    assert replacement not in (victim, survivor)
    fresh = await _per_worker(fleet.url)
    try:
        assert set(fresh) == {survivor, replacement}
        _assert_offline(await _predict(fresh[replacement], images[BATCH:]), want[BATCH:])
        # The dead worker's counts stay in the totals (2 earlier requests, 2 now).
        await _assert_replica_totals(fresh[survivor], predicts=4, images=4 * BATCH)

        # One lone image queued on each worker, waiting for batch-mates, when SIGTERM arrives.
        queued = [
            asyncio.create_task(client.post("/predict", content=images[k], headers=PNG))
            for k, client in enumerate(fresh.values())
        ]
        probes = await _per_worker(fleet.url)
        deadline = time.monotonic() + 30
        for probe in probes.values():
            while (await probe.get("/healthz")).json()["predict_requests_in_progress"] < 1:
                assert time.monotonic() < deadline, "the image never reached the worker"
                await asyncio.sleep(0.05)
            await probe.aclose()
        fleet.signal(signal.SIGTERM)
        for response in await asyncio.gather(*queued):
            assert response.status_code == 200, response.text
    finally:
        for client in fresh.values():
            await client.aclose()
    assert await asyncio.to_thread(fleet.wait, 60) == 0
    logs = fleet.logs()
    assert len(re.findall(r'"message": "drained", "worker": \d', logs)) == 2
    assert "supervisor exiting with status 0" in logs


async def test_sigterm_while_the_workers_start_drains_them_and_exits_0(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """A stop that comes while the workers still import torch (a rollout that changes its mind)
    is held by each worker until its server can drain, not fatal to it (status -15)."""
    proc = start_server(tiny_bundle, tmp_path / "server.log", ready_within=None, workers=2)
    try:
        # Worker 1 has just been started: it is at most importing, far from serving.
        await _wait_for_log(proc, r"started worker 1 \(pid \d+\)")
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, proc.logs()[-3000:]
    finally:
        proc.stop()
    logs = proc.logs()
    assert "supervisor exiting with status 0 (workers: [0, 0])" in logs
    assert len(re.findall(r'"message": "worker \d exiting with status 0"', logs)) == 2
