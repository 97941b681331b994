"""Black-box tests of the real ``nacguard serve`` process over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from nacguard.bundle import load_bundle
from tests.e2e.server import ServerProcess, free_port, start_server
from tests.fixtures.bundles import TINY_BUNDLE_NAME, encoded_images

PNG = {"Content-Type": "image/png"}


def _multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]


async def _poll(client: httpx.AsyncClient, path: str, pattern: str, within: float = 10.0) -> str:
    """GET ``path`` until its body matches ``pattern`` (bounded); return the body."""
    deadline = time.monotonic() + within
    while True:
        text = (await client.get(path)).text
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, f"{path} never matched {pattern!r}:\n{text}"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny bundle behind a real server with default batching and small body limits."""
    log = tmp_path_factory.mktemp("e2e") / "server.log"
    proc = start_server(tiny_bundle, log, max_body_bytes=65536, max_images_per_request=8)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def batching_server(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Batches of 4, a fixed 10 s wait for batch-mates, a queue of 4 images."""
    log = tmp_path_factory.mktemp("e2e") / "batching.log"
    proc = start_server(
        tiny_bundle,
        log,
        max_batch_size=4,
        max_wait_ms=10_000,
        batch_wait="fixed",
        max_queue_images=4,
    )
    yield proc
    proc.stop()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        yield c


# --- the default server ------------------------------------------------------------------------


async def test_three_input_forms_give_the_offline_scores(
    client: httpx.AsyncClient, tiny_bundle: Path
) -> None:
    images = encoded_images(3, seed=501) + encoded_images(2, kind="uniform", seed=502)
    bundle = load_bundle(tiny_bundle)
    want = [bundle.predict([Image.open(io.BytesIO(d))])[0] for d in images]

    raw = await client.post("/predict", content=images[0], headers=PNG)
    assert raw.status_code == 200, raw.text
    # One image, computed alone: exactly the offline pipeline's numbers.
    assert raw.json()["predictions"][0]["nac_score"] == want[0].nac_score

    form = await client.post("/predict", files=_multipart(images), headers={"X-Request-ID": "e2e"})
    assert form.status_code == 200, form.text
    assert form.headers["X-Request-ID"] == "e2e"
    payload = {"images": [base64.b64encode(d).decode() for d in images]}
    js = await client.post("/predict", json=payload)
    assert js.status_code == 200, js.text
    for r in (form, js):
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [p.label for p in want]
        assert [p["nac_score"] for p in got] == pytest.approx([p.nac_score for p in want], abs=1e-6)
        assert [p["ood"] for p in got] == [p.ood for p in want]


async def test_errors_over_http(client: httpx.AsyncClient) -> None:
    (image,) = encoded_images(1, seed=511)

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"\0" * 4096

    cases = [
        (client.post("/predict", content=b"junk", headers=PNG), 400, "bad_image"),
        (client.post("/predict", content=b"\0" * 70_000, headers=PNG), 413, "payload_too_large"),
        (client.post("/predict", content=chunked(), headers=PNG), 413, "payload_too_large"),
        (client.post("/predict", files=_multipart([image] * 9)), 413, "payload_too_large"),
        (
            client.post("/predict", content=image, headers={"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        (client.post("/predict", json={"images": ["%%%"]}), 422, "invalid_request"),
        (client.post("/predict?top_k=99", content=image, headers=PNG), 422, "invalid_request"),
        (client.get("/nowhere"), 404, "not_found"),
    ]
    for call, status, code in cases:
        r = await call
        assert r.status_code == status, r.text
        assert r.json() == {"error": {"code": code, "message": r.json()["error"]["message"]}}
        assert r.headers["X-Request-ID"]


async def test_probes_profile_drift_metrics_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "alive"
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/v1/profile")).json()["name"] == "tiny-fashion"
    assert "samples" in (await client.get("/v1/drift")).json()
    metrics = await client.get("/metrics")
    assert "nacguard_http_requests_total" in metrics.text
    assert (await client.get("/docs")).status_code == 200


async def test_logs_are_json_lines_with_request_ids(
    client: httpx.AsyncClient, server: ServerProcess
) -> None:
    (image,) = encoded_images(1, seed=521)
    await client.post("/predict", content=image, headers={**PNG, "X-Request-ID": "log-e2e"})
    text = await asyncio.to_thread(server.logs)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines, text
    access = [e for e in lines if e.get("request_id") == "log-e2e"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/predict"
    assert "duration_ms" in access[-1]


# --- batching, deadlines, backpressure ---------------------------------------------------------


async def test_concurrent_requests_land_in_one_batch(batching_server: ServerProcess) -> None:
    images = encoded_images(4, seed=531)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as c:
        before = await c.get("/metrics")
        responses = await asyncio.gather(
            *(c.post("/predict", content=d, headers=PNG) for d in images)
        )
        after = await c.get("/metrics")
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch-Sizes"] == "4"

    def batches(text: str) -> float:
        m = re.search(r"^nacguard_batch_size_images_count\{.*\} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    assert batches(after.text) - batches(before.text) == 1


async def test_deadline_and_queue_full(batching_server: ServerProcess) -> None:
    images = encoded_images(5, seed=541)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as c:
        # Three images wait for a fourth (10 s); their 500 ms deadline passes first.
        waiting = asyncio.create_task(
            c.post("/predict", files=_multipart(images[:3]), headers={"X-Timeout-Ms": "500"})
        )
        await _poll(c, "/metrics", r"^nacguard_queue_images\{.*\} 3\.0$")
        full = await c.post("/predict", files=_multipart(images[3:5]))
        late = await waiting
    assert full.status_code == 429, full.text
    assert full.json()["error"]["code"] == "overloaded"
    assert full.headers["Retry-After"] == "1"
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "deadline_exceeded"


async def test_client_that_leaves_takes_its_images_out_of_the_queue(
    batching_server: ServerProcess,
) -> None:
    (image,) = encoded_images(1, seed=545)
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as c:
        async with httpx.AsyncClient(base_url=batching_server.url, timeout=0.5) as impatient:
            # The image would wait 10 s for batch-mates; the client gives up after 0.5 s.
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/predict", content=image, headers=PNG)
        # Dropped on disconnect, long before its 10 s wait (or any deadline) would end.
        await _poll(c, "/metrics", r"^nacguard_in_flight_images\{.*\} 0\.0$", within=5)
        text = await _poll(c, "/metrics", r"^nacguard_queue_images\{.*\} 0\.0$", within=1)
    assert re.search(
        r'^nacguard_http_requests_total\{endpoint="/predict".*status="499",version="1"\} 1\.0$',
        text,
        re.M,
    )


async def test_v2_client_that_leaves_takes_its_images_out_of_the_queue(
    batching_server: ServerProcess,
) -> None:
    (image,) = encoded_images(1, seed=546)
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES"}
    body = {"inputs": [{**tensor, "data": [base64.b64encode(image).decode()]}]}
    async with httpx.AsyncClient(base_url=batching_server.url, timeout=30) as c:
        async with httpx.AsyncClient(base_url=batching_server.url, timeout=0.5) as impatient:
            # The image would wait 10 s for batch-mates; the client gives up after 0.5 s.
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post(f"/v2/models/{TINY_BUNDLE_NAME}/infer", json=body)
        await _poll(c, "/metrics", r"^nacguard_in_flight_images\{.*\} 0\.0$", within=5)
        text = await _poll(c, "/metrics", r"^nacguard_queue_images\{.*\} 0\.0$", within=1)
    assert re.search(
        r'^nacguard_http_requests_total\{endpoint="/v2/models/\{model_name\}/infer".*'
        r'status="499",version="1"\} 1\.0$',
        text,
        re.M,
    ), [line for line in text.splitlines() if "requests_total" in line]


# --- SIGTERM -----------------------------------------------------------------------------------


def _stalled(data: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        yield data[:100]
        await release.wait()
        yield data[100:]

    return body()


async def test_sigterm_drains_accepted_requests_then_exits_0(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    images = encoded_images(5, seed=551)
    proc = start_server(tiny_bundle, tmp_path / "drain.log", max_wait_ms=10_000, batch_wait="fixed")
    try:
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            queued = [
                asyncio.create_task(c.post("/predict", content=d, headers=PNG)) for d in images[:3]
            ]
            await _poll(c, "/metrics", r"^nacguard_queue_images\{.*\} 3\.0$")
            # A fourth request is admitted but still uploading its body when SIGTERM arrives.
            stalled = asyncio.create_task(
                c.post("/predict", content=_stalled(images[3], release), headers=PNG)
            )
            await _poll(c, "/healthz", r'"predict_requests_in_progress":4')
            proc.signal(signal.SIGTERM)
            await _poll(c, "/healthz", r'"draining":true')
            ready = await c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "shutting_down"
            refused = await c.post("/predict", content=images[4], headers=PNG)
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert proc.process.poll() is None  # still waiting for the admitted upload
            release.set()
            responses = await asyncio.gather(*queued, stalled)
        for r in responses:
            assert r.status_code == 200, r.text
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert '"drained"' in proc.logs()
    finally:
        proc.stop()


async def test_second_signal_exits_at_once(tiny_bundle: Path, tmp_path: Path) -> None:
    (image,) = encoded_images(1, seed=561)
    proc = start_server(tiny_bundle, tmp_path / "force.log", drain_timeout_s=60)
    try:
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
            stalled = asyncio.create_task(
                c.post("/predict", content=_stalled(image, release), headers=PNG)
            )
            await _poll(c, "/healthz", r'"predict_requests_in_progress":1')
            proc.signal(signal.SIGTERM)
            await _poll(c, "/healthz", r'"draining":true')
            proc.signal(signal.SIGINT)
            # Without the second signal this would wait the 60 s drain timeout.
            assert await asyncio.to_thread(proc.wait, 20) == 1
            release.set()
            with pytest.raises(httpx.TransportError):
                await stalled
    finally:
        proc.stop()


def test_missing_profile_fails_fast(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nacguard.cli", "serve", "--profile", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a profile bundle" in result.stderr


def test_broken_profile_exits_1(tmp_path: Path) -> None:
    (tmp_path / "bundle.json").write_text('{"schema_version": 999}')
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "nacguard.cli", "serve", "--profile", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NACGUARD_PORT": str(port), "NACGUARD_GRPC_PORT": "0"},
    )
    # The listener was up (liveness answered while loading); the load failure stops the server.
    assert result.returncode == 1
    assert "cannot serve" in result.stderr
    assert "schema version" in result.stderr
