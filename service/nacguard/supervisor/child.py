"""One worker of a supervised server: ``python -m nacguard.supervisor.child`` (started by
:class:`~nacguard.supervisor.parent.Supervisor`, not by hand).

It serves the socket it inherited with the same draining uvicorn server a single-process
``nacguard serve`` runs, tells the supervisor on a pipe once its model is ready, and dies with
the supervisor (``PR_SET_PDEATHSIG``) rather than outlive it holding the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from nacguard.settings import Settings
from nacguard.supervisor.parent import EXIT_SIGNALS

__all__ = ["main"]

log = logging.getLogger("nacguard.worker")

_PR_SET_PDEATHSIG = 1
#: Exit signals that arrived before the server could drain (replayed once it can).
_held: list[int] = []


class _WorkerField(logging.Filter):
    """Adds ``worker`` (the index) to every log record of this process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor dies (best effort elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _hold_exit_signals() -> None:
    """Remember an exit signal that arrives while the worker starts, then let them through.

    A worker is told to stop at any time, also while it still imports torch; dying of the
    signal then would fail the supervisor's drain (status -15) and drop the connections queued
    on its socket. The supervisor blocks the signals before it starts the worker (the mask is
    inherited), so none is lost between ``exec`` and this handler.
    """
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda sig, frame: _held.append(sig))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, EXIT_SIGNALS)


def _notify(ready_fd: int, index: int) -> None:
    os.write(ready_fd, f"{index} {os.getpid()}\n".encode())


def run(
    settings: Settings, *, index: int, sock: socket.socket, ready_fd: int, listen_when_ready: bool
) -> int:
    """Serve ``sock`` until told to stop; the exit status.

    Args:
        settings: this worker's settings (from :func:`~nacguard.supervisor.worker_plan`).
        index: the worker's position (logged as ``worker``).
        sock: the bound socket to serve (listening already, unless ``listen_when_ready``).
        ready_fd: the pipe the supervisor reads readiness from.
        listen_when_ready: hold the start of serving (and so of listening) until the model is
            loaded, so that a replacement takes connections only once it can answer them.
    """
    from nacguard.api.logs import configure_logging
    from nacguard.api.server import build_server

    configure_logging(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    server = build_server(settings)
    service = server.service
    app: Any = server.config.app
    inner = app.router.lifespan_context

    async def notify_when_ready() -> None:
        with contextlib.suppress(Exception):  # a failed load is logged and exits by itself
            await service.wait_ready(timeout=1e6)
            _notify(ready_fd, index)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with inner(app):
            # Serving has started and uvicorn's handlers are in place: a signal held during
            # the start-up drains now, like one that arrives from here on.
            for sig in _held:
                server.handle_exit(sig, None)
            if listen_when_ready:
                # uvicorn starts listening after the lifespan's start-up: waiting here is what
                # keeps a loading replacement out of the kernel's choice of sockets.
                await service.wait_ready(timeout=1e6)
                _notify(ready_fd, index)
                task = None
            else:
                task = asyncio.create_task(notify_when_ready())
            yield
            if task is not None:
                task.cancel()

    app.router.lifespan_context = lifespan
    server.run(sockets=[sock])
    log.info("worker %d exiting with status %d", index, server.exit_code)
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the supervisor's arguments and run the worker."""
    _hold_exit_signals()
    _die_with_parent()
    parser = argparse.ArgumentParser(prog="nacguard-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--listen-when-ready", action="store_true")
    args = parser.parse_args(argv)
    if os.getppid() == 1:  # the supervisor died before the death signal was armed
        return 1
    settings = Settings(**json.loads(args.settings.read_text()))
    sock = socket.socket(fileno=args.fd)
    return run(
        settings,
        index=args.index,
        sock=sock,
        ready_fd=args.ready_fd,
        listen_when_ready=args.listen_when_ready,
    )


if __name__ == "__main__":
    status = main()
    # A thread may still be inside torch here: a model load that a SIGTERM during start-up
    # cancelled runs on in its executor thread. The interpreter's finalisation would then run
    # torch's C++ destructors under it ("terminate called without an active exception", exit
    # 134 instead of a clean drain's 0). Everything the worker owns was closed by the drain.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
