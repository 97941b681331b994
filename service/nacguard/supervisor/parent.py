"""The supervisor: one parent process that owns the port and keeps ``workers`` servers running.

Why processes: one Python process serves HTTP, decodes images and builds JSON on one core (the
GIL), whatever the model does. ``workers`` processes, each with its own event loop, model copy
and batcher, use as many cores.

How the port is shared: the supervisor binds one socket per worker, all on the same address with
``SO_REUSEPORT``, and hands socket *i* to worker *i*. The kernel spreads new connections over the
sockets of the group by a hash of the connection's addresses, so keep-alive clients are spread
evenly from the first connection on (a single socket shared by every worker lets whichever loop
wakes first accept a whole burst of connections). The gRPC server of each worker, when there is
one, binds ``grpc_port`` the same way (gRPC sets ``SO_REUSEPORT`` on Linux by default).

What it does:

* **Start**: every worker gets a listening socket at once, so ``/healthz`` answers (and
  ``/readyz`` says 503) while the models load, exactly as with one process. Each worker reports
  on a pipe when it is ready; the supervisor logs ``all workers ready`` once all of them are.
* **Replace**: a worker that dies after it was ready is replaced. Its socket is closed (the
  connections it had accepted, and the few queued for it, fail as connection errors: only
  those), and the replacement gets a fresh socket that it starts listening on only once its
  model is loaded, so no client sees its start-up. A worker that exits before it was ever ready
  (a broken profile, an out-of-memory at load) stops the server with status 1 instead of being
  restarted in a loop.
* **Drain**: SIGTERM or SIGINT is forwarded to every worker, each drains what it accepted (see
  :mod:`nacguard.api.server`), and the supervisor exits 0 once all of them exited 0. A second
  signal is forwarded too (the workers exit at once) and the exit status is 1; so it is when a
  worker's drain outlives ``drain_timeout_s`` by 10 s (it is killed).
* **Shared folder** (``run_dir``): ``PROMETHEUS_MULTIPROC_DIR`` for the multi-process metrics
  and the replica's drift counts; cleaned at every start.

Readiness stays per worker: each worker's ``/readyz`` answers for itself, so a probe that lands
on a worker that is still loading sees 503 and the next one may see 200.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from nacguard.errors import BundleError
from nacguard.settings import Settings, available_cores

__all__ = ["BUNDLE_FILE", "Supervisor", "supervise", "worker_plan"]

log = logging.getLogger("nacguard.supervisor")

#: How long past ``drain_timeout_s`` a draining worker may take before it is killed.
KILL_MARGIN_S = 10.0
#: The accept backlog of each worker's socket (uvicorn's default).
BACKLOG = 2048
#: The signals that stop a worker: blocked while one starts (it unblocks them, see ``child``).
EXIT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def worker_plan(settings: Settings) -> list[Settings]:
    """The settings of each worker: the resolved worker count, the torch threads of each (the
    cores shared out when ``torch_threads`` is 0), and its devices (with several devices, worker
    *i* gets every *n*-th one; with more workers than devices, they take turns)."""
    count = settings.worker_count
    threads = settings.torch_threads or max(1, available_cores() // count)
    devices = settings.devices
    plans = []
    for index in range(count):
        if len(devices) <= 1:
            mine = devices
        elif count < len(devices):
            mine = devices[index::count]
        else:
            mine = [devices[index % len(devices)]]
        update = {"workers": count, "torch_threads": threads, "device": ",".join(mine)}
        plans.append(settings.model_copy(update=update))
    return plans


def _listener(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    """One worker position: its settings file, socket and current process."""

    index: int
    settings_path: Path
    sock: socket.socket
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    exit_code: int | None = None


class Supervisor:
    """Runs ``settings.worker_count`` workers behind one port until told to stop.

    Args:
        settings: the validated settings (``workers`` may be 0: resolved here).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._own_run_dir = settings.run_dir is None
        self.run_dir = self._prepare_run_dir(settings.run_dir)
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.port = settings.port
        self._plans = worker_plan(settings)
        self._slots: list[_Slot] = []
        self._signals: list[int] = []
        self._stopping = False
        self._kill_at = 0.0
        self._failed = False
        self._all_ready_logged = False
        self._ready_buffer = b""

    @staticmethod
    def _prepare_run_dir(given: Path | None) -> Path:
        if given is None:
            return Path(tempfile.mkdtemp(prefix="nacguard-run-"))
        given.mkdir(parents=True, exist_ok=True)
        for entry in given.iterdir():  # what an earlier start left behind
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return given

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids, by worker index."""
        return [s.process.pid for s in self._slots if s.process and s.process.poll() is None]

    def run(self) -> int:
        """Bind, start the workers, supervise them until they are stopped; the exit status."""
        ready_r, ready_w = os.pipe()
        wake_r, wake_w = os.pipe()
        os.set_blocking(ready_r, False)
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            self._bind()
            log.info(
                "supervisor: %d workers on %s:%d", len(self._plans), self.settings.host, self.port
            )
            for slot in self._slots:
                self._spawn(slot, ready_w, listen_when_ready=False)
            return self._loop(ready_r, wake_r, ready_w)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            for fd in (ready_r, ready_w, wake_r, wake_w):
                os.close(fd)
            for slot in self._slots:
                slot.sock.close()
            if self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            else:
                for path in self.run_dir.glob("settings-*.json"):
                    path.unlink(missing_ok=True)

    def _bind(self) -> None:
        host = self.settings.host
        for index, plan in enumerate(self._plans):
            sock = _listener(host, self.port, listen=True)
            self.port = sock.getsockname()[1]  # port 0: every later socket joins the first's
            path = self.run_dir / f"settings-{index}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold API keys
            with os.fdopen(fd, "w") as out:
                update = {"port": self.port, "run_dir": self.run_dir}
                out.write(plan.model_copy(update=update).model_dump_json())
            self._slots.append(_Slot(index, path, sock))

    def _spawn(self, slot: _Slot, ready_w: int, *, listen_when_ready: bool) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        fd = slot.sock.fileno()
        command = [
            sys.executable,
            "-m",
            "nacguard.supervisor.child",
            f"--index={slot.index}",
            f"--fd={fd}",
            f"--ready-fd={ready_w}",
            f"--settings={slot.settings_path}",
        ]
        if listen_when_ready:
            command.append("--listen-when-ready")
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it once (a worker signalled twice would skip its drain).
        # Started with the exit signals blocked (the child unblocks them once it can hold them),
        # so a stop that comes while it starts is drained rather than fatal.
        signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)
        try:
            slot.process = subprocess.Popen(
                command, env=env, pass_fds=(fd, ready_w), process_group=0
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, EXIT_SIGNALS)
        slot.ready = False
        slot.exit_code = None
        log.info("started worker %d (pid %d)", slot.index, slot.process.pid)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)

    def _loop(self, ready_r: int, wake_r: int, ready_w: int) -> int:
        with selectors.DefaultSelector() as selector:
            selector.register(ready_r, selectors.EVENT_READ)
            selector.register(wake_r, selectors.EVENT_READ)
            while True:
                timeout = max(0.0, self._kill_at - time.monotonic()) if self._stopping else None
                for key, _ in selector.select(timeout):
                    if key.fd == ready_r:
                        self._read_ready(ready_r)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            while os.read(wake_r, 512):
                                pass
                while self._signals:
                    self._handle_signal(self._signals.pop(0))
                self._reap(ready_w)
                if self._stopping:
                    # Reaped ones only: a worker that exits after _reap looked is seen next time.
                    if all(s.process is None or s.exit_code is not None for s in self._slots):
                        break
                    if time.monotonic() >= self._kill_at:
                        log.error("workers still draining after %.0fs: killing them",
                                  self.settings.drain_timeout_s + KILL_MARGIN_S)  # fmt: skip
                        self._failed = True
                        self._kill_all()
        codes = [s.exit_code for s in self._slots]
        status = 1 if self._failed or any(code != 0 for code in codes) else 0
        log.info("supervisor exiting with status %d (workers: %s)", status, codes)
        return status

    def _read_ready(self, ready_r: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(ready_r, 4096):
                self._ready_buffer += chunk
        *lines, self._ready_buffer = self._ready_buffer.split(b"\n")
        for line in lines:
            index, pid = (int(x) for x in line.split())
            slot = self._slots[index]
            if slot.process is not None and slot.process.pid == pid:
                slot.ready = True
                log.info("worker %d (pid %d) ready", index, pid)
        if not self._all_ready_logged and all(s.ready for s in self._slots):
            self._all_ready_logged = True
            log.info("all workers ready (%d)", len(self._slots))

    def _handle_signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            return  # reaped below
        if not self._stopping:
            log.info("signal %d: draining %d workers", sig, len(self.pids))
            self._stop(signal.SIGTERM)
        else:
            log.warning("second signal %d: workers exit without waiting", sig)
            self._failed = True
            self._signal_all(signal.SIGINT)

    def _stop(self, sig: int) -> None:
        self._stopping = True
        self._kill_at = time.monotonic() + self.settings.drain_timeout_s + KILL_MARGIN_S
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.kill()
                slot.exit_code = slot.process.wait()

    def _reap(self, ready_w: int) -> None:
        for slot in self._slots:
            process = slot.process
            if process is None or slot.exit_code is not None:
                continue
            code = process.poll()
            if code is None:
                continue
            slot.exit_code = code
            if self._stopping:
                log.info("worker %d (pid %d) exited with status %d", slot.index, process.pid, code)
            elif not slot.ready:
                log.error(
                    "worker %d (pid %d) exited with status %d before it was ready: stopping",
                    slot.index, process.pid, code,
                )  # fmt: skip
                self._failed = True
                self._stop(signal.SIGTERM)
            else:
                log.warning(
                    "worker %d (pid %d) died with status %d: starting a replacement",
                    slot.index, process.pid, code,
                )  # fmt: skip
                self._replace(slot, process.pid, ready_w)

    def _replace(self, slot: _Slot, pid: int, ready_w: int) -> None:
        from prometheus_client import multiprocess

        # Its live gauges (queue depth, in flight) go; its counters stay in the totals.
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))
        slot.sock.close()
        slot.sock = _listener(self.settings.host, self.port, listen=False)
        self._spawn(slot, ready_w, listen_when_ready=True)


#: ``nacguard.bundle.BUNDLE_FILE``, named here so the supervisor need not import torch.
BUNDLE_FILE = "bundle.json"


def supervise(settings: Settings) -> int:
    """Run the workers of ``settings`` under a :class:`Supervisor`; the exit status.

    Raises:
        BundleError: ``settings.profile`` is not a bundle directory (before anything starts).
    """
    from nacguard.api.logs import configure_logging

    configure_logging(settings)
    if not (settings.profile / BUNDLE_FILE).is_file():
        raise BundleError(f"{settings.profile} is not a profile bundle (no {BUNDLE_FILE})")
    return Supervisor(settings).run()
