"""The HTTP surface's security: API keys, CORS, request ids, and what the logs may hold."""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from nacguard.api import create_app
from nacguard.api.auth import ApiKeys
from nacguard.api.logs import JsonFormatter, RequestIdFilter, configure_logging
from nacguard.settings import Settings
from tests.fixtures.api import PNG, Api, ApiFactory, multipart
from tests.fixtures.bundles import encoded_images
from tests.fixtures.hostile import MARKER, marked_png

KEY = "k-0123456789abcdef-first"
OTHER = "k-0123456789abcdef-second"
ORIGIN = "https://console.example"


def _unauthorized(r: httpx.Response) -> str:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["X-Request-ID"]
    message: str = r.json()["error"]["message"]
    return message


@pytest.fixture
async def secured(make_api: ApiFactory) -> AsyncIterator[Api]:
    async with make_api(api_keys=[KEY, OTHER]) as api:
        yield api


# --- API keys ----------------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_401(secured: Api) -> None:
    (image,) = encoded_images(1, seed=901)
    client = secured.client
    assert "missing" in _unauthorized(await client.post("/predict", content=image, headers=PNG))
    for headers in (
        {"X-API-Key": "nope"},
        {"X-API-Key": KEY[:-1]},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": ""},
        {"Authorization": f"Basic {KEY}"},  # a key, but not as a bearer token
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
    ):
        r = await client.post("/predict", content=image, headers={**PNG, **headers})
        _unauthorized(r)
    # Everything that is not exempt needs a key, unknown paths too (no probing of routes).
    _unauthorized(await client.get("/v1/profile"))
    _unauthorized(await client.get("/v1/drift"))
    _unauthorized(await client.get("/no/such/path"))
    metrics = (await client.get("/metrics")).text
    assert 'reason="unauthorized"' in metrics


async def test_right_key_in_either_header_is_200(secured: Api) -> None:
    (image,) = encoded_images(1, seed=902)
    client = secured.client
    for headers in (
        {"X-API-Key": KEY},
        {"X-API-Key": OTHER},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {OTHER}"},  # the scheme is case-insensitive
    ):
        r = await client.post("/predict", content=image, headers={**PNG, **headers})
        assert r.status_code == 200, r.text
    r = await client.get("/v1/profile", headers={"X-API-Key": KEY})
    assert r.status_code == 200


async def test_exempt_endpoints_are_open(secured: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await secured.client.get(path)).status_code == 200, path


async def test_exempt_paths_are_configurable(make_api: ApiFactory) -> None:
    async with make_api(api_keys=[KEY], auth_exempt_paths=["/healthz"]) as api:
        assert (await api.client.get("/healthz")).status_code == 200
        _unauthorized(await api.client.get("/metrics"))
        r = await api.client.get("/metrics", headers={"X-API-Key": KEY})
        assert r.status_code == 200


async def test_refused_before_the_body_is_read(make_api: ApiFactory) -> None:
    async with make_api(api_keys=[KEY], max_body_bytes=4096) as api:
        # Over the body limit, yet the answer is 401: nothing was read or decoded.
        r = await api.client.post("/predict", content=b"\0" * 10_000, headers=PNG)
        _unauthorized(r)


async def test_keys_from_a_file(make_api: ApiFactory, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2024-01\n\n  {KEY}  \n{OTHER}\n")
    (image,) = encoded_images(1, seed=903)
    async with make_api(api_keys_file=path) as api:
        _unauthorized(await api.client.post("/predict", content=image, headers=PNG))
        _unauthorized(
            await api.client.post(
                "/predict", content=image, headers={**PNG, "X-API-Key": "# rotated 2024-01"}
            )
        )
        for key in (KEY, OTHER):
            r = await api.client.post("/predict", content=image, headers={**PNG, "X-API-Key": key})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_an_unusable_keys_file_refuses_to_start(
    tiny_bundle: Path, tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="api_keys_file"):
        create_app(Settings(profile=tiny_bundle, api_keys_file=path))


async def test_auth_is_off_without_keys(api: Api) -> None:
    (image,) = encoded_images(1, seed=904)
    r = await api.client.post("/predict", content=image, headers=PNG)
    assert r.status_code == 200, r.text
    spec = (await api.client.get("/openapi.json")).json()
    assert "securitySchemes" not in spec.get("components", {})
    assert "401" not in spec["paths"]["/predict"]["post"]["responses"]


async def test_openapi_declares_the_key_schemes(secured: Api) -> None:
    spec = (await secured.client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerKey"]["scheme"] == "bearer"
    predict = spec["paths"]["/predict"]["post"]
    assert "WWW-Authenticate" in predict["responses"]["401"]["headers"]
    assert {"ApiKeyHeader": []} in predict["security"]
    health = spec["paths"]["/healthz"]["get"]
    assert "security" not in health and "401" not in health["responses"]
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys([f"key-number-{i:02d}-padding" for i in range(5)])
    calls = 0
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        nonlocal calls
        calls += 1
        assert len(a) == len(b) == 32  # digests: the key's length cannot show
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert keys.accepts(b"key-number-00-padding")
    assert calls == 5  # no early exit at the first key
    calls = 0
    assert not keys.accepts(b"x")
    assert calls == 5


async def test_keys_never_reach_the_logs(secured: Api, caplog: pytest.LogCaptureFixture) -> None:
    (image,) = encoded_images(1, seed=905)
    with caplog.at_level(logging.DEBUG):
        await secured.client.post("/predict", content=image, headers={**PNG, "X-API-Key": KEY})
        await secured.client.post("/predict", content=image, headers={**PNG, "X-API-Key": "bad"})
        await secured.client.get("/metrics", headers={"Authorization": f"Bearer {OTHER}"})
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert caplog.records
    assert KEY not in text and OTHER not in text


# --- CORS --------------------------------------------------------------------------------------


def _preflight(method: str = "POST", headers: str = "content-type,x-api-key") -> dict[str, str]:
    return {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_cors_is_off_by_default(api: Api) -> None:
    (image,) = encoded_images(1, seed=911)
    r = await api.client.post("/predict", content=image, headers={**PNG, "Origin": ORIGIN})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    preflight = await api.client.options("/predict", headers=_preflight())
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_for_configured_origins(make_api: ApiFactory) -> None:
    (image,) = encoded_images(1, seed=912)
    async with make_api(cors_origins=[ORIGIN], api_keys=[KEY]) as api:
        # The preflight carries no key and needs none.
        preflight = await api.client.options("/predict", headers=_preflight())
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        r = await api.client.post(
            "/predict", content=image, headers={**PNG, "Origin": ORIGIN, "X-API-Key": KEY}
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # A browser can read the 401 too.
        r = await api.client.post("/predict", content=image, headers={**PNG, "Origin": ORIGIN})
        _unauthorized(r)
        assert r.headers["access-control-allow-origin"] == ORIGIN
        # Other origins get no grant.
        other = await api.client.options(
            "/predict", headers={**_preflight(), "Origin": "https://evil.example"}
        )
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        r = await api.client.get(
            "/healthz", headers={"Origin": "https://evil.example", "X-API-Key": KEY}
        )
        assert "access-control-allow-origin" not in r.headers


# --- request ids -------------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(api: Api) -> None:
    r = await api.client.get("/healthz", headers={"X-Request-ID": "abc-123.x_y:z"})
    assert r.headers["X-Request-ID"] == "abc-123.x_y:z"
    generated = {(await api.client.get("/healthz")).headers["X-Request-ID"] for _ in range(3)}
    assert len(generated) == 3
    assert all(len(g) == 32 and g.isalnum() for g in generated)


@pytest.mark.parametrize(
    "given",
    [
        "a" * 129,  # too long
        'x" level="error',  # quote and space: would forge fields in a text log
        "line\tbreak",
        "\x1b[31mred",  # terminal escape
        "caf\xe9",  # non-ASCII (latin-1 on the wire)
        "",
    ],
    ids=["long", "quote", "tab", "escape", "latin1", "empty"],
)
async def test_unsafe_request_ids_are_replaced(
    api: Api, given: str, caplog: pytest.LogCaptureFixture
) -> None:
    headers = [(b"x-request-id", given.encode("latin-1"))]
    caplog.handler.addFilter(RequestIdFilter())  # as the server's handler stamps records
    with caplog.at_level(logging.DEBUG, logger="nacguard.access"):
        r = await api.client.get("/healthz", headers=headers)
    assert r.status_code == 200
    echoed = r.headers["X-Request-ID"]
    assert echoed != given and len(echoed) == 32 and echoed.isalnum()
    (record,) = [x for x in caplog.records if x.name == "nacguard.access"]
    assert record.request_id == echoed  # type: ignore[attr-defined]


# --- logs --------------------------------------------------------------------------------------


async def test_logs_hold_no_image_content(
    make_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    good = marked_png(value=77)
    b64 = base64.b64encode(good).decode()
    corrupt = good[:60] + b"\xff" * 40 + good[100:]
    async with make_api(max_image_pixels=10_000, log_level="debug") as api:
        calls = [
            dict(content=good, headers=PNG),
            dict(files=multipart([good, good])),
            dict(json={"images": [b64]}),
            dict(json={"images": [f"data:image/png;base64,{b64}"]}),
            dict(content=corrupt, headers=PNG),  # 400
            dict(json={"images": [b64[:-3] + "!!!"]}),  # 422 bad base64
            dict(content=b'{"images": ["' + b64.encode() + b'", 5]}', headers={}),  # 415
            dict(
                content=b'{"images": ["' + b64.encode(),
                headers={"Content-Type": "application/json"},
            ),
            dict(content=good, headers={"Content-Type": "image/svg+xml"}),  # 415
        ]
        caplog.set_level(logging.INFO, logger="PIL")  # as configure_logging does (tested below)
        with caplog.at_level(logging.DEBUG):
            statuses = [(await api.client.post("/predict", **c)).status_code for c in calls]  # type: ignore[arg-type]
    assert statuses == [200, 200, 200, 200, 400, 422, 415, 422, 415]
    assert caplog.records
    lines = []
    formatter = JsonFormatter()
    for record in caplog.records:
        line = formatter.format(record)
        json.loads(line)
        lines.append(line)
    text = "\n".join(lines)
    assert MARKER not in text
    # Neither base64 of an image (any PNG starts "iVBORw0KGgo") nor its raw header.
    assert "iVBORw0KGgo" not in text
    assert b64[100:140] not in text
    assert "IHDR" not in text and "\\u0089PNG" not in text


def test_configured_logging_keeps_pillow_quiet() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("PIL").level)
    try:
        configure_logging(Settings(log_level="debug"))
        assert root.level == logging.DEBUG
        assert not logging.getLogger("PIL").isEnabledFor(logging.DEBUG)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("PIL").setLevel(saved[2])
