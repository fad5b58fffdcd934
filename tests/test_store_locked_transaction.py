"""SqliteStore.locked_transaction, and the audit log's use of it: no head races on SQLite.

The audit log appends by reading the chain head and committing a record that
links to it. Read and commit apart, two HGS worker processes race for the head
and the loser reads and retries; with the read inside the write lock, no race
can be lost. These tests show the read and write are one critical section (a
log allowed one attempt never loses one, across processes), that compares in
the built transaction are still checked, and that a failing build writes nothing.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from guardfab.store import (
    ABSENT,
    AuditLog,
    ConflictError,
    Entry,
    SqliteStore,
    StoreUsageError,
    Txn,
    verify,
)

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    backend = SqliteStore(tmp_path / "s.db")
    yield backend  # type: ignore[misc]
    backend.close()


def test_build_sees_the_keys_and_its_transaction_commits(store: SqliteStore) -> None:
    store.put("a", b"1")
    seen: dict[str, Entry | None] = {}

    def build(entries: dict[str, Entry | None]) -> Txn:
        seen.update(entries)
        found = entries["a"]
        assert found is not None
        return Txn().compare("a", found.revision).put("a", found.value + b"2")

    revision = store.locked_transaction(["a", "missing"], build)
    assert seen["missing"] is None
    assert seen["a"] is not None
    assert seen["a"].value == b"1"
    entry = store.get("a")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"12", revision)


def test_a_failed_compare_in_the_built_transaction_writes_nothing(store: SqliteStore) -> None:
    store.put("taken", b"")
    before = store.current_revision()

    def build(_entries: dict[str, Entry | None]) -> Txn:
        return Txn().compare("taken", ABSENT).put("other", b"x")

    with pytest.raises(ConflictError) as caught:
        store.locked_transaction([], build)
    assert caught.value.key == "taken"
    assert store.current_revision() == before
    assert store.get("other") is None


def test_a_build_that_raises_writes_nothing(store: SqliteStore) -> None:
    before = store.current_revision()

    def build(_entries: dict[str, Entry | None]) -> Txn:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.locked_transaction(["a"], build)
    assert store.current_revision() == before
    store.put("after", b"")  # the connection and the lock are usable again


def test_bad_keys_and_transactions_are_refused(store: SqliteStore) -> None:
    with pytest.raises(StoreUsageError):
        store.locked_transaction(["bad key"], lambda _entries: Txn())
    with pytest.raises(StoreUsageError):
        store.locked_transaction([], lambda _entries: Txn().put("k", b"").delete("k"))
    assert store.current_revision() == 0


def test_the_audit_log_reads_the_head_inside_the_write(store: SqliteStore) -> None:
    log = AuditLog(store)
    reads: list[str] = []
    real_get = store.get

    def counting_get(key: str) -> Entry | None:
        reads.append(key)
        return real_get(key)

    store.get = counting_get  # type: ignore[method-assign]
    for n in range(3):
        log.append(kind="admin", actor="a", subject=str(n), outcome="success")
    assert log.head_key not in reads  # no separate, racy read of the head
    assert verify(store).records == 3


def one_attempt_appender(path: str, tag: str, count: int) -> int:
    """Child process: ``count`` appends by a log allowed ONE attempt (a lost race raises)."""
    store = SqliteStore(path)
    log = AuditLog(store, max_attempts=1)
    for n in range(count):
        key = f"nonces/{tag}-{n}"
        txn = Txn().compare(key, ABSENT).put(key, b"", ttl=60)
        log.append(kind="attestation", actor=tag, subject=str(n), outcome="success", txn=txn)
    store.close()
    return os.getpid()


def test_processes_appending_at_once_never_lose_a_head_race(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    SqliteStore(path).close()
    processes, count = 3, 300
    with SPAWN.Pool(processes) as pool:
        jobs = [
            pool.apply_async(one_attempt_appender, (path, f"p{p}", count)) for p in range(processes)
        ]
        for job in jobs:
            job.get(timeout=120)  # raises the child's StoreError had it lost a race
    store = SqliteStore(path)
    try:
        assert verify(store).records == processes * count
        assert len(store.list("nonces/")) == processes * count
    finally:
        store.close()
