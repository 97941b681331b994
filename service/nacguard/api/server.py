"""``nacguard serve``: uvicorn with a graceful drain on SIGTERM.

uvicorn's own handling of SIGTERM stops accepting connections and waits for open ones, but
readiness would stay green until the very end and requests still queued for a batch would race
the exit. :class:`DrainingServer` takes over the signal instead:

1. First SIGTERM (or SIGINT): readiness turns 503 (and gRPC health NOT_SERVING) and new requests get 503 ``shutting_down`` at
   once; requests already admitted reach the queue, everything queued is computed without
   waiting for batch-mates, and every accepted request is answered, within ``drain_timeout_s``.
   Only then does uvicorn close its listeners and connections, run the lifespan exit (store,
   runners), and the process exits 0.
2. A second SIGTERM/SIGINT exits at once (exit status 1).

With ``grpc_port`` set, the Open Inference Protocol's gRPC server
(:class:`~nacguard.openinference.rpc.RpcServer`) starts once HTTP is up and shares the drain:
its calls are admitted like HTTP requests, so the service's drain answers them too.

The listener keeps accepting during the drain on purpose: a load balancer that has not yet seen
readiness fail gets a fast 503 + ``Retry-After`` rather than a refused connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from types import FrameType

import uvicorn

from nacguard.bundle import BUNDLE_FILE
from nacguard.errors import BundleError
from nacguard.openinference.rpc import RpcServer
from nacguard.serving import Service
from nacguard.settings import Settings

from .app import create_app
from .logs import configure_logging
from .shedding import Shedder, shedding_protocol

__all__ = ["DrainingServer", "build_server", "serve"]

log = logging.getLogger("nacguard.server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the service before exiting.

    Args:
        config: the uvicorn config (its app is the one ``service`` belongs to).
        service: the app's service.
        drain_timeout_s: bound on the drain.

    Attributes:
        exit_code: 0 after a clean run and drain, 1 after a forced exit, a failed start or a
            drain that timed out.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        service: Service,
        drain_timeout_s: float,
        rpc: RpcServer | None = None,
    ) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self.rpc = rpc
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        service.on_fatal = self._fatal

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Run the server (remembers the loop, so the signal handler can schedule the drain)."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)
        if not self.started and self.exit_code == 0:
            self.exit_code = 1

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start HTTP (the lifespan launches the service), then the gRPC server, if any."""
        await super().startup(sockets)
        if self.rpc is None or self.should_exit:
            return
        try:
            await self.rpc.start()
        except RuntimeError as exc:
            log.error("cannot serve gRPC: %s", exc)
            self.exit_code = 1
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop gRPC (its calls were answered by the drain), then HTTP and the lifespan."""
        if self.rpc is not None:
            await self.rpc.stop(grace=1.0)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: first signal drains, a second one exits at once.

        Unlike uvicorn's, it does not re-raise the signal after shutdown: the drain *is* the
        handling, and re-raising SIGTERM would turn a clean exit into death by signal.
        """
        if self._draining or self.should_exit or self._loop is None:
            if not self.should_exit:
                log.warning("second signal %d: exiting without waiting", sig)
            self.exit_code = 1
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        log.info("signal %d: draining (up to %ss)", sig, self.drain_timeout_s)
        # Readiness must fail at once, before any await: this handler runs on the loop's thread.
        self.service.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="nacguard-drain")

    async def _drain(self) -> None:
        started = time.monotonic()
        try:
            if self.rpc is not None:
                await self.rpc.begin_drain()
            clean = await self.service.drain(self.drain_timeout_s)
        except Exception:
            log.exception("drain failed")
            clean = False
        if not clean and not self.force_exit:
            self.exit_code = 1
        # What is left is writing the last responses; bound uvicorn's wait for connections by
        # what remains of the drain budget (at least a second to flush them).
        remaining = self.drain_timeout_s - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, int(remaining + 0.999))
        self.should_exit = True

    def _fatal(self, exc: BaseException) -> None:
        log.error("cannot serve: %s", exc)
        self.exit_code = 1
        self.should_exit = True


def build_server(settings: Settings) -> DrainingServer:
    """The app and its draining uvicorn server for ``settings`` (not started)."""
    app = create_app(settings)
    service = app.state.service
    config = uvicorn.Config(
        app,
        # Refuses /predict and v2 infer when full as soon as their headers are parsed.
        http=shedding_protocol(Shedder(service)),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )
    # With several workers, each one serves grpc_port as well: gRPC binds with SO_REUSEPORT
    # on Linux, so the kernel spreads gRPC connections over the workers as it does HTTP ones.
    rpc = RpcServer(service, settings) if settings.grpc_port else None
    return DrainingServer(config, service, settings.drain_timeout_s, rpc)


def serve(settings: Settings) -> int:
    """Run the HTTP server until it is told to stop.

    One process; ``nacguard serve`` with several workers runs
    :func:`nacguard.supervisor.parent.supervise` instead, whose workers build this server.

    Args:
        settings: the validated settings.

    Returns:
        The process exit status (see :attr:`DrainingServer.exit_code`).

    Raises:
        BundleError: ``settings.profile`` is not a bundle directory (checked before binding,
            so a typo fails fast with a clear message rather than a red readiness probe).
    """
    configure_logging(settings)
    if not (settings.profile / BUNDLE_FILE).is_file():
        raise BundleError(f"{settings.profile} is not a profile bundle (no {BUNDLE_FILE})")
    server = build_server(settings)
    server.run()
    log.info("exiting with status %d", server.exit_code)
    return server.exit_code
