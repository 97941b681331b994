"""The read-only endpoints, the OpenAPI document, request metrics and the access log."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from nacguard.api.logs import JsonFormatter, RequestIdFilter, request_id_var
from tests.fixtures.api import PNG, Api, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images


async def test_healthz_and_readyz(api: Api) -> None:
    health = await api.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "status": "alive",
        "ready": True,
        "draining": False,
        "predict_requests_in_progress": 0,
        "pid": os.getpid(),
        "workers": 1,
    }
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "profile": "tiny-fashion", "model": "fashion-cnn"}


async def test_profile(api: Api) -> None:
    body = (await api.client.get("/v1/profile")).json()
    assert body["name"] == "tiny-fashion"
    assert body["identity"].startswith("tiny-fashion@")
    assert len(body["classes"]) == 10
    assert [layer["name"] for layer in body["layers"]] == ["block3", "avgpool"]
    assert body["threshold"] == pytest.approx(body["calibration"]["threshold"])
    assert body["calibration"]["samples"] == 120
    assert "score_quantiles" in body["calibration"]


async def test_drift_counts_computed_scores(make_api: ApiFactory) -> None:
    images = encoded_images(5, kind="uniform", seed=301)
    files = multipart(images)
    async with make_api(drift_min_samples=5) as api:
        empty = (await api.client.get("/v1/drift")).json()
        assert empty["samples"] == 0
        assert empty["enough_samples"] is False
        predictions = (await api.client.post("/predict", files=files)).json()["predictions"]
        # The same images again come from the cache: drift counts each computation once.
        await api.client.post("/predict", files=files)
        drift = (await api.client.get("/v1/drift")).json()
        metrics = (await api.client.get("/metrics")).text
    assert drift["scope"] == "local"
    assert drift["samples"] == 5
    assert drift["enough_samples"] is True
    assert drift["ood_rate"] == pytest.approx(sum(p["ood"] for p in predictions) / 5)
    assert re.search(r'^nacguard_drift_samples\{.*scope="local",version="1"\} 5\.0$', metrics, re.M)


async def test_metrics_exposition(api: Api) -> None:
    (image,) = encoded_images(1, seed=311)
    await api.client.post("/predict", content=image, headers=PNG)
    await api.client.get("/no/such/path")
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert re.search(
        r'^nacguard_http_requests_total\{.*endpoint="/predict",method="POST",.*status="200",version="1"\} 1\.0$',
        text,
        re.M,
    )
    # Unmatched paths share one label value, so scanners cannot blow up the series count.
    assert 'endpoint="other"' in text
    assert "/no/such/path" not in text
    assert re.search(r"^nacguard_images_scored_total\{.*\} 1\.0$", text, re.M)
    openmetrics = await api.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")


async def test_openapi_declares_bodies_and_errors(api: Api) -> None:
    assert (await api.client.get("/docs")).status_code == 200
    spec = (await api.client.get("/openapi.json")).json()
    post = spec["paths"]["/predict"]["post"]
    content = post["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/png", "image/jpeg"} <= set(content)
    assert content["application/json"]["schema"]["properties"]["images"]["type"] == "array"
    error_ref = "#/components/schemas/ErrorResponse"
    for status in ("400", "413", "415", "422", "429", "503", "504"):
        schema = post["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": error_ref}, status
    assert "Retry-After" in post["responses"]["429"]["headers"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    params = {p["name"]: p for p in post["parameters"]}
    assert {"top_k", "x-timeout-ms"} <= set(params)
    assert "X-Batch-Sizes" in post["responses"]["200"]["headers"]
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


async def test_access_log_has_request_fields_and_no_content(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    (image,) = encoded_images(1, seed=321)
    with caplog.at_level(logging.INFO, logger="nacguard.access"):
        await api.client.post("/predict", content=image, headers={**PNG, "X-Request-ID": "log-1"})
    (record,) = [r for r in caplog.records if r.name == "nacguard.access"]
    assert (record.method, record.path, record.status) == ("POST", "/predict", 200)  # type: ignore[attr-defined]
    assert record.duration_ms > 0  # type: ignore[attr-defined]
    line = JsonFormatter().format(record)
    parsed = json.loads(line)
    assert parsed["status"] == 200
    assert parsed["path"] == "/predict"
    assert "PNG" not in line


def test_json_formatter_carries_request_id() -> None:
    token = request_id_var.set("req-42")
    try:
        record = logging.LogRecord(
            "nacguard.x", logging.WARNING, __file__, 1, "hello %s", ("x",), None
        )
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "hello x"
    assert parsed["request_id"] == "req-42"
    assert parsed["level"] == "warning"
