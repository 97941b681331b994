"""Property-based tests of the HTTP API against its own OpenAPI document.

Hypothesis draws requests from what the document declares (every operation, its parameters,
every request content type of ``/predict``) and from what it does not (unknown paths, wrong
methods, undeclared content types, broken bodies and headers), and checks each answer:

* no 5xx (one exception: a 504 ``deadline_exceeded`` when the client itself asked for a
  deadline too short to compute in);
* the status is one the operation declares (404/405 for what the document does not have);
* a JSON body validates against the declared schema of that status (every error against
  ``ErrorResponse``), and declared headers such as ``Retry-After`` are present.

The app runs in-process on an event loop in a background thread (its service is bound to that
loop), once per module, with and without API keys.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from PIL import Image

from nacguard.api import create_app
from nacguard.openinference.errors import is_v2_path
from nacguard.settings import Settings
from tests.fixtures.bundles import encoded_images

T = TypeVar("T")
KEY = "schema-test-key-0123456789"


class LoopThread:
    """An event loop on a background thread; :meth:`run` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(repr=False)
class Served:
    """The app, a client for it, and its OpenAPI document."""

    loop: LoopThread
    client: httpx.AsyncClient
    spec: dict[str, Any]
    keys: bool

    def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        # Latin-1 bytes: httpx would encode str header values as ASCII.
        raw = [(k.encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
        return self.loop.run(self.client.request(method, url, headers=raw, **kw))


@pytest.fixture(scope="module", params=[False, True], ids=["open", "api-keys"])
def served(request: pytest.FixtureRequest, tiny_bundle: Path) -> Iterator[Served]:
    keys = bool(request.param)
    settings_ = Settings(
        profile=tiny_bundle,
        max_body_bytes=64 * 1024,
        max_images_per_request=4,
        max_image_pixels=256 * 256,
        api_keys=[KEY] if keys else [],
        cache_enabled=False,
    )
    app = create_app(settings_)
    loop = LoopThread()
    lifespan = app.router.lifespan_context(app)
    loop.run(lifespan.__aenter__())
    try:
        loop.run(app.state.service.wait_ready(30))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
        served = Served(loop=loop, client=client, spec={}, keys=keys)
        headers = {"X-API-Key": KEY} if keys else {}
        served.spec = served.request("GET", "/openapi.json", headers=headers).json()
        yield served
        loop.run(client.aclose())
    finally:
        loop.run(lifespan.__aexit__(None, None, None))
        loop.close()


# --- strategies ----------------------------------------------------------------------------------


def _png(size: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


VALID = [*encoded_images(3, seed=701), *encoded_images(1, seed=702, fmt="JPEG"), _png(300, 9)]

images = st.one_of(
    st.sampled_from(VALID),
    st.binary(max_size=200),
    st.builds(lambda d, n: d[:n], st.sampled_from(VALID), st.integers(0, 200)),
)
latin1 = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=40,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "mixed", "any", "broken"]))
    if kind == "valid":
        return json.dumps(
            {
                "images": [
                    base64.b64encode(d).decode()
                    for d in draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=5))
                ]
            }
        ).encode()
    if kind == "mixed":
        items = draw(
            st.lists(
                st.one_of(
                    images.map(lambda d: base64.b64encode(d).decode()),
                    images.map(lambda d: "data:image/png;base64," + base64.b64encode(d).decode()),
                    st.text(max_size=30),
                    json_values,
                ),
                max_size=5,
            )
        )
        body: dict[str, Any] = {"images": items}
        if draw(st.booleans()):
            body[draw(st.text(max_size=8))] = draw(json_values)
        return json.dumps(body).encode()
    if kind == "any":
        return json.dumps(draw(json_values)).encode()
    return draw(st.binary(max_size=100))


def _multipart(parts: list[tuple[bytes, str]], boundary: str) -> bytes:
    out = b""
    for i, (data, media_type) in enumerate(parts):
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
                f'filename="{i}"\r\nContent-Type: {media_type}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(st.text(alphabet="abcdefXYZ0123456789-", min_size=1, max_size=30))
    parts = draw(
        st.lists(
            st.tuples(images, st.sampled_from(["image/png", "image/jpeg", "text/plain", ""])),
            max_size=6,
        )
    )
    body = _multipart(parts, boundary)
    if draw(st.booleans()):  # break it somewhere
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=20))
    header_boundary = draw(st.sampled_from([boundary, "", "other"]))
    content_type = "multipart/form-data" + (
        f"; boundary={header_boundary}" if header_boundary else ""
    )
    return body, content_type


@dataclass(frozen=True)
class Call:
    """One drawn request."""

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    content: bytes | None
    timeout_ms: float | None = None


@st.composite
def predict_calls(draw: st.DrawFn, spec: dict[str, Any]) -> Call:
    declared = list(spec["paths"]["/predict"]["post"]["requestBody"]["content"])
    undeclared = st.sampled_from(["text/plain", "image/svg+xml", "application/xml", ""]) | latin1
    content_type = draw(st.sampled_from(declared) if draw(st.integers(0, 4)) else undeclared)
    if content_type == "multipart/form-data":
        content, content_type = draw(multipart_bodies())
    elif content_type == "application/json":
        content = draw(json_bodies())
    else:
        content = draw(images)
    headers = {"Content-Type": content_type} if content_type else {}
    params: dict[str, str] = {}
    # Mostly valid parameters (so most requests get as far as decoding), sometimes anything.
    if draw(st.booleans()):
        top_k = st.integers(0, 10) if draw(st.integers(0, 3)) else st.integers(-3, 1003) | latin1
        params["top_k"] = str(draw(top_k))
    timeout_ms = None
    if draw(st.booleans()):
        value = draw(
            st.floats(1.0, 30_000.0).map(str)
            if draw(st.integers(0, 3))
            else st.floats(allow_nan=True, allow_infinity=True, width=32).map(str) | latin1
        )
        headers["X-Timeout-Ms"] = value
        try:
            timeout_ms = float(value)
        except ValueError:
            timeout_ms = None
    if draw(st.booleans()):
        headers["X-Request-ID"] = draw(latin1)
    return Call("POST", "/predict", params, headers, content, timeout_ms)


@st.composite
def calls(draw: st.DrawFn, spec: dict[str, Any], keys: bool) -> Call:
    operations = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    kind = draw(st.sampled_from(["predict", "predict", "predict", "declared", "undeclared"]))
    if kind == "predict":
        call = draw(predict_calls(spec))
    elif kind == "declared":
        method, path = draw(st.sampled_from([op for op in operations if op[1] != "/predict"]))
        params = draw(st.dictionaries(st.sampled_from(["top_k", "x", "format"]), latin1))
        accept = draw(st.sampled_from(["", "application/openmetrics-text; version=1.0.0", "*/*"]))
        call = Call(method, path, params, {"Accept": accept} if accept else {}, None)
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
        path = draw(
            st.sampled_from([p for _, p in operations] + ["/", "/predict/", "/v1", "/admin"])
            | st.text(alphabet="abc/._-%", max_size=20).map(lambda s: "/" + s)
        )
        if (method.lower(), path) in {(m.lower(), p) for m, p in operations}:
            method = "DELETE"  # declared: make it a wrong method instead
        call = Call(method, path, {}, {}, draw(st.none() | st.binary(max_size=50)))
    if keys:
        key = draw(st.sampled_from(["right", "right", "bearer", "wrong", "none"]))
        if key == "right":
            call.headers["X-API-Key"] = KEY
        elif key == "bearer":
            call.headers["Authorization"] = f"Bearer {KEY}"
        elif key == "wrong":
            call.headers["X-API-Key"] = KEY[::-1]
    return call


# --- checks -----------------------------------------------------------------------------------


def _validate(spec: dict[str, Any], schema: dict[str, Any], body: Any) -> None:
    root = {**schema, "components": spec["components"]}
    Draft202012Validator(root).validate(body)


def _error_schema(path: str) -> dict[str, Any]:
    """Errors of the Open Inference Protocol's routes have its shape, all others ours."""
    name = "V2Error" if is_v2_path(path) else "ErrorResponse"
    return {"$ref": f"#/components/schemas/{name}"}


def _check(served: Served, call: Call, r: httpx.Response) -> None:
    spec = served.spec
    status = r.status_code
    short_deadline = call.timeout_ms is not None and 0 < call.timeout_ms < 1000
    assert status < 500 or (
        status == 504 and short_deadline and r.json()["error"]["code"] == "deadline_exceeded"
    ), (call, r.status_code, r.text)
    operation = spec["paths"].get(call.path, {}).get(call.method.lower())
    if operation is None:
        if status == 307:  # "/predict/" -> "/predict" (trailing slash redirect)
            assert r.headers["Location"].endswith(call.path.rstrip("/")), r.headers
            return
        assert status in {401, 404, 405}, (call, status)
        _validate(spec, _error_schema(call.path), r.json())
        return
    declared = operation["responses"]
    family = f"{str(status)[0]}XX"
    assert (
        str(status) in declared or family in declared or (status == 422 and call.path != "/predict")
    ), (call, status, sorted(declared))
    response = declared.get(str(status), declared.get(family, declared.get("422", {})))
    for name in response.get("headers", {}):
        if status != 200 or call.path == "/predict":
            assert name in r.headers, (call, status, name)
    content = response.get("content", {})
    if r.headers.get("content-type", "").startswith("application/json"):
        schema = content.get("application/json", {}).get("schema", _error_schema(call.path))
        _validate(spec, schema, r.json())
    if status >= 400:
        _validate(spec, _error_schema(call.path), r.json())
    assert r.headers["X-Request-ID"]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=st.data())
def test_api_follows_its_openapi_document(served: Served, data: st.DataObject) -> None:
    call = data.draw(calls(served.spec, served.keys))
    r = served.request(
        call.method, call.path, params=call.params, headers=call.headers, content=call.content
    )
    event(f"{call.method} {call.path if call.path in served.spec['paths'] else '?'}")
    event(f"status {r.status_code}")
    _check(served, call, r)


def test_the_strategies_reach_success_and_every_error(served: Served) -> None:
    """The drawn requests are not all rejected at the door: a fixed sample covers 200s and
    the main 4xx codes (so the property above exercises the whole pipeline)."""
    seen: set[int] = set()
    key = {"X-API-Key": KEY} if served.keys else {}
    samples = [
        Call("POST", "/predict", {}, {"Content-Type": "image/png", **key}, VALID[0]),
        Call("POST", "/predict", {}, {"Content-Type": "image/png", **key}, b"junk"),
        Call("POST", "/predict", {}, {"Content-Type": "image/png", **key}, VALID[-1]),
        Call("POST", "/predict", {}, {"Content-Type": "text/plain", **key}, VALID[0]),
        Call("POST", "/predict", {}, {"Content-Type": "application/json", **key}, b"{"),
        Call("GET", "/v1/profile", {}, dict(key), None),
    ]
    for call in samples:
        r = served.request(
            call.method, call.path, params=call.params, headers=call.headers, content=call.content
        )
        _check(served, call, r)
        seen.add(r.status_code)
    assert seen == {200, 400, 413, 415, 422}
    if served.keys:
        call = Call("GET", "/v1/profile", {}, {}, None)
        r = served.request("GET", "/v1/profile")
        _check(served, call, r)
        assert r.status_code == 401
