"""Several HGS worker processes, each with its own listening socket (``SO_REUSEPORT``).

uvicorn's ``--workers`` binds one socket and hands it to every worker; whichever
worker wakes first accepts, so a burst of connects (a fleet reconnecting after a
restart, a load generator starting) can all land on one worker while the others
idle (bench/README.md, finding 3). Here each worker binds the address itself with
``SO_REUSEPORT``, and the kernel spreads new connections over the listening
sockets by a hash of each connection's addresses.

Linux lets only sockets of the same effective user join a ``SO_REUSEPORT`` group,
so another user cannot bind the port and take a share of the connections.

The supervisor starts the workers (``spawn``: each a fresh interpreter, as uvicorn
does), restarts one that dies while serving, stops them all on SIGINT or SIGTERM,
and gives up if a worker dies before it has served for a while (a port already in
use, a broken configuration): a restart loop would only hide the error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from guardfab.access.serving import UVICORN_SETTINGS
from guardfab.errors import UsageError

LOG = logging.getLogger("guardfab.hgs")
#: A worker that dies sooner than this after its start is a configuration error.
STARTUP_GRACE = 5.0
#: Seconds a stopped worker has to finish its requests before it is killed.
STOP_TIMEOUT = 8.0
#: Pending connections per listening socket (uvicorn's default).
BACKLOG = 2048


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker needs: where to listen and what to serve with (picklable)."""

    host: str
    port: int
    certfile: str
    keyfile: str


def listening_socket(host: str, port: int, *, share: bool = True) -> socket.socket:
    """A socket bound to (host, port); with ``share``, SO_REUSEPORT and listening.

    Without ``share`` it is only bound: the supervisor's check that nothing else
    holds the port -- not even another HGS's SO_REUSEPORT workers, which a second
    ``serve`` would otherwise join silently, splitting hosts between two services.

    Raises:
        UsageError: the address cannot be bound (in use, not local).
    """
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if share:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="is another HGS (or anything else) already serving on that address?",
        ) from exc
    return sock


def run_worker(spec: WorkerSpec) -> None:
    """Body of one worker process: its own socket, uvicorn serving the HGS app on it."""
    import uvicorn  # noqa: PLC0415 - imported in the worker, after spawn

    _stop_when_orphaned(os.getppid())
    sock = listening_socket(spec.host, spec.port)
    config = uvicorn.Config(
        "guardfab.hgs.server:app_from_environment",
        factory=True,
        ssl_certfile=spec.certfile,
        ssl_keyfile=spec.keyfile,
        **UVICORN_SETTINGS,
        loop="uvloop",
        http="httptools",
    )
    uvicorn.Server(config).run(sockets=[sock])


def _stop_when_orphaned(parent: int) -> None:
    """Stop this worker (SIGTERM, a graceful uvicorn shutdown) once its supervisor is gone.

    A supervisor killed outright cannot stop its workers; without this they would
    keep serving the port with nobody to stop them.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


@dataclass
class _Worker:
    process: BaseProcess
    started: float


class Supervisor:
    """Runs ``count`` workers of ``spec`` until SIGINT or SIGTERM."""

    def __init__(self, spec: WorkerSpec, count: int) -> None:
        self.spec = spec
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._workers: list[_Worker] = []

    def run(self) -> None:
        """Start the workers, keep them running, stop them on a signal.

        Raises:
            UsageError: a worker died during its startup grace period.
        """
        # Nothing may hold the port, not even another HGS's workers: a clear error, early.
        listening_socket(self.spec.host, self.spec.port, share=False).close()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            self._workers = [self._start() for _ in range(self.count)]
            while not self._stop.wait(0.5):
                self._replace_dead()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._stop.set()

    def _start(self) -> _Worker:
        process = self._context.Process(target=run_worker, args=(self.spec,), daemon=False)
        process.start()
        return _Worker(process, time.monotonic())

    def _replace_dead(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker.process.is_alive() or self._stop.is_set():
                continue
            code = worker.process.exitcode
            if time.monotonic() - worker.started < STARTUP_GRACE:
                raise UsageError(
                    f"an HGS worker exited during startup (exit code {code})",
                    hint="see the worker's error above; 'guardfab hgs diagnose' checks the setup",
                )
            LOG.warning(
                "HGS worker %s exited (code %s); starting another", worker.process.pid, code
            )
            self._workers[index] = self._start()

    def _stop_all(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: uvicorn finishes its requests
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
