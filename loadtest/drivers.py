"""Load drivers for the benchmark: a lean HTTP/1.1 client, closed loop and open loop.

**Why not httpx here.** On a small machine the load generator shares the cores with the server.
httpx's async client spends about 2.8 ms of CPU per request (measured on the 2-core benchmark
machine, as much as the server itself spends answering it), so it would hand the server only
half the machine and the numbers would describe the client. :class:`HttpConnection` speaks just
the HTTP/1.1 that ``/predict`` needs (keep-alive, ``Content-Length`` or chunked responses) on
asyncio streams and costs a small fraction of that.

Two ways to drive a server:

* :func:`closed_loop` — a fixed number of clients, each sending its next request as soon as the
  previous one is answered. Finds the saturation throughput; latency includes queueing behind
  the other clients' requests.
* :func:`open_loop` — requests sent at a fixed arrival rate whatever the server does (like
  independent users). Latency is measured from each request's *scheduled* send time, so a
  stalled generator cannot hide queueing (no coordinated omission). Overload shows as growing
  latency and, if the server sheds load, as 429/503 answers: status codes are counted.

Both return a :class:`RunResult` with throughput, latency percentiles, status counts and the
achieved batch sizes (from the server's ``nacguard_batch_size_images`` histogram, read from
``/metrics`` before and after the measured window, and from the ``X-Batch-Sizes`` header).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import numpy as np
from loadtest.workload import Payload

__all__ = [
    "HttpConnection",
    "HttpError",
    "Reply",
    "RunResult",
    "closed_loop",
    "interleaved_rounds",
    "merge_runs",
    "metric_totals",
    "open_loop",
    "process_cpu_seconds",
    "process_tree",
    "scrape_batch_histogram",
]


log = logging.getLogger("nacguard.bench.drivers")

#: A connection idle for longer is replaced rather than reused: servers close idle keep-alive
#: connections (uvicorn after 5 s), and a request written into one that is being closed fails.
_MAX_IDLE_S = 3.0


class HttpError(Exception):
    """A malformed or truncated response, or a closed connection."""


@dataclass(frozen=True)
class Reply:
    """One HTTP response.

    Attributes:
        status: the status code.
        headers: header names lower-cased (the last value wins for repeated names).
        body: the (de-chunked) body.
    """

    status: int
    headers: dict[str, str]
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` (no TLS, no proxies).

    Reconnects on the next request after the server closed the connection or an error.

    Args:
        host: server host.
        port: server port.
        timeout: seconds a request may take before :class:`TimeoutError`.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request does).

        Raises:
            OSError: the connection could not be made.
            TimeoutError: not within ``timeout``.
        """
        self.close()
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout
        )
        self._last_used = time.monotonic()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        """Send one request and read its response.

        Raises:
            HttpError: the connection broke or the response is malformed.
            TimeoutError: no complete response within ``timeout``.
            OSError: the connection could not be made.
        """
        try:
            return await asyncio.wait_for(self._exchange(method, path, body, headers), self.timeout)
        except (TimeoutError, HttpError, OSError, asyncio.IncompleteReadError) as exc:
            self.close()
            if isinstance(exc, asyncio.IncompleteReadError):
                raise HttpError("connection closed mid-response") from exc
            raise

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> Reply:
        now = time.monotonic()
        if (
            self._writer is None
            or self._writer.is_closing()
            or self._reader is None
            or self._reader.at_eof()  # the server closed it while idle
            or now - self._last_used > _MAX_IDLE_S
        ):
            self.close()
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._last_used = now
        reader, writer = self._reader, self._writer
        assert reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"bad status line {status_line!r}")
        reply_headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(f"bad header line {line!r}")
            reply_headers[name.strip().lower()] = value.strip()
        if "content-length" in reply_headers:
            data = await reader.readexactly(int(reply_headers["content-length"]))
        elif "chunked" in reply_headers.get("transfer-encoding", "").lower():
            data = await self._read_chunked(reader)
        else:
            data = await reader.read()  # body delimited by the connection's end
            reply_headers["connection"] = "close"
        if reply_headers.get("connection", "").lower() == "close":
            self.close()
        self._last_used = time.monotonic()
        return Reply(status=int(parts[1]), headers=reply_headers, body=data)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        """Close the socket (a later request reconnects)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host:port URLs are supported, not {url!r}")
    return parts.hostname, parts.port or 80


async def scrape_batch_histogram(url: str) -> tuple[float, float]:
    """``(sum, count)`` of ``nacguard_batch_size_images`` over all its label sets.

    Returns ``(nan, nan)`` when ``/metrics`` cannot be read.
    """
    host, port = _host_port(url)
    conn = HttpConnection(host, port, timeout=10.0)
    try:
        reply = await conn.request("GET", "/metrics")
    except (HttpError, OSError, TimeoutError):
        return math.nan, math.nan
    finally:
        conn.close()
    if reply.status != 200:
        return math.nan, math.nan
    names = ("nacguard_batch_size_images_sum", "nacguard_batch_size_images_count")
    totals = metric_totals(reply.body.decode("utf-8", "replace"), names)
    return totals[names[0]], totals[names[1]]


def metric_totals(text: str, names: Sequence[str]) -> dict[str, float]:
    """Each of ``names`` summed over all its label sets in a Prometheus text exposition
    (0 for a name that is not there)."""
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a supervisor and its workers), parents first."""
    return [pid, *(p for child in _children(pid) for p in process_tree(child))]


def _own_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants (a supervisor's
    workers; Linux ``/proc``; NaN elsewhere)."""
    root, *descendants = process_tree(pid)
    own = _own_cpu_seconds(root)
    if math.isnan(own):
        return math.nan
    return own + sum(c for c in map(_own_cpu_seconds, descendants) if not math.isnan(c))


@dataclass
class RunResult:
    """One measured load run (or several merged) against one server configuration.

    The fields are raw totals, so runs merge exactly (:func:`merge_runs`); rates, percentiles
    and means are properties, and :meth:`to_dict` writes both.

    Attributes:
        label: which configuration.
        mode: ``closed`` or ``open``.
        concurrency: closed loop: clients; open loop: connections of the generator's pool.
        target_rps: open loop: the arrival rate asked for (0 for closed loop).
        duration_s: measured seconds.
        sent: requests sent in the measured window.
        ok: of those, answered 200.
        images_ok: images in the 200 answers.
        cache_hits: of those, images answered from the result cache (``X-Cache-Hits``).
        status_codes: answers by status code (as strings, for JSON); transport errors under
            ``"transport"``, requests the generator could not send (all connections busy)
            under ``"not_sent"``, requests given up on while in flight under ``"unanswered"``.
        batch_sum: images computed in the window (``nacguard_batch_size_images`` sum delta).
        batch_count: batches computed in the window (its count delta).
        header_batch_sum: sum of the ``X-Batch-Sizes`` values of the 200 answers.
        header_batch_count: number of those values.
        server_cpu_s: server process CPU seconds in the window.
        client_cpu_s: load generator CPU seconds in the window.
        rejected_p99_ms: 99th-percentile latency of the 429/503 answers (shedding should be
            fast).
        send_lag_p99_ms: open loop: 99th percentile of how late requests left the generator
            after their scheduled time (large = the generator, not the server, was the limit).
        latencies_ms: latency of every 200 answer.
    """

    label: str
    mode: str
    concurrency: int
    target_rps: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    images_ok: int = 0
    cache_hits: int = 0
    status_codes: dict[str, int] = field(default_factory=dict)
    batch_sum: float = 0.0
    batch_count: float = 0.0
    header_batch_sum: int = 0
    header_batch_count: int = 0
    server_cpu_s: float = math.nan
    client_cpu_s: float = math.nan
    rejected_p99_ms: float = math.nan
    send_lag_p99_ms: float = math.nan
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput_rps(self) -> float:
        """Requests answered 200 per second."""
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def images_per_s(self) -> float:
        """Images answered 200 per second."""
        return self.images_ok / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile of the 200 answers' latency (NaN without answers)."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else math.nan

    @property
    def p50_ms(self) -> float:
        """Median latency."""
        return self.percentile_ms(50)

    @property
    def p95_ms(self) -> float:
        """95th-percentile latency."""
        return self.percentile_ms(95)

    @property
    def p99_ms(self) -> float:
        """99th-percentile latency."""
        return self.percentile_ms(99)

    @property
    def mean_batch(self) -> float:
        """Mean computed batch size (from the server's histogram)."""
        return self.batch_sum / self.batch_count if self.batch_count > 0 else math.nan

    @property
    def mean_batch_header(self) -> float:
        """Mean batch size as the answers saw it (a batch shared by k requests counts k times,
        so this leans towards large batches)."""
        if not self.header_batch_count:
            return math.nan
        return self.header_batch_sum / self.header_batch_count

    @property
    def errors(self) -> int:
        """Requests sent but not answered 200 (rejections, timeouts, transport errors)."""
        return self.sent - self.ok

    @property
    def error_rate(self) -> float:
        """``errors / sent`` (0 when nothing was sent)."""
        return self.errors / self.sent if self.sent else 0.0

    @property
    def rejections(self) -> int:
        """Explicit load shedding: 429 and 503 answers."""
        return self.status_codes.get("429", 0) + self.status_codes.get("503", 0)

    @property
    def cache_hit_rate(self) -> float:
        """Share of answered images that came from the result cache."""
        return self.cache_hits / self.images_ok if self.images_ok else 0.0

    @property
    def server_cpu_ms_per_request(self) -> float:
        """Server CPU milliseconds per 200 answer."""
        return 1000.0 * self.server_cpu_s / self.ok if self.ok else math.nan

    @property
    def client_cpu_ms_per_request(self) -> float:
        """Load generator CPU milliseconds per 200 answer."""
        return 1000.0 * self.client_cpu_s / self.ok if self.ok else math.nan

    def to_dict(self, *, latencies: bool = False) -> dict[str, object]:
        """JSON-able form: the totals plus every derived figure (raw latencies only if asked)."""
        out = asdict(self)
        if not latencies:
            out.pop("latencies_ms")
        for name in _DERIVED:
            out[name] = getattr(self, name)
        return out


_DERIVED = (
    "throughput_rps",
    "images_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "mean_batch",
    "mean_batch_header",
    "errors",
    "error_rate",
    "rejections",
    "cache_hit_rate",
    "server_cpu_ms_per_request",
    "client_cpu_ms_per_request",
)


def merge_runs(runs: Sequence[RunResult], label: str | None = None) -> RunResult:
    """Pool several runs of one configuration (e.g. interleaved rounds) into one result.

    Raises:
        ValueError: no runs.
    """
    if not runs:
        raise ValueError("nothing to merge")
    codes: Counter[str] = Counter()
    for run in runs:
        codes.update(run.status_codes)
    first = runs[0]
    return RunResult(
        label=first.label if label is None else label,
        mode=first.mode,
        concurrency=max(r.concurrency for r in runs),
        target_rps=first.target_rps,
        duration_s=sum(r.duration_s for r in runs),
        sent=sum(r.sent for r in runs),
        ok=sum(r.ok for r in runs),
        images_ok=sum(r.images_ok for r in runs),
        cache_hits=sum(r.cache_hits for r in runs),
        status_codes=dict(sorted(codes.items())),
        batch_sum=sum(r.batch_sum for r in runs),
        batch_count=sum(r.batch_count for r in runs),
        header_batch_sum=sum(r.header_batch_sum for r in runs),
        header_batch_count=sum(r.header_batch_count for r in runs),
        server_cpu_s=sum(r.server_cpu_s for r in runs),
        client_cpu_s=sum(r.client_cpu_s for r in runs),
        rejected_p99_ms=max((r.rejected_p99_ms for r in runs), default=math.nan),
        send_lag_p99_ms=max((r.send_lag_p99_ms for r in runs), default=math.nan),
        latencies_ms=[v for r in runs for v in r.latencies_ms],
    )


@dataclass
class _Recorder:
    """Collects the outcomes of requests sent inside the measured window."""

    measure_from: float
    stop_at: float
    latencies: list[float] = field(default_factory=list)
    rejected_latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    ok: int = 0
    images_ok: int = 0
    cache_hits: int = 0
    header_batch_sum: int = 0
    header_batch_count: int = 0

    def counts(self, scheduled: float) -> bool:
        return self.measure_from <= scheduled < self.stop_at

    def begin(self, scheduled: float) -> None:
        if self.counts(scheduled):
            self.sent += 1

    def record(self, scheduled: float, done: float, reply: Reply | None, images: int) -> None:
        if not self.counts(scheduled):
            return
        if reply is None:
            self.codes["transport"] += 1
            return
        self.codes[str(reply.status)] += 1
        if reply.status in (429, 503):
            self.rejected_latencies.append((done - scheduled) * 1000.0)
        if reply.status == 200:
            self.ok += 1
            self.images_ok += images
            self.latencies.append((done - scheduled) * 1000.0)
            hits = reply.headers.get("x-cache-hits", "0")
            self.cache_hits += int(hits) if hits.isdigit() else 0
            for size in reply.headers.get("x-batch-sizes", "").split(","):
                if size.isdigit():
                    self.header_batch_sum += int(size)
                    self.header_batch_count += 1


class _Meter:
    """Batch histogram and CPU snapshots at the start and end of the measured window."""

    def __init__(self, url: str, server_pid: int | None) -> None:
        self.url = url
        self.pid = server_pid
        self.start: tuple[float, float, float, float] | None = None
        self.end: tuple[float, float, float, float] | None = None

    async def snapshot(self) -> tuple[float, float, float, float]:
        total, count = await scrape_batch_histogram(self.url)
        server = process_cpu_seconds(self.pid) if self.pid else math.nan
        t = os.times()
        return total, count, server, t.user + t.system

    async def take_start(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        self.start = await self.snapshot()

    def deltas(self) -> tuple[float, float, float, float]:
        """(batch sum, batch count, server CPU s, client CPU s) over the window."""
        if self.start is None or self.end is None:
            return math.nan, math.nan, math.nan, math.nan
        d = [b - a for a, b in zip(self.start, self.end, strict=True)]
        return d[0], d[1], d[2], d[3]


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _summary(
    rec: _Recorder,
    meter: _Meter,
    *,
    label: str,
    mode: str,
    concurrency: int,
    target_rps: float,
    duration_s: float,
) -> RunResult:
    codes = Counter(rec.codes)
    unanswered = rec.sent - sum(codes.values())
    if unanswered > 0:
        codes["unanswered"] += unanswered  # still in flight when the run gave up on them
    batch_sum, batch_count, server_cpu, client_cpu = meter.deltas()
    return RunResult(
        label=label,
        mode=mode,
        concurrency=concurrency,
        target_rps=target_rps,
        duration_s=duration_s,
        sent=rec.sent,
        ok=rec.ok,
        images_ok=rec.images_ok,
        cache_hits=rec.cache_hits,
        status_codes=dict(sorted(codes.items())),
        batch_sum=batch_sum,
        batch_count=batch_count,
        header_batch_sum=rec.header_batch_sum,
        header_batch_count=rec.header_batch_count,
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
        latencies_ms=rec.latencies,
        rejected_p99_ms=_pct(rec.rejected_latencies, 99),
        send_lag_p99_ms=_pct(rec.send_lags, 99),
    )


async def _send(
    conn: HttpConnection, payload: Payload, headers: Sequence[tuple[str, str]] = ()
) -> Reply | None:
    try:
        return await conn.request(
            "POST",
            payload.path,
            payload.body,
            (("Content-Type", payload.content_type), *payload.headers, *headers),
        )
    except (HttpError, OSError, TimeoutError):
        return None


async def closed_loop(
    url: str,
    payloads: Sequence[Payload],
    *,
    label: str = "",
    concurrency: int = 32,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    server_pid: int | None = None,
    timeout_s: float = 60.0,
) -> RunResult:
    """Drive ``POST {url}/predict`` with ``concurrency`` clients for ``warmup_s + duration_s``.

    Each client has its own connection and sends its next request as soon as the previous one
    is answered, cycling through ``payloads`` (client ``w`` starts at payload ``w``). Requests
    sent during the warm-up are not recorded.

    Args:
        url: the server's base URL (``http://host:port``).
        payloads: request bodies (see :func:`loadtest.workload.build_payloads`).
        label: name of the run.
        concurrency: number of clients.
        duration_s: measured seconds.
        warmup_s: seconds driven but not recorded.
        server_pid: the server's process id, to report its CPU time per request.
        timeout_s: per-request timeout (a timeout counts as a transport error).
    """
    host, port = _host_port(url)
    start = time.perf_counter()
    rec = _Recorder(start + warmup_s, start + warmup_s + duration_s)
    meter = _Meter(url, server_pid)

    async def client(worker: int) -> None:
        conn = HttpConnection(host, port, timeout=timeout_s)
        i = worker
        try:
            while (sent := time.perf_counter()) < rec.stop_at:
                payload = payloads[i % len(payloads)]
                i += concurrency
                rec.begin(sent)
                reply = await _send(conn, payload)
                rec.record(sent, time.perf_counter(), reply, payload.images)
        finally:
            conn.close()

    starter = asyncio.create_task(meter.take_start(rec.measure_from))
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    await starter
    meter.end = await meter.snapshot()
    return _summary(
        rec,
        meter,
        label=label,
        mode="closed",
        concurrency=concurrency,
        target_rps=0.0,
        duration_s=duration_s,
    )


def interleaved_rounds(
    servers: Mapping[str, tuple[str, int]],
    payloads: Sequence[Payload],
    *,
    rounds: int,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> dict[str, list[RunResult]]:
    """Closed loops on several servers in interleaved rounds, the order reversed every other
    round, so whatever else runs on the machine hits all of them alike.

    Args:
        servers: name -> (base URL, process id whose tree's CPU is measured).
        payloads: the request bodies every server gets.
        rounds, concurrency, duration_s, warmup_s: as :func:`closed_loop`, per run.

    Returns:
        ``{name: [one RunResult per round]}`` (pool them with :func:`merge_runs`).
    """
    names = list(servers)
    runs: dict[str, list[RunResult]] = {name: [] for name in names}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            url, pid = servers[name]
            result = asyncio.run(
                closed_loop(url, payloads, label=name, concurrency=concurrency,
                            duration_s=duration_s, warmup_s=warmup_s, server_pid=pid)
            )  # fmt: skip
            log.info(
                "round %d %-8s %8.1f images/s  p99 %6.1f ms  cpu %.3f ms/req  %s",
                rnd + 1, name, result.images_per_s, result.p99_ms,
                result.server_cpu_ms_per_request, result.status_codes,
            )  # fmt: skip
            runs[name].append(result)
    return runs


async def open_loop(
    url: str,
    payloads: Sequence[Payload],
    *,
    rate: float,
    label: str = "",
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    max_connections: int = 512,
    poisson: bool = False,
    server_pid: int | None = None,
    timeout_s: float = 30.0,
    seed: int = 0,
    headers: Sequence[tuple[str, str]] = (),
    arrivals_done: asyncio.Event | None = None,
) -> RunResult:
    """Send ``POST {url}/predict`` at ``rate`` requests per second, whatever the answers.

    ``max_connections`` keep-alive connections are opened first (like a proxy's connection
    pool; opening them on demand at an overload rate floods the server's accept backlog, and
    dropped SYNs then retry after 1, 3, 7 s: latency of the kernel, not of the server). Requests
    are scheduled at fixed intervals (``poisson=True``: exponential gaps with the same mean) and
    each goes out on an idle connection; when every connection is busy it is counted under
    ``"not_sent"`` (the generator, not the server, was the limit). After the window, requests
    still in flight are awaited up to ``timeout_s``.

    Args:
        url: the server's base URL.
        payloads: request bodies, cycled through in order.
        rate: arrivals per second (> 0).
        label: name of the run.
        duration_s: measured seconds of arrivals.
        warmup_s: seconds of arrivals before, not recorded.
        max_connections: connections opened up front: the bound on requests in flight.
        poisson: exponential instead of fixed inter-arrival times.
        server_pid: the server's process id, to report its CPU time per request.
        timeout_s: per-request timeout (a timeout counts as a transport error).
        seed: seed of the Poisson gaps.
        headers: extra request headers (e.g. ``X-Priority``).
        arrivals_done: set when the last request has been sent (to time a recovery).

    Raises:
        ValueError: ``rate`` is not positive.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    host, port = _host_port(url)
    pool = [HttpConnection(host, port, timeout=timeout_s) for _ in range(max_connections)]
    gate = asyncio.Semaphore(64)

    async def connect(conn: HttpConnection) -> None:
        async with gate:
            with contextlib.suppress(OSError, TimeoutError):  # it connects again when used
                await conn.connect()

    await asyncio.gather(*(connect(conn) for conn in pool))
    idle: deque[HttpConnection] = deque(pool)
    start = time.perf_counter()
    rec = _Recorder(start + warmup_s, start + warmup_s + duration_s)
    meter = _Meter(url, server_pid)
    tasks: set[asyncio.Task[None]] = set()
    rng = random.Random(seed)

    async def one(conn: HttpConnection, payload: Payload, scheduled: float) -> None:
        if rec.counts(scheduled):
            rec.send_lags.append((time.perf_counter() - scheduled) * 1000.0)
        reply = await _send(conn, payload, headers)
        rec.record(scheduled, time.perf_counter(), reply, payload.images)
        idle.append(conn)

    starter = asyncio.create_task(meter.take_start(rec.measure_from))
    due = start
    i = 0
    while due < rec.stop_at:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        if idle:
            conn = idle.pop()
        else:
            if rec.counts(due):
                rec.sent += 1
                rec.codes["not_sent"] += 1
            conn = None
        if conn is not None:
            rec.begin(due)
            task = asyncio.create_task(one(conn, payloads[i % len(payloads)], due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
        due += rng.expovariate(rate) if poisson else 1.0 / rate
    if arrivals_done is not None:
        arrivals_done.set()
    await starter
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout_s + 5.0)
    meter.end = await meter.snapshot()
    for task in list(tasks):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)
    for conn in pool:
        conn.close()
    return _summary(
        rec,
        meter,
        label=label,
        mode="open",
        concurrency=max_connections,
        target_rps=rate,
        duration_s=duration_s,
    )
