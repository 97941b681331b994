"""Run the real ``nacguard serve`` as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.fixtures.processes import free_port, parent_pid

__all__ = ["ServerProcess", "free_port", "start_server"]


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

    def stop(self) -> int:
        """Terminate (graceful drain, then kill) the process if it still runs; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


def start_server(
    profile: Path | None, log_path: Path, *, ready_within: float | None = 60.0, **settings: object
) -> ServerProcess:
    """Start ``nacguard serve`` for ``profile`` with ``NACGUARD_*`` settings; wait until ready.

    Inherited ``NACGUARD_*`` variables are dropped (a run is defined by its arguments), the
    server binds a free loopback port, and ``/readyz`` is polled; one torch thread per server
    unless told otherwise, so several servers and the test process share two cores.

    Args:
        profile: the bundle to serve (``None``: the server's default, the demo).
        log_path: where the server's output goes.
        ready_within: seconds to wait for ``/readyz`` to answer 200 (``None``: return at once).
        settings: Settings fields, passed as ``NACGUARD_<NAME>`` environment variables.

    Raises:
        RuntimeError: the process exited, or was not ready in time (its log is in the message).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NACGUARD_")}
    # gRPC is off unless a test asks for it: servers (and other users') share the machine, and
    # its default port would collide.
    env.update(NACGUARD_HOST="127.0.0.1", NACGUARD_PORT=str(port), NACGUARD_GRPC_PORT="0")
    if profile is not None:
        env["NACGUARD_PROFILE"] = str(profile)
    for name, value in {"torch_threads": 1, "workers": 1, **settings}.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"NACGUARD_{name.upper()}"] = text
    exe = shutil.which("nacguard")
    command = [exe, "serve"] if exe else [sys.executable, "-m", "nacguard.cli", "serve"]
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    if ready_within is None:
        return server
    deadline = time.monotonic() + ready_within
    ready: set[int] = set()  # worker pids seen ready: with several workers, every one of them
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.logs()[-4000:]}")
        try:
            # A fresh connection each time: the kernel picks the worker of each connection.
            with httpx.Client(base_url=server.url, timeout=2.0) as client:
                health = client.get("/healthz").json()
            pid = health["pid"]
            if process.pid not in (pid, parent_pid(pid)):
                pass  # another server holds the port: ours fails to bind and exits (above)
            elif health["ready"]:
                ready.add(pid)
                if len(ready) >= health["workers"]:
                    return server
                continue
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.1)  # polling a process we do not control: there is no event to wait on
    server.stop()
    raise RuntimeError(f"server not ready within {ready_within}s:\n{server.logs()[-4000:]}")
