"""Overload shedding in the HTTP protocol, against the real ``nacguard serve`` process.

Raw sockets, because what is tested is the connection: a refusal written as soon as the headers
are parsed, the refused body dropped as it arrives, the connection reused afterwards, pipelined
requests answered in order. The refusal's body and headers must be those of the app's error
handler, and it must be counted and logged like any request.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import encoded_images

WAIT_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Two places: one for normal traffic (and low), the second for high priority only.
    proc = start_server(
        None,
        tmp_path_factory.mktemp("shedding") / "server.log",
        max_queue_images=2,
        normal_priority_share=0.5,
        low_priority_share=0.5,
        retry_after_s=3,
        log_level="info",
    )
    yield proc
    assert proc.stop() == 0


def _connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT_S)


def _post(path: str, body: bytes, *, sent: int | None = None, **headers: str) -> bytes:
    """A POST request's bytes, with only ``sent`` bytes of its body."""
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body[: len(body) if sent is None else sent]


class _Reader:
    """Reads whole HTTP/1.1 responses (with Content-Length) off one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.buffer += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body


def _in_progress(server: ServerProcess) -> int:
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        return int(client.get("/healthz").json()["predict_requests_in_progress"])


def _wait_in_progress(server: ServerProcess, n: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while _in_progress(server) != n:
        assert time.monotonic() < deadline, f"never {n} requests in progress"
        time.sleep(0.01)  # the server is another process: there is no event to wait on


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_full_server_refuses_at_the_protocol_and_keeps_the_connection(
    server: ServerProcess,
) -> None:
    images = encoded_images(3, seed=231)
    png = {"Content_Type": "image/png"}
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        before = client.get("/metrics").text
    held = _connect(server)
    client_socket = _connect(server)
    try:
        # One request admitted and still uploading: the place for normal traffic is taken.
        held.sendall(_post("/predict", images[0], sent=10, **png))
        _wait_in_progress(server, 1)
        reader = _Reader(client_socket)

        # An invalid query would be a 422 from the route: refused before anything looks at it.
        client_socket.sendall(_post("/predict?top_k=abc", images[1], X_Request_ID="shed-1", **png))
        status, headers, body = reader.response()
        assert status == 429
        assert json.loads(body) == {
            "error": {"code": "overloaded", "message": "too many requests in progress"}
        }
        assert headers["retry-after"] == "3" and headers["x-request-id"] == "shed-1"
        assert headers["content-type"] == "application/json" and "date" in headers

        # The v2 infer route, in the protocol's shape; the body is not even a v2 request.
        client_socket.sendall(_post("/v2/models/fashion-cnn/infer", b"not json"))
        status, headers, body = reader.response()
        assert status == 429 and json.loads(body) == {"error": "too many requests in progress"}
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])

        # The refusal comes before the body has arrived; the rest of the body, when it does
        # arrive, is dropped, and the connection's next request is read as such.
        big = bytes(range(256)) * 40
        client_socket.sendall(_post("/predict", big, sent=100, **png))
        status, _, _ = reader.response()
        assert status == 429
        client_socket.sendall(big[100:] + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["predict_requests_in_progress"] == 1

        # High priority has a place of its own: it is served.
        client_socket.sendall(_post("/predict", images[1], X_Priority="high", **png))
        status, _, body = reader.response()
        assert status == 200 and len(json.loads(body)["predictions"]) == 1

        # Pipelined behind an unanswered request, a refusal waits its turn (the app answers it).
        client_socket.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n" + _post("/predict", images[2], **png)
        )
        assert reader.response()[0] == 200
        status, _, body = reader.response()
        assert status == 429 and json.loads(body)["error"]["code"] == "overloaded"

        # The held upload completes and is answered; then there is room again.
        held.sendall(images[0][10:])
        status, _, body = _Reader(held).response()
        assert status == 200 and len(json.loads(body)["predictions"]) == 1
        _wait_in_progress(server, 0)
        client_socket.sendall(_post("/predict", images[2], **png))
        status, _, _ = reader.response()
        assert status == 200
    finally:
        held.close()
        client_socket.close()

    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        after = client.get("/metrics").text
    refused = _metric(after, "nacguard_rejections_total", reason="queue_full")
    refused -= _metric(before, "nacguard_rejections_total", reason="queue_full")
    assert refused == 4
    shed = {"endpoint": "other", "status": "429"}
    counted = _metric(after, "nacguard_http_requests_total", **shed)
    assert counted - _metric(before, "nacguard_http_requests_total", **shed) == 4
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    logged = [r for r in lines if r.get("status") == 429 and r.get("request_id") == "shed-1"]
    assert [r["path"] for r in logged] == ["/predict"]


def test_a_client_leaving_during_a_refused_upload_costs_nothing(server: ServerProcess) -> None:
    images = encoded_images(2, seed=232)
    png = {"Content_Type": "image/png"}
    held = _connect(server)
    try:
        held.sendall(_post("/predict", images[0], sent=10, **png))
        _wait_in_progress(server, 1)
        leaving = _connect(server)
        leaving.sendall(_post("/predict", bytes(5000), sent=50, **png))
        assert _Reader(leaving).response()[0] == 429
        leaving.close()  # mid-body
        assert _in_progress(server) == 1  # only the held upload
        held.sendall(images[0][10:])
        assert _Reader(held).response()[0] == 200
    finally:
        held.close()
    _wait_in_progress(server, 0)
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        r = client.post("/predict", content=images[1], headers={"Content-Type": "image/png"})
    assert r.status_code == 200
