"""The shedding protocol refuses before the app: a real uvicorn server in-process, real HTTP.

Side by side with uvicorn's own httptools protocol, on the same app: both answer the same 429,
but only the stock protocol hands the refused request to the app (whose request middleware
then sheds it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from nacguard.api.shedding import Shedder, shedding_protocol
from tests.fixtures.api import PNG, ApiFactory, until
from tests.fixtures.bundles import encoded_images


@asynccontextmanager
async def _serving(app: Any, http: Any) -> AsyncIterator[str]:
    """``app`` behind a uvicorn server on a free loopback port; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=http, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.parametrize("protocol", ["shedding", "stock"])
async def test_a_refusal_is_written_before_the_app_is_called(
    make_api: ApiFactory, protocol: str
) -> None:
    first, second = encoded_images(2, seed=241)
    seen: list[str] = []

    async with make_api(max_queue_images=1, retry_after_s=2) as api:

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
            await api.app(scope, receive, send)

        http = shedding_protocol(Shedder(api.service)) if protocol == "shedding" else "httptools"
        async with _serving(counting, http) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            head = "POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            writer.write(f"{head}Content-Length: {len(first)}\r\n\r\n".encode() + first[:10])
            await until(lambda: api.service.requests_in_progress == 1)
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/predict", content=second, headers=PNG)
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "overloaded"
                assert r.headers["Retry-After"] == "2" and r.headers["X-Request-ID"]
                # The held upload reached the app; the refusal did only with the stock protocol.
                assert seen == (["/predict"] if protocol == "shedding" else ["/predict"] * 2)
                writer.write(first[10:])
                answer = await reader.readuntil(b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200 ")
                writer.close()
                await until(lambda: api.service.requests_in_progress == 0)
                assert (await client.post("/predict", content=second, headers=PNG)).is_success
