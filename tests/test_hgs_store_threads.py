"""On a store that waits on the network (etcd), requests run on threads, never on the loop.

An HGS worker serves every host from one event loop. On SQLite its requests read
and commit on that loop (ADR 0016: a thread hop costs more than the work). On
etcd every store call is a network round trip, seconds during an election, and
the loop would answer nothing else meanwhile (h31 saw /healthz stall 1.2-2.3 s
per election), so ``HgsService`` runs whole attestations and key releases on its
``store_threads`` there (ADR 0022). These tests use SQLite stores that say they
wait on the network, and whose store calls block until the loop has run: with a
request on the loop, they never return.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from guardfab.hgs.attest import AttestOutcome
from guardfab.hgs.kps import KpsService
from guardfab.hgs.kps_release import ReleaseResult
from guardfab.hgs.nonce import NonceError
from guardfab.hgs.service import HgsService
from guardfab.hgs.state import HgsState
from guardfab.keyprotection.errors import RollbackError
from guardfab.store import EtcdStore, MemoryStore, SqliteStore, verify
from test_hgs_attest_batched import Fleet
from test_kps_release_state import Fabric, fabric  # noqa: F401 -- fixture

#: How long a gated store call waits for the loop before failing the test.
GATE_SECONDS = 10


class _NetworkStore(SqliteStore):
    """A SQLite store that waits on the 'network': its first commit waits for the loop."""

    waits_on_network = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.loop_ran = threading.Event()
        self.threads: set[str] = set()

    def locked_transaction(self, *args: Any, **kwargs: Any) -> int:
        self.threads.add(threading.current_thread().name)
        if not self.loop_ran.wait(timeout=GATE_SECONDS):
            raise RuntimeError("the event loop was held while the store call waited")
        return super().locked_transaction(*args, **kwargs)


async def _with_the_loop_free(store: _NetworkStore, calls: list[Any]) -> list[Any]:
    """Run ``calls`` concurrently; the store lets them commit once the loop has run."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0.05)  # every request is now waiting on the store
    store.loop_ran.set()  # only a loop that is not held by a request gets here
    return await asyncio.gather(*tasks, return_exceptions=True)


class _NetworkFleet(Fleet):
    """Fleet's HGS and hosts, its worker's service over a store that waits on the network."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.store.close()
        self.store = _NetworkStore(self.state.store_path())  # type: ignore[assignment]
        self.service = HgsService(self.state, self.store)


def test_attestations_run_on_store_threads_and_keep_every_check(tmp_path: Path) -> None:
    fleet = _NetworkFleet(tmp_path / "hgs")
    store = fleet.store
    assert isinstance(store, _NetworkStore)
    try:
        bodies = fleet.bodies()
        calls = [fleet.service.attest_batched(t, b) for t, b in [*bodies, bodies[0]]]
        results = asyncio.run(_with_the_loop_free(store, calls))
        passed = [r for r in results if isinstance(r, AttestOutcome) and r.result.passed]
        assert len(passed) == len(bodies), results
        assert sum(isinstance(r, NonceError) for r in results) == 1  # the replay, alone
        assert all(name.startswith("hgs-store") for name in store.threads)
        assert verify(store).records == len(bodies)
    finally:
        fleet.close()


def test_a_sqlite_hgs_keeps_its_requests_on_the_loop(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "hgs")
    try:
        assert fleet.service.store_threads is None
    finally:
        fleet.close()


def test_key_releases_run_on_store_threads_and_keep_every_check(fabric: Fabric) -> None:  # noqa: F811
    store = _NetworkStore(fabric.store.path)
    kps = KpsService(HgsService(HgsState(fabric.directory), store))
    protectors = [fabric.kp() for _ in range(3)]
    try:
        calls = [
            kps.release_batched(fabric.certificate, kp, kps.batcher)
            for kp in [*protectors, protectors[1]]
        ]
        results = asyncio.run(_with_the_loop_free(store, calls))
        assert sum(isinstance(r, ReleaseResult) for r in results) == 3, results
        assert sum(isinstance(r, RollbackError) for r in results) == 1  # the replay
        assert all(name.startswith("hgs-store") for name in store.threads)
    finally:
        store.close()


def test_etcd_says_it_waits_on_the_network_and_the_local_stores_do_not() -> None:
    assert EtcdStore.waits_on_network is True
    assert not getattr(SqliteStore, "waits_on_network", False)
    assert not getattr(MemoryStore, "waits_on_network", False)
