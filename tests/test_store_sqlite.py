"""What only the SQLite backend promises: the file on disk and sharing it between processes.

Several HGS processes on one node share one store file, so the CAS tests here
run real processes (multiprocessing, spawn) against the same file, each with a
few threads, and count that no increment was lost.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from guardfab.errors import TransportError
from guardfab.store import (
    ABSENT,
    ConflictError,
    EventKind,
    SqliteStore,
    StoreError,
    StoreSchemaError,
    StoreUsageError,
    WatchEvent,
)
from guardfab.store.sqlite import SCHEMA_VERSION

SPAWN = multiprocessing.get_context("spawn")


def counter_worker(path: str, key: str, threads: int, increments: int) -> int:
    """Run in a child process: CAS-increment ``key`` from several threads; return conflicts."""
    store = SqliteStore(path)
    conflicts = [0] * threads

    def work(slot: int) -> None:
        for _ in range(increments):
            while True:
                entry = store.get(key)
                value = 0 if entry is None else int(entry.value)
                expect = ABSENT if entry is None else entry.revision
                try:
                    store.put(key, str(value + 1).encode(), expect=expect)
                    break
                except ConflictError:
                    conflicts[slot] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.close()
    return sum(conflicts)


def writer_worker(path: str, count: int) -> None:
    """Run in a child process: write ``count`` keys the parent is watching."""
    store = SqliteStore(path)
    for i in range(count):
        store.put(f"remote/{i:03d}", str(i).encode())
    store.close()


def test_two_processes_lose_no_cas_update(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    SqliteStore(path).close()
    processes, threads, increments = 2, 2, 40
    with SPAWN.Pool(processes) as pool:
        results = [
            pool.apply_async(counter_worker, (path, "counter", threads, increments))
            for _ in range(processes)
        ]
        conflicts = sum(result.get(timeout=60) for result in results)
    store = SqliteStore(path)
    entry = store.get("counter")
    assert entry is not None
    assert int(entry.value) == processes * threads * increments
    # Every successful increment was exactly one revision.
    assert store.current_revision() == processes * threads * increments
    assert conflicts >= 0
    store.close()


def test_watch_sees_writes_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, poll_interval=0.01)
    watch = store.watch("remote/")
    child = SPAWN.Process(target=writer_worker, args=(str(path), 20))
    child.start()
    events: list[WatchEvent] = []
    while len(events) < 20 and (event := watch.next_event(timeout=30)) is not None:
        events.append(event)
    child.join(timeout=30)
    watch.cancel()
    assert child.exitcode == 0
    assert [(e.kind, e.key) for e in events] == [
        (EventKind.PUT, f"remote/{i:03d}") for i in range(20)
    ]
    assert [e.revision for e in events] == list(range(1, 21))
    store.close()


def test_file_and_journal_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = SqliteStore(tmp_path / "store.db")
        store.put("k", b"v")
        files = [tmp_path / "store.db", tmp_path / "store.db-wal", tmp_path / "store.db-shm"]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()}
        store.close()
    finally:
        os.umask(old_umask)
    assert modes["store.db"] == 0o600
    assert set(modes.values()) == {0o600}


def test_store_file_open_to_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    SqliteStore(path).close()
    path.chmod(0o640)
    with pytest.raises(StoreSchemaError) as info:
        SqliteStore(path)
    assert "chmod 600" in info.value.diagnostics()


def test_reopen_keeps_data_revisions_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, clock=lambda: 1000.0)
    store.put("a", b"1")
    store.put("b", b"2", ttl=60)
    store.put("a", b"3")
    before = [store.get("a"), store.get("b")]
    store.close()
    reopened = SqliteStore(path, clock=lambda: 1000.0)
    assert [reopened.get("a"), reopened.get("b")] == before
    assert reopened.current_revision() == 3
    assert reopened.put("c", b"") == 4
    reopened.close()
    later = SqliteStore(path, clock=lambda: 1060.0)
    assert later.get("b") is None
    assert later.compact_expired() == 1
    later.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path)
    store.put("k", b"v")
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    with pytest.raises(StoreSchemaError) as info:
        SqliteStore(path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(info.value)
    assert "upgrade guardfab" in info.value.diagnostics()


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    path.chmod(0o600)
    with pytest.raises(StoreSchemaError, match="not a guardfab store"):
        SqliteStore(path)


def test_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, just some text " * 100)
    path.chmod(0o600)
    with pytest.raises(StoreSchemaError, match="not a SQLite database"):
        SqliteStore(path)


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(StoreUsageError, match="does not exist"):
        SqliteStore(tmp_path / "missing" / "store.db")


def test_locked_store_raises_transport_error_without_values(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, busy_timeout=0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError) as info:
            store.put("hosts/h", b"registration-secret-ish")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert isinstance(info.value, TransportError)
    assert "locked" in str(info.value)
    assert "registration" not in str(info.value)
    # The connection that failed was discarded; the store still works.
    assert store.put("hosts/h", b"v") == 1
    store.close()


def test_change_history_is_pruned_to_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, history=50)
    for i in range(300):
        store.put(f"k/{i % 10}", b"x")
    store.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT count(*), min(revision) FROM changes").fetchone()
        compacted = conn.execute("SELECT compacted FROM counters").fetchone()[0]
    conn.close()
    assert compacted == 250
    assert rows[0] <= 50 + 64
    assert rows[1] > 250 - 64


@pytest.mark.parametrize("mode", ["NORMAL", "FULL"])
def test_synchronous_mode_is_applied(tmp_path: Path, mode: str) -> None:
    store = SqliteStore(tmp_path / "store.db", synchronous=mode)  # type: ignore[arg-type]
    seen = store._run("read", lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    journal = store._run("read", lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
    store.close()
    assert seen == {"NORMAL": 1, "FULL": 2}[mode]
    assert journal == "wal"


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(StoreUsageError):
        SqliteStore(tmp_path / "a.db", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(StoreUsageError):
        SqliteStore(tmp_path / "b.db", history=0)
    with pytest.raises(StoreUsageError):
        SqliteStore(tmp_path / "c.db", checkpoint_interval=0)


def _autocheckpoint(store: SqliteStore) -> int:
    return int(store._run("read", lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]))


def test_checkpoints_are_sqlites_own_by_default(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    try:
        assert _autocheckpoint(store) == 1000
        assert store._checkpointer is None
    finally:
        store.close()


def test_background_checkpoints_copy_the_wal_back_and_keep_every_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, checkpoint_interval=0.02)
    try:
        assert _autocheckpoint(store) == 0, "no request may run a checkpoint itself"
        size = path.stat().st_size
        for n in range(50):
            store.put(f"k/{n:03d}", bytes(5000))
        # In WAL mode the database file grows only when a checkpoint copies pages back:
        # here only the thread can (250 KB is also far below SQLite's 1,000-page trigger).
        deadline = time.monotonic() + 10
        while path.stat().st_size < size + 250_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.stat().st_size >= size + 250_000
    finally:
        store.close()
    reopened = SqliteStore(path)
    try:
        assert len(reopened.list("k/")) == 50
    finally:
        reopened.close()


def busy_worker(path: str, writes: int, wal_limit: int) -> None:
    """Write 20 KB values and read meanwhile, as one HGS worker under load does."""
    store = SqliteStore(path, checkpoint_interval=0.02, wal_limit_bytes=wal_limit)
    reader = threading.Thread(target=lambda: [store.get("k/01") for _ in range(3 * writes)])
    reader.start()
    try:
        for n in range(writes):
            store.put(f"k/{n % 50:02d}", os.urandom(20_000))
            store.get("k/02")
            time.sleep(0.001)
    finally:
        reader.join()
        store.close()


def test_the_wal_stays_bounded_while_two_processes_write_and_read(tmp_path: Path) -> None:
    """Readers always in the WAL kept SQLite from rewinding it: it grew without end.

    Two processes (as the HGS's two workers) each write 600 values of 20 KB and
    read meanwhile. Before the RESTART checkpoint the WAL only grew (to ~70 MB
    here, on the HGS bench to 4 GB in 70 s); now checkpoints let it be rewound
    and cut back to its 1 MiB limit, so it never holds more than a few MB.
    """
    path, limit = tmp_path / "store.db", 1 << 20
    SqliteStore(path).close()
    wal, largest = Path(f"{path}-wal"), 0
    workers = [SPAWN.Process(target=busy_worker, args=(str(path), 600, limit)) for _ in range(2)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
        time.sleep(0.005)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert largest < 24 << 20, f"the WAL grew to {largest >> 20} MiB"
    store = SqliteStore(path)
    try:
        assert len(store.list("k/")) == 50, "every key is there"
    finally:
        store.close()


def test_a_wal_limit_too_small_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreUsageError, match="wal_limit_bytes"):
        SqliteStore(tmp_path / "store.db", wal_limit_bytes=4096)


def test_close_stops_the_checkpointer(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db", checkpoint_interval=0.01)
    thread = store._checkpointer._thread  # type: ignore[union-attr]
    assert thread.is_alive()
    store.close()
    assert not thread.is_alive()


def test_history_without_values_keeps_the_event_but_not_the_value(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path, history_without_values=("hosts/last/",))
    watch = store.watch("", start_revision=1)
    store.put("hosts/last/h1", b"x" * 20_000)
    store.put("hosts/h1", b"registration")
    events = [watch.next_event(timeout=5) for _ in range(2)]
    watch.cancel()
    assert [(e.kind, e.key, e.value) for e in events if e is not None] == [
        (EventKind.PUT, "hosts/last/h1", None),  # the event, without the 20 KB
        (EventKind.PUT, "hosts/h1", b"registration"),
    ]
    entry = store.get("hosts/last/h1")
    assert entry is not None
    assert entry.value == b"x" * 20_000  # the key itself keeps its value
    store.close()
    with sqlite3.connect(path) as raw:
        stored = raw.execute("SELECT key, length(value) FROM changes ORDER BY id").fetchall()
    assert stored == [("hosts/last/h1", None), ("hosts/h1", 12)]
    with pytest.raises(StoreUsageError):
        SqliteStore(path, history_without_values=("bad prefix with spaces",))
