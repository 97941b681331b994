"""Run the real ``nacguard serve`` as a subprocess on a free loopback port."""

from __future__ import annotations

import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest.batching_bench import start_server as launch_server

__all__ = ["ServerProcess", "free_port", "start_server"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A running ``nacguard serve`` process."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> str:
        """Everything the server has logged so far (JSON lines)."""
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the server process."""
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its status."""
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Terminate (then kill) the process if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(
    profile: Path, log_path: Path, *, ready_within: float = 60.0, **settings: object
) -> ServerProcess:
    """Start ``nacguard serve`` for ``profile`` with ``NACGUARD_*`` settings; wait until ready.

    The launch itself is the benchmark's (``loadtest.batching_bench.start_server``: inherited
    ``NACGUARD_*`` variables dropped, a free loopback port, ``/readyz`` polled); tests add one
    torch thread per server, so several servers and the test process share two cores.

    Args:
        profile: the bundle to serve.
        log_path: where the server's output goes.
        ready_within: seconds to wait for ``/readyz`` to answer 200.
        settings: Settings fields, passed as ``NACGUARD_<NAME>`` environment variables.

    Raises:
        RuntimeError: the process exited, or was not ready in time (its log is in the message).
    """
    running = launch_server(
        profile, {"torch_threads": 1, **settings}, log_path=log_path, ready_within=ready_within
    )
    return ServerProcess(process=running.process, url=running.url, log_path=log_path)
