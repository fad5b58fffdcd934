"""The SQLite store's write gate: writers queue on a lock file before SQLite's own lock.

An ``flock`` taken on the gate file through another open file description
conflicts exactly as one held by another HGS process does, so these tests hold
it directly.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from guardfab.store import SqliteStore, StoreError


def gate_path(db: Path) -> Path:
    return db.with_name(db.name + "-gate")


def test_a_writer_waits_for_the_gate_and_times_out_without_writing(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(db, busy_timeout=0.2)
    store.put("k", b"before")
    fd = os.open(gate_path(db), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer's turn
    try:
        with pytest.raises(StoreError) as info:
            store.put("k", b"secret-value")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert "write lock" in str(info.value)
    assert "secret-value" not in str(info.value)
    entry = store.get("k")
    assert entry is not None
    assert entry.value == b"before"
    assert store.put("k", b"after") == 2  # the gate is free again
    store.close()


def test_a_waiting_writer_goes_once_the_holder_leaves(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    store = SqliteStore(db, busy_timeout=30)
    store.put("k", b"v")
    fd = os.open(gate_path(db), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (store.put("k", b"w"), done.set()))
    writer.start()
    try:
        assert not done.wait(0.3), "the write went through while another writer held the gate"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    writer.join(timeout=30)
    assert done.is_set()
    entry = store.get("k")
    assert entry is not None
    assert entry.value == b"w"
    store.close()


def test_the_gate_file_is_private_and_never_followed(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        db = tmp_path / "store.db"
        store = SqliteStore(db)
        store.put("k", b"v")
        store.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(gate_path(db).stat().st_mode) == 0o600

    other = tmp_path / "other.db"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    gate_path(other).symlink_to(target)
    store = SqliteStore(other)
    with pytest.raises(StoreError, match="write lock"):
        store.put("k", b"v")
    store.close()


def test_a_forked_child_queues_behind_its_parent(tmp_path: Path) -> None:
    # The child inherits the parent's descriptor (which shares the parent's flock) and
    # its thread lock as held at the fork; it must get its own of both, and wait.
    db = tmp_path / "store.db"
    store = SqliteStore(db, busy_timeout=10)
    store.put("k", b"parent")  # the gate's descriptor is open in the parent
    released = tmp_path / "released"
    with store._gate.turn():
        pid = os.fork()
        if pid == 0:  # the child: write, then say whether the parent had let go first
            code = 1
            try:
                store.put("k", b"child")
                code = 0 if released.exists() else 3
            finally:
                os._exit(code)
        time.sleep(0.3)
        released.touch()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    entry = store.get("k")
    assert entry is not None
    assert entry.value == b"child"
    store.close()
