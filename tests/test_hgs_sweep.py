"""The HGS expiry sweep: a backlog of expired entries is removed in short transactions.

A minute of consumed nonces under load is tens of thousands of keys; removed in one
transaction on the event loop it stalled every request of every worker (bench/README.md,
round 6). These tests hold the sweep to short transactions, with a pause between two,
on a real SQLite store.
"""

from __future__ import annotations

from pathlib import Path

from guardfab.hgs.app import sweep_expired
from guardfab.store.base import MAX_TXN_OPS, Txn
from guardfab.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _fill(store: SqliteStore, count: int, *, ttl: float) -> None:
    for first in range(0, count, MAX_TXN_OPS):
        txn = Txn()
        for n in range(first, min(count, first + MAX_TXN_OPS)):
            txn.put(f"nonces/{n:06d}", b"", ttl=ttl)
        txn.commit(store)


def test_a_backlog_is_swept_in_batches_with_a_pause_between(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "s.db", clock=clock)
    try:
        _fill(store, 300, ttl=10)
        store.put("nonces/live", b"", ttl=1_000)
        store.put("trust/version", b"1")
        clock.now += 20
        before = store.current_revision()
        pauses: list[float] = []
        assert sweep_expired(store, batch=128, pause=0.01, sleep=pauses.append) == 300
        # 128 + 128 + 44: three transactions, a pause after each full one.
        assert store.current_revision() == before + 3
        assert pauses == [0.01, 0.01]
        assert [e.key for e in store.list("")] == ["nonces/live", "trust/version"]
        assert sweep_expired(store, sleep=pauses.append) == 0
        assert store.current_revision() == before + 3
    finally:
        store.close()


def test_nothing_expired_means_one_empty_call(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "s.db", clock=clock)
    try:
        _fill(store, 10, ttl=10)
        before = store.current_revision()
        assert sweep_expired(store, sleep=lambda _s: None) == 0
        assert store.current_revision() == before
        assert len(store.list("nonces/")) == 10
    finally:
        store.close()
