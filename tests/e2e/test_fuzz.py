"""A fuzz corpus against the real ``nacguard serve`` process.

Several hundred payloads, generated here from a fixed seed: valid images in every format and
odd mode, animations, truncated, corrupted and random bytes, wrong and missing content types,
empty bodies, headers declaring 100000 x 100000 pixels, malformed multipart and JSON, bad
base64, oversized bodies (declared and chunked), bad parameters and headers, wrong paths and
methods. Every answer must be a 200 (only where the payload is a valid image request) or a 4xx
with exactly ``{"error": {"code", "message"}}``; never a 5xx. The process must stay up, its
memory must come back to its warmed-up level after repeated passes, and its logs (at debug
level) must hold no image content.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import encoded_images
from tests.fixtures.hostile import (
    MARKER,
    animated_images,
    bmp_header_only,
    encode,
    gif_header_only,
    jpeg_header_only,
    marked_png,
    odd_mode_images,
    png_header_only,
    tiff_image,
    webp_header_only,
)

pytestmark = pytest.mark.slow

MAX_BODY = 256 * 1024
MAX_IMAGES = 8
MAX_PIXELS = 1_000_000
CONCURRENCY = 8
LEAK_TOLERANCE_MB = 50.0


@dataclass
class Payload:
    """One fuzz request and what may come back.

    Attributes:
        name: what it is (for failure messages).
        expect: "ok" (a valid request: 200), "error" (must be a 4xx) or "any" (200 or 4xx;
            e.g. a corrupted file may still decode).
        images: images in a 200 answer (when known).
    """

    name: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = "error"
    method: str = "POST"
    path: str = "/predict"
    params: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    images: int = 1


def _multipart(parts: list[tuple[bytes, str]], boundary: str = "fuzzboundary") -> bytes:
    out = b""
    for i, (data, media_type) in enumerate(parts):
        out += (
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="images"; filename="{i}"\r\n'
                f"Content-Type: {media_type}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=fuzzboundary"}
JSON = {"Content-Type": "application/json"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build_corpus(seed: int = 0) -> list[Payload]:
    """The fuzz corpus (deterministic for a seed)."""
    rng = random.Random(seed)
    valid = {
        **{
            f"blobs-{fmt.lower()}": encoded_images(1, seed=600 + i, fmt=fmt)[0]
            for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
        },
        "uniform-png": encoded_images(1, kind="uniform", seed=610)[0],
        "marked-png": marked_png(),
        "large-png": encode(Image.new("RGB", (900, 700), (10, 200, 90)), "PNG"),
        **odd_mode_images(),
        **animated_images(),
    }
    media = {
        "PNG": "image/png",
        "JPEG": "image/jpeg",
        "WEBP": "image/webp",
        "GIF": "image/gif",
        "BMP": "image/bmp",
        "TIFF": "image/tiff",
    }
    corpus: list[Payload] = []

    def add(
        name: str,
        content: bytes | None,
        headers: dict[str, str],
        expect: str = "error",
        **kw: object,
    ) -> None:
        corpus.append(Payload(name, content, headers, expect, **kw))  # type: ignore[arg-type]

    # Valid images: raw (declared type and octet-stream), multipart, JSON and data URLs.
    names = sorted(valid)
    for name in names:
        data = valid[name]
        fmt = Image.open(io.BytesIO(data)).format or "PNG"
        add(f"valid raw {name}", data, {"Content-Type": media[fmt]}, "ok")
        add(f"valid octet-stream {name}", data, {"Content-Type": "application/octet-stream"}, "ok")
    for i in range(0, len(names), 3):
        group = [valid[n] for n in names[i : i + 3]]
        add(
            f"valid multipart {i}",
            _multipart([(d, "image/png") for d in group]),
            MULTIPART,
            "ok",
            images=len(group),
        )
        add(
            f"valid json {i}",
            json.dumps({"images": [_b64(d) for d in group]}).encode(),
            JSON,
            "ok",
            images=len(group),
        )
    add(
        "valid data url",
        json.dumps({"images": [f"data:image/png;base64,{_b64(valid['marked-png'])}"]}).encode(),
        JSON,
        "ok",
    )
    add(
        "valid max images",
        _multipart([(valid["blobs-png"], "image/png")] * MAX_IMAGES),
        MULTIPART,
        "ok",
        images=MAX_IMAGES,
    )
    add(
        "valid top_k=0",
        valid["blobs-png"],
        {"Content-Type": "image/png"},
        "ok",
        params={"top_k": "0"},
    )
    add(
        "valid png with charset param",
        valid["blobs-png"],
        {"Content-Type": "image/png; charset=binary"},
        "ok",
    )

    # Truncated files: anything from the magic number alone to all but the last byte.
    for name in names:
        data = valid[name]
        for cut in sorted({1, 8, len(data) // 3, len(data) // 2, len(data) - 1}):
            add(f"truncated {name}@{cut}", data[:cut], {"Content-Type": "image/png"}, "any")

    # Corrupted: random bytes overwritten, zeroed runs.
    for k in range(40):
        mutated = bytearray(valid[names[k % len(names)]])
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if k % 5 == 0:
            start = rng.randrange(len(mutated))
            mutated[start : start + 16] = bytes(16)
        add(f"corrupted {k}", bytes(mutated), {"Content-Type": "application/octet-stream"}, "any")

    # Random bytes, with and without an image magic number in front.
    magics = [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"GIF89a",
        b"RIFF\0\0\0\0WEBP",
        b"BM",
        b"II*\0",
        b"MM\0*",
    ]
    for k in range(24):
        body = magics[k % len(magics)] + rng.randbytes(rng.choice([0, 1, 17, 300, 4000]))
        add(f"random {k}", body or b"\0", {"Content-Type": "image/png"})

    # Wrong, missing and odd content types.
    for content_type in [
        "text/plain",
        "application/xml",
        "image/svg+xml",
        "image/avif",
        "image/heic",
        "video/mp4",
        "application/x-www-form-urlencoded",
        "multipart/mixed; boundary=x",
        "text/html; charset=utf-8",
        "*/*",
        "image",
        "\u00e9/\u00e9",
        ";;;",
        "application/json; charset=utf-16",
    ]:
        add(f"content type {content_type!r}", valid["blobs-png"], {"Content-Type": content_type})
    add("no content type", valid["blobs-png"], {})
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    add("svg as png", svg, {"Content-Type": "image/png"})
    add("png as json", valid["blobs-png"], JSON)
    add("json as png", b'{"images": []}', {"Content-Type": "image/png"})

    # Empty bodies under every kind of content type.
    for content_type in [
        "image/png",
        "application/octet-stream",
        "application/json",
        "multipart/form-data; boundary=fuzzboundary",
        "text/plain",
        "",
    ]:
        add(
            f"empty {content_type or 'untyped'}",
            b"",
            {"Content-Type": content_type} if content_type else {},
        )

    # Declared sizes nobody can decode, and formats outside the allowed list.
    for side in (100_000, 65_000, 20_000):
        add(f"png {side}^2 header", png_header_only(side, side), {"Content-Type": "image/png"})
    add(
        "png 100000x1 header",
        png_header_only(100_000, 1),
        {"Content-Type": "image/png"},
        "any",
    )
    add("png 1x100000000 header", png_header_only(1, 100_000_000), {"Content-Type": "image/png"})
    add("gif 65535^2 header", gif_header_only(65_535, 65_535), {"Content-Type": "image/gif"})
    add("jpeg 65500^2 header", jpeg_header_only(65_500, 65_500), {"Content-Type": "image/jpeg"})
    add("bmp 50000^2 header", bmp_header_only(50_000, 50_000), {"Content-Type": "image/bmp"})
    add("bmp negative height", bmp_header_only(50, -50), {"Content-Type": "image/bmp"}, "any")
    add("webp 16384^2 header", webp_header_only(16_384, 16_384), {"Content-Type": "image/webp"})
    add(
        "tiff 100000^2 header",
        tiff_image(100_000, 100_000, data=bytes(64)),
        {"Content-Type": "image/tiff"},
    )
    add(
        "bomb in multipart",
        _multipart(
            [(valid["blobs-png"], "image/png"), (png_header_only(100_000, 100_000), "image/png")]
        ),
        MULTIPART,
    )
    add(
        "bomb in json",
        json.dumps({"images": [_b64(png_header_only(100_000, 100_000))]}).encode(),
        JSON,
    )
    for fmt in ["PPM", "TGA", "PCX", "ICO", "SGI", "DDS"]:
        add(
            f"format {fmt}",
            encode(Image.new("L", (8, 8)), fmt),
            {"Content-Type": "application/octet-stream"},
        )
    for name, kw in {
        "float32": {"bits": 32, "sample_format": 3},
        "12-bit": {"bits": 12},
        "five samples": {"samples": 5, "photometric": 2},
        "unknown photometric": {"photometric": 99},
        "short strip": {"data": b"\x01"},
    }.items():
        add(f"tiff {name}", tiff_image(6, 5, **kw), {"Content-Type": "image/tiff"}, "any")  # type: ignore[arg-type]

    # Malformed multipart.
    png = valid["blobs-png"]
    good_part = _multipart([(png, "image/png")])
    for name, body, content_type in [
        ("no boundary param", good_part, "multipart/form-data"),
        ("empty boundary", good_part, "multipart/form-data; boundary="),
        ("wrong boundary", good_part, "multipart/form-data; boundary=other"),
        ("unterminated", good_part[:-20], MULTIPART["Content-Type"]),
        ("only closing", b"--fuzzboundary--\r\n", MULTIPART["Content-Type"]),
        ("garbage", rng.randbytes(500), MULTIPART["Content-Type"]),
        (
            "headers only",
            b"--fuzzboundary\r\nContent-Type: image/png\r\n\r\n",
            MULTIPART["Content-Type"],
        ),
        ("no crlf", good_part.replace(b"\r\n", b"\n"), MULTIPART["Content-Type"]),
        (
            "too many parts",
            _multipart([(png, "image/png")] * (MAX_IMAGES + 1)),
            MULTIPART["Content-Type"],
        ),
        (
            "svg part",
            _multipart([(png, "image/png"), (svg, "image/svg+xml")]),
            MULTIPART["Content-Type"],
        ),
        (
            "bad image part",
            _multipart([(png, "image/png"), (b"junk", "image/png")]),
            MULTIPART["Content-Type"],
        ),
        ("empty part", _multipart([(b"", "image/png")]), MULTIPART["Content-Type"]),
        (
            "huge header line",
            b"--fuzzboundary\r\nX: "
            + b"a" * 20_000
            + b"\r\n\r\n"
            + png
            + b"\r\n--fuzzboundary--\r\n",
            MULTIPART["Content-Type"],
        ),
        (
            "nested multipart",
            _multipart(
                [(_multipart([(png, "image/png")], "inner"), "multipart/mixed; boundary=inner")]
            ),
            MULTIPART["Content-Type"],
        ),
        (
            "boundary of 200 chars",
            _multipart([(png, "image/png")], "b" * 200),
            "multipart/form-data; boundary=" + "b" * 200,
        ),
    ]:
        expect = "any" if name in {"boundary of 200 chars"} else "error"
        add(f"multipart {name}", body, {"Content-Type": content_type}, expect)

    # Malformed JSON.
    b64 = _b64(png)
    for name, body in [
        ("not json", b"{images: [}"),
        ("truncated", json.dumps({"images": [b64]}).encode()[:-5]),
        ("empty object", b"{}"),
        ("null", b"null"),
        ("list", json.dumps([b64]).encode()),
        ("string", json.dumps(b64).encode()),
        ("images null", b'{"images": null}'),
        ("images empty", b'{"images": []}'),
        ("images number", b'{"images": [1, 2]}'),
        ("images object", b'{"images": {"a": 1}}'),
        ("nested lists", b'{"images": [[["x"]]]}'),
        ("deeply nested", b"[" * 5000 + b"]" * 5000),
        ("deep in images", b'{"images": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
        ("extra key", json.dumps({"images": [b64], "model": "x"}).encode()),
        ("duplicate key", ('{"images": ["' + b64 + '"], "images": 5}').encode()),
        ("huge number", b'{"images": [1' + b"0" * 5000 + b"]}"),
        ("utf-16", json.dumps({"images": [b64]}).encode("utf-16")),
        ("bom", b"\xef\xbb\xbf" + json.dumps({"images": [b64]}).encode()),
        ("invalid utf-8", b'{"images": ["\xff\xfe"]}'),
        ("nul bytes", b'{"images": ["\x00\x00"]}'),
        ("too many images", json.dumps({"images": [b64] * (MAX_IMAGES + 1)}).encode()),
    ]:
        add(f"json {name}", body, JSON)

    # Bad base64.
    for name, text in [
        ("bad chars", "!!!!"),
        ("missing padding", b64.rstrip("=")[:-1]),
        ("inner padding", b64[:8] + "=" + b64[8:]),
        (
            "urlsafe alphabet",
            base64.urlsafe_b64encode(png + b"\xfb\xff").decode().replace("+", "-"),
        ),
        ("unicode", "\u00e9\u00e8" * 10),
        ("data url junk", "data:image/png;base64,@@@"),
        ("data url wrong scheme", "data:text/plain,hello"),
        ("empty string", ""),
        ("whitespace", "   \n\t "),
        ("base64 of text", _b64(b"hello world, not an image")),
        ("base64 of nothing", _b64(b"")),
        ("base64 of bomb", _b64(png_header_only(100_000, 100_000))),
        ("base64 too large", "A" * (MAX_BODY - 100)),
    ]:
        add(f"base64 {name}", json.dumps({"images": [text]}).encode(), JSON)
    add(
        "base64 with newlines",
        json.dumps(
            {"images": ["\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))]}
        ).encode(),
        JSON,
        "ok",
    )

    # Oversized bodies: declared, streamed without a length, and by image count.
    add("oversized raw", b"\0" * (MAX_BODY + 1), {"Content-Type": "image/png"})
    add("oversized x4 raw", rng.randbytes(MAX_BODY * 4), {"Content-Type": "image/png"})
    add("oversized chunked", b"\0" * (MAX_BODY * 2), {"Content-Type": "image/png"}, chunked=True)
    add("oversized json", json.dumps({"images": ["A" * (MAX_BODY + 10)]}).encode(), JSON)
    add("oversized multipart", _multipart([(rng.randbytes(MAX_BODY), "image/png")]), MULTIPART)

    # Parameters and headers.
    for value in ["-1", "11", "abc", "1e3", "", "3.5", "9" * 40]:
        add(f"top_k {value!r}", png, {"Content-Type": "image/png"}, params={"top_k": value})
    for value in ["0", "-5", "nan", "inf", "abc", "", "1e400"]:
        add(f"timeout {value!r}", png, {"Content-Type": "image/png", "X-Timeout-Ms": value})
    for value in ["a" * 500, "x y", "\u00e9", "id\ttab", "'; drop table"]:
        add(
            f"request id {value[:12]!r}",
            png,
            {"Content-Type": "image/png", "X-Request-ID": value},
            "ok",
        )

    # Paths and methods.
    for method, path in [
        ("GET", "/predict"),
        ("PUT", "/predict"),
        ("DELETE", "/predict"),
        ("PATCH", "/healthz"),
        ("POST", "/healthz"),
        ("GET", "/nope"),
        ("POST", "/v1/predict"),
        ("GET", "/../../etc/passwd"),
        ("GET", "/%00"),
        ("GET", "/" + "a" * 4000),
        ("POST", "/metrics"),
    ]:
        add(
            f"{method} {path[:20]}",
            png if method != "GET" else None,
            {"Content-Type": "image/png"},
            method=method,
            path=path,
        )
    return corpus


# --- running it --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Outcome:
    payload: Payload
    status: int
    body: bytes
    problem: str = ""


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 16384):
        yield data[start : start + 16384]


def _headers(payload: Payload) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("utf-8")) for k, v in payload.headers.items()]


def _judge(payload: Payload, status: int, body: bytes) -> str:
    """What is wrong with this answer ("" if nothing)."""
    if status >= 500:
        return f"5xx {status}"
    if status == 200:
        if payload.expect == "error":
            return "200 for a request that must fail"
        try:
            predictions = json.loads(body)["predictions"]
        except (ValueError, KeyError):
            return "200 without predictions"
        if payload.expect == "ok" and len(predictions) != payload.images:
            return f"{len(predictions)} predictions for {payload.images} images"
        return ""
    if not 400 <= status < 500:
        return f"unexpected status {status}"
    if payload.expect == "ok":
        return f"{status} for a valid request: {body[:200]!r}"
    try:
        error = json.loads(body)
    except ValueError:
        return f"{status} without a JSON body: {body[:200]!r}"
    if not (
        isinstance(error, dict)
        and set(error) == {"error"}
        and isinstance(error["error"], dict)
        and set(error["error"]) == {"code", "message"}
        and all(isinstance(v, str) and v for v in error["error"].values())
    ):
        return f"{status} with an off-shape body: {body[:200]!r}"
    return ""


async def _send(client: httpx.AsyncClient, payload: Payload) -> Outcome:
    content = _chunks(payload.content or b"") if payload.chunked else payload.content
    try:
        r = await client.request(
            payload.method,
            payload.path,
            params=payload.params,
            headers=_headers(payload),
            content=content,
        )
    except httpx.HTTPError as exc:
        return Outcome(payload, 0, b"", f"transport error {type(exc).__name__}: {exc}")
    return Outcome(payload, r.status_code, r.content, _judge(payload, r.status_code, r.content))


async def run_corpus(url: str, corpus: list[Payload]) -> list[Outcome]:
    """Send every payload (``CONCURRENCY`` at a time) on fresh keep-alive connections."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(payload: Payload) -> Outcome:
            async with semaphore:
                return await _send(client, payload)

        return list(await asyncio.gather(*(one(p) for p in corpus)))


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    proc = start_server(
        tiny_bundle,
        log,
        max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES,
        max_image_pixels=MAX_PIXELS,
        log_level="debug",
    )
    yield proc
    proc.stop()


def test_corpus_is_large_and_varied() -> None:
    corpus = build_corpus()
    assert len(corpus) >= 200
    kinds = {p.name.split()[0] for p in corpus}
    assert {
        "valid",
        "truncated",
        "corrupted",
        "random",
        "content",
        "empty",
        "multipart",
        "json",
        "base64",
        "oversized",
    } <= kinds
    assert sum(p.expect == "ok" for p in corpus) >= 40


async def test_fuzz_corpus_gets_200_or_4xx_and_the_server_lives(
    fuzz_server: ServerProcess,
) -> None:
    corpus = build_corpus()
    pid = fuzz_server.process.pid
    started = time.monotonic()
    # Pass 1 warms up (thread pool, allocator arenas, Pillow plugins); then memory is measured
    # around three more passes of the same corpus: a leak per request would show as growth.
    first = await run_corpus(fuzz_server.url, corpus)
    baseline = rss_mb(pid)
    rounds = [first]
    for _ in range(3):
        rounds.append(await run_corpus(fuzz_server.url, corpus))
    after = rss_mb(pid)
    elapsed = time.monotonic() - started

    problems = [
        f"{o.payload.name}: {o.problem}" for outcomes in rounds for o in outcomes if o.problem
    ]
    assert not problems, "\n".join(problems[:40])
    statuses = [o.status for o in first]
    assert fuzz_server.process.poll() is None, "the server died"
    async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        (image,) = encoded_images(1, seed=699)
        r = await client.post("/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200
    assert after - baseline < LEAK_TOLERANCE_MB, (baseline, after)
    # Answers are stable: the same payload gets the same status every pass.
    for outcomes in rounds[1:]:
        assert [o.status for o in outcomes] == statuses

    by_status: dict[int, int] = {}
    for s in statuses:
        by_status[s] = by_status.get(s, 0) + 1
    print(  # reported with -s: corpus size, status mix, time and memory
        f"\nfuzz: {len(corpus)} payloads x {len(rounds)} passes in {elapsed:.1f}s; "
        f"statuses {dict(sorted(by_status.items()))}; RSS {baseline:.0f} -> {after:.0f} MiB"
    )


async def test_logs_hold_no_image_content(fuzz_server: ServerProcess) -> None:
    corpus = [p for p in build_corpus() if "marked" in p.name or "json" in p.name]
    assert corpus
    await run_corpus(fuzz_server.url, corpus)
    text = await asyncio.to_thread(fuzz_server.logs)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # every line is a JSON object
    assert MARKER not in text
    assert "iVBORw0KGgo" not in text  # base64 of a PNG signature
    assert "IHDR" not in text
