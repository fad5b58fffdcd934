"""Running the HGS: open the store, build the app, serve HTTPS with uvicorn.

Worker processes each build their own app from the state directory (named by
``GUARDFAB_HGS_DIR``), so ``--workers N`` scales over the cores while the store
keeps them consistent; with more than one, each worker listens on its own
``SO_REUSEPORT`` socket (:mod:`guardfab.hgs.supervisor`).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from guardfab.access.serving import UVICORN_SETTINGS
from guardfab.errors import UsageError
from guardfab.hgs import registry as reg
from guardfab.hgs.app import create_app
from guardfab.hgs.deps import service_of_app
from guardfab.hgs.etcd_admin import open_settings_store
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsState
from guardfab.hgs.supervisor import Supervisor, WorkerSpec
from guardfab.store.base import Store
from guardfab.store.etcd import EtcdStore
from guardfab.store.sqlite import SqliteStore

STATE_DIR_ENV = "GUARDFAB_HGS_DIR"
#: Seconds between the served store's background WAL checkpoints (see SqliteStore):
#: a request never waits for a checkpoint's fsyncs; durability is unchanged.
CHECKPOINT_INTERVAL = 0.25


#: Keys attestations write that nobody watches: their puts go into the watch history
#: without the value. A TPM host's last record held its boot log (~20 KB) until ADR
#: 0021; kept for 10,000 revisions and pruned again it cost more than the rest of the
#: attestation's store work (bench/README.md, round 7). The boot now has its own key,
#: written once per boot, and no more watched than the record.
HISTORY_WITHOUT_VALUES = (reg.LAST, reg.BOOT)


def open_store(state: HgsState, *, checkpoint_interval: float | None = None) -> Store:
    """The store named by the HGS configuration (background checkpoints if an interval is given)."""
    backend = state.config.store.get("backend")
    if backend == "sqlite":
        return SqliteStore(
            state.store_path(),
            checkpoint_interval=checkpoint_interval,
            history_without_values=HISTORY_WITHOUT_VALUES,
        )
    if backend == "etcd":
        return open_etcd_store(state)
    raise UsageError(f"hgs.json: unknown store backend {backend!r}")


#: Longest etcd password file read.
def open_etcd_store(state: HgsState) -> EtcdStore:
    """Open the etcd store ``hgs.json`` names and check that the cluster answers.

    Checking here makes ``hgs serve`` fail at start, naming the members it could not
    reach, rather than at the first request.
    """
    return open_settings_store(state.etcd_settings())


def build_app(
    directory: Path, *, checkpoint_interval: float | None = CHECKPOINT_INTERVAL
) -> FastAPI:
    """The HGS application for the state in ``directory``."""
    state = HgsState(directory)
    store = open_store(state, checkpoint_interval=checkpoint_interval)
    return create_app(HgsService(state, store))


def app_from_environment() -> FastAPI:
    """uvicorn factory for worker processes: the state directory comes from the environment."""
    directory = os.environ.get(STATE_DIR_ENV)
    if not directory:
        raise UsageError(f"{STATE_DIR_ENV} is not set")
    app = build_app(Path(directory))
    freeze_startup_heap()
    return app


def freeze_startup_heap() -> None:
    """Keep what start-up built (modules, the app, its keys) out of later full collections.

    Those ~77,000 objects live as long as the worker, yet every full (generation 2)
    collection walked them all: 30-100 ms measured in a serving worker, on the event
    loop and sometimes inside a store transaction, so the other worker waited for
    the write lock as well (bench/README.md, round 6). Frozen, they are never
    scanned; only objects made later are. Garbage is collected first, so nothing
    unreachable is kept.
    """
    gc.collect()
    gc.freeze()


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 in brackets) and check the port."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]"), int(port_text)


def serve(directory: Path, listen: str | None = None, workers: int = 1) -> None:
    """Serve the HGS over HTTPS until interrupted."""
    state = HgsState(directory)
    host, port = parse_listen(listen or state.config.listen)
    os.environ[STATE_DIR_ENV] = str(Path(directory).resolve())
    # Fail here, with a clear error, rather than in a worker; the workers build their own.
    service_of_app(build_app(Path(directory), checkpoint_interval=None)).store.close()
    certfile, keyfile = str(state.path("tls", "server.pem")), str(state.path("tls", "server.key"))
    if workers > 1:  # a socket per worker, so the kernel spreads connections (supervisor.py)
        Supervisor(WorkerSpec(host, port, certfile, keyfile), workers).run()
        return
    uvicorn.run(
        "guardfab.hgs.server:app_from_environment",
        factory=True,
        host=host,
        port=port,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        **UVICORN_SETTINGS,
        loop="uvloop",
        http="httptools",
    )
