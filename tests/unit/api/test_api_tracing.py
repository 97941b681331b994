"""OpenTelemetry spans of a /predict request, read back from the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nacguard.monitoring.tracing import NOOP, Tracing
from tests.fixtures.api import ApiFactory, multipart
from tests.fixtures.bundles import encoded_images

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


async def test_a_predict_request_is_one_trace_under_the_callers_traceparent(
    make_api: ApiFactory, exporter: InMemorySpanExporter
) -> None:
    images = encoded_images(3, seed=181)
    async with make_api(tracing=_tracing(exporter), cache_enabled=True, max_batch_size=2) as api:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        r = await api.client.post("/predict", files=multipart(images), headers=headers)
        assert r.status_code == 200, r.text
        await api.client.get("/healthz")  # the answer's background work (store) has run

    spans = _by_name(exporter.get_finished_spans())
    (root,) = spans["POST /predict"]
    assert root.context is not None and root.parent is not None
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # the caller's trace continues
    assert f"{root.parent.span_id:016x}" == PARENT_ID
    assert root.attributes is not None and root.attributes["http.response.status_code"] == 200
    for name in ("read body", "cache lookup", "decode", "queue wait", "compute", "store"):
        assert name in spans, f"no {name!r} span in {sorted(spans)}"
        for span in spans[name]:
            assert span.context is not None and span.context.trace_id == root.context.trace_id
            assert span.parent is not None and span.parent.span_id == root.context.span_id
            assert span.start_time is not None and span.end_time is not None
            assert root.start_time is not None and span.start_time >= root.start_time
    # Three images in batches of at most two: two batches, sizes adding up to three.
    sizes = [s.attributes["nacguard.batch.size"] for s in spans["compute"] if s.attributes]
    assert sorted(sizes) == [1, 2]
    assert len(spans["queue wait"]) == 2
    (decode,) = spans["decode"]
    assert decode.attributes is not None and decode.attributes["nacguard.images"] == 3


async def test_failed_requests_are_recorded_as_errors(
    make_api: ApiFactory, exporter: InMemorySpanExporter
) -> None:
    async with make_api(tracing=_tracing(exporter)) as api:
        r = await api.client.post(
            "/predict", content=b"garbage", headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 400
    (root,) = _by_name(exporter.get_finished_spans())["POST /predict"]
    assert not root.status.is_ok
    assert any(event.name == "exception" for event in root.events)


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    assert not Tracing.from_env({}).enabled
    assert not Tracing.from_env({"OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not Tracing.from_env(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}
    ).enabled
    off = Tracing()
    assert off.span("decode") is NOOP and off.server_span("x", {}) is NOOP
    on = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "t"})
    assert on.enabled
    on.shutdown()
