"""Does dynamic batching pay? Throughput and latency with and without it, side by side.

Starts ``nacguard serve`` twice, one after the other (``max_batch_size=1``, then the default
batching settings), drives each with the same closed loop of concurrent clients for a fixed
duration, and prints throughput, p50 and p99 latency, and the ratios::

    python loadtest/batching_bench.py                       # the bundled demo profile
    python loadtest/batching_bench.py --profile DIR --duration 20 --concurrency 32 --json out.json

The result cache is switched off (every request would otherwise be a cache hit after the first
round) and the access log is quieted, so what is measured is decoding, batching and compute.
Client and server share the machine's cores: on a small machine the client's own CPU use caps
the numbers, which is why both configurations are measured in the same run.

The pieces are reusable (``from loadtest.batching_bench import start_server, closed_loop``):
:func:`start_server` runs a server with given setting overrides and waits until it is ready;
:func:`closed_loop` drives any URL and returns a :class:`LoadResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

__all__ = [
    "LoadResult",
    "RunningServer",
    "closed_loop",
    "compare_batching",
    "main",
    "sample_payloads",
    "setting",
    "start_server",
]

log = logging.getLogger("nacguard.bench")

#: Settings every benchmark server gets unless overridden: no result cache (repeated images
#: would be answered without compute), no per-request access log lines, and torch intra-op
#: threads on half the cores: the event loop, decoding threads and the load generator need the
#: rest, and an OpenMP team contending with them for cores is far slower than a smaller one.
BENCH_DEFAULTS: dict[str, str] = {
    "workers": "1",  # one process unless a comparison asks for more
    "cache_enabled": "false",
    "log_level": "warning",
    "torch_threads": str(max(1, (os.cpu_count() or 2) // 2)),
}


@dataclass
class RunningServer:
    """A ``nacguard serve`` process started by :func:`start_server`."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), then kill if it does not exit in time; returns the status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _free_port() -> int:
    """A loopback port free right now that this process has not handed out before.

    Servers started side by side bind their ports only once they run, and the kernel may offer
    a port just released by this check again: two calls must not return the same one (a bench
    once had a server's HTTP port collide with another's gRPC port).
    """
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def setting(item: str) -> tuple[str, str]:
    """An argparse ``type`` for ``--set NAME=VALUE`` (a server setting); the pair.

    Raises:
        argparse.ArgumentTypeError: not ``NAME=VALUE`` (argparse turns it into one line and
            exit status 2).
    """
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {item!r}")
    return name, value


def _parent(pid: int) -> int | None:
    """The parent of process ``pid`` (None if it is gone), from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def start_server(
    profile: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    ready_within: float = 180.0,
    own_session: bool = False,
    source: Path | None = None,
) -> RunningServer:
    """Start ``nacguard serve`` on 127.0.0.1 and wait until ``/readyz`` answers 200.

    Args:
        profile: bundle directory; the server's default (the demo profile) when ``None``.
        overrides: Settings fields (``{"max_batch_size": 1}``), passed as ``NACGUARD_*``
            environment variables. Inherited ``NACGUARD_*`` variables are dropped first, so a
            run is defined by its arguments only.
        port: port to bind; a free one when ``None``.
        log_path: file for the server's output; a temporary file when ``None``.
        ready_within: seconds to wait for readiness.
        own_session: start it in a session of its own. With the kernel's autogroup scheduling
            (``/proc/sys/kernel/sched_autogroup_enabled``) a busy machine shares CPU time
            equally between sessions, not processes: servers compared side by side must each
            have their own session, or the one in the load generator's session gets less.
        source: run the server of this source tree (its ``service/`` first on ``PYTHONPATH``)
            instead of the installed one, e.g. an older commit checked out elsewhere.

    Returns:
        The running server (call :meth:`RunningServer.stop`).

    Raises:
        RuntimeError: the server exited or was not ready in time (the log tail is included).
    """
    port = port or _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NACGUARD_")}
    env["NACGUARD_HOST"] = "127.0.0.1"
    env["NACGUARD_PORT"] = str(port)
    # gRPC is off unless asked for: several servers (and other users') share the machine, and
    # its default port would collide.
    env["NACGUARD_GRPC_PORT"] = "0"
    if profile is not None:
        env["NACGUARD_PROFILE"] = str(profile)
    for name, value in (overrides or {}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"NACGUARD_{name.upper()}"] = text
    if log_path is None:
        log_path = Path(tempfile.mkstemp(prefix="nacguard-serve-", suffix=".log")[1])
    exe = shutil.which("nacguard")
    command = [exe, "serve"] if exe else [sys.executable, "-m", "nacguard.cli", "serve"]
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source / "service"), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "nacguard.cli", "serve"]
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=own_session
        )
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + ready_within
    ready: set[int] = set()  # worker pids seen ready: with several workers, every one of them
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"server exited with {process.returncode}:\n{tail}")
        try:
            # A fresh connection each time: the kernel picks the worker of each connection.
            with httpx.Client(base_url=server.url, timeout=2.0) as client:
                health = client.get("/healthz").json()
            pid = health.get("pid")  # servers before the field answered without it
            if pid is not None and process.pid not in (pid, _parent(pid)):
                pass  # another server holds the port: ours fails to bind and exits (above)
            elif health["ready"]:
                ready.add(pid or 0)
                if len(ready) >= health.get("workers", 1):
                    return server
                continue
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready within {ready_within}s; log: {log_path}")


@dataclass
class LoadResult:
    """One closed-loop run.

    Attributes:
        label: what was measured.
        concurrency: clients, each with one request outstanding at a time.
        duration_s: measured time (after warm-up).
        requests: requests answered 200 in the measured time.
        errors: other answers or transport errors in the measured time.
        images_per_request: images in each request.
        throughput_rps: successful requests per second.
        images_per_s: successful images per second.
        p50_ms: median latency of successful requests.
        p99_ms: 99th-percentile latency of successful requests.
        mean_batch: mean size of the batches requests reported (``X-Batch-Sizes``).
    """

    label: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    images_per_request: int
    throughput_rps: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


def sample_payloads(count: int, *, size: int = 28, images_per_request: int = 1) -> list[bytes]:
    """``count`` distinct raw PNG bodies (or multipart bodies when several images per request).

    Fashion-MNIST test images when the dataset is installed (the demo's real inputs), synthetic
    blobs otherwise.
    """
    from nacguard.offline.datasets import load_source  # numpy + Pillow only; no torch in the client

    n = count * images_per_request
    try:
        source = load_source("fashion-mnist:test", limit=n, seed=0)
    except (FileNotFoundError, ValueError):
        source = load_source(f"synthetic:blobs?n={n}&seed=0&size={size}")
    encoded = []
    for i in range(n):
        buf = io.BytesIO()
        image = source.images[i]
        if image.size != (size, size):
            image = image.resize((size, size))
        image.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    if images_per_request == 1:
        return encoded
    bodies = []
    for r in range(count):
        bodies.append(_multipart(encoded[r * images_per_request : (r + 1) * images_per_request]))
    return bodies


_BOUNDARY = "nacguardbenchboundary"


def _multipart(images: Sequence[bytes]) -> bytes:
    parts = []
    for i, data in enumerate(images):
        head = (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        parts.append(head + data + b"\r\n")
    return b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()


async def closed_loop(
    url: str,
    payloads: Sequence[bytes],
    *,
    label: str = "",
    concurrency: int = 32,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    images_per_request: int = 1,
) -> LoadResult:
    """Drive ``POST {url}/predict`` with ``concurrency`` clients for ``warmup_s + duration_s``.

    Each client sends its next request as soon as the previous one is answered (closed loop),
    cycling through ``payloads``. Only requests that start after the warm-up are recorded.

    Args:
        url: the server's base URL.
        payloads: request bodies: raw PNGs, or multipart bodies from :func:`sample_payloads`.
        label: name of the run.
        concurrency: number of clients.
        duration_s: measured seconds.
        warmup_s: seconds driven but not recorded (connections, allocator, caches).
        images_per_request: images in each payload (1 = raw PNG bodies).
    """
    content_type = (
        "image/png" if images_per_request == 1 else f"multipart/form-data; boundary={_BOUNDARY}"
    )
    headers = {"Content-Type": content_type}
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        nonlocal errors
        i = worker
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            try:
                r = await client.post(
                    "/predict", content=payloads[i % len(payloads)], headers=headers
                )
                ok = r.status_code == 200
            except httpx.TransportError:
                ok = False
                r = None
            done = time.perf_counter()
            i += concurrency
            if sent < measure_from or done > stop_at:
                continue
            if ok and r is not None:
                latencies.append(done - sent)
                sizes = r.headers.get("X-Batch-Sizes", "")
                batch_sizes.extend(int(s) for s in sizes.split(",") if s)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, w) for w in range(concurrency)))
    lat = np.asarray(latencies) * 1000.0
    return LoadResult(
        label=label,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(latencies),
        errors=errors,
        images_per_request=images_per_request,
        throughput_rps=len(latencies) / duration_s,
        images_per_s=len(latencies) * images_per_request / duration_s,
        p50_ms=float(np.percentile(lat, 50)) if lat.size else float("nan"),
        p99_ms=float(np.percentile(lat, 99)) if lat.size else float("nan"),
        mean_batch=float(np.mean(batch_sizes)) if batch_sizes else float("nan"),
    )


def compare_batching(
    profile: Path | None,
    *,
    concurrency: int = 32,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    images_per_request: int = 1,
    extra: Mapping[str, object] | None = None,
) -> list[LoadResult]:
    """Measure ``max_batch_size=1`` and the default batching settings, one after the other.

    Args:
        profile: bundle to serve (``None``: the demo profile).
        concurrency: closed-loop clients.
        duration_s: measured seconds per configuration.
        warmup_s: unrecorded seconds per configuration.
        images_per_request: images per request.
        extra: further Settings overrides applied to both servers (e.g. ``device``).

    Returns:
        ``[unbatched, batched]``.
    """
    size = 28
    if profile is not None and (profile / "bundle.json").is_file():
        size = int(json.loads((profile / "bundle.json").read_text())["preprocess"]["size"][0])
    payloads = sample_payloads(
        max(4 * concurrency, 64), size=size, images_per_request=images_per_request
    )
    configs = [
        ("max_batch_size=1", {"max_batch_size": 1}),
        ("default batching", {}),
    ]
    results = []
    for label, overrides in configs:
        server = start_server(profile, {**BENCH_DEFAULTS, **(extra or {}), **overrides})
        try:
            log.info("%s: %s", label, server.url)
            result = asyncio.run(
                closed_loop(
                    server.url,
                    payloads,
                    label=label,
                    concurrency=concurrency,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    images_per_request=images_per_request,
                )
            )
        finally:
            server.stop()
        results.append(result)
    return results


def _table(results: Sequence[LoadResult]) -> str:
    base, batched = results
    rows = [
        ("throughput (req/s)", "throughput_rps", "{:.1f}"),
        ("images/s", "images_per_s", "{:.1f}"),
        ("p50 latency (ms)", "p50_ms", "{:.2f}"),
        ("p99 latency (ms)", "p99_ms", "{:.2f}"),
        ("mean batch size", "mean_batch", "{:.2f}"),
        ("requests", "requests", "{}"),
        ("errors", "errors", "{}"),
    ]
    width = 20
    lines = [f"{'':<{width}}{base.label:>20}{batched.label:>20}{'ratio':>10}"]
    for name, attr, fmt in rows:
        a, b = getattr(base, attr), getattr(batched, attr)
        ratio = f"{b / a:.2f}x" if isinstance(a, float) and a and np.isfinite(a) else ""
        lines.append(f"{name:<{width}}{fmt.format(a):>20}{fmt.format(b):>20}{ratio:>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", type=Path, help="bundle directory (default: the demo profile)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per config")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--device", help="server device (default: the server's, cpu)")
    p.add_argument(
        "--set", action="append", default=[], type=setting, metavar="NAME=VALUE",
        help="extra setting, both runs",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.profile is None:
        from nacguard.settings import DEMO_PROFILE

        if not (DEMO_PROFILE / "bundle.json").is_file():
            p.error(f"the demo profile is not built ({DEMO_PROFILE}); pass --profile DIR")
    extra: dict[str, object] = dict(args.set)
    if args.device:
        extra["device"] = args.device
    results = compare_batching(
        args.profile,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        images_per_request=args.images_per_request,
        extra=extra,
    )
    print(
        f"{args.concurrency} closed-loop clients, {args.duration:g} s per configuration, "
        f"{args.images_per_request} image(s) per request, profile: {args.profile or 'demo'}"
    )
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
