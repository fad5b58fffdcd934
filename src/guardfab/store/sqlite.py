"""The embedded SQLite store for a single HGS node (stdlib ``sqlite3``).

Several threads of one HGS process and several HGS processes on one machine
share the file safely:

* WAL journal: readers never block the writer and see a consistent snapshot.
* Every write is one ``BEGIN IMMEDIATE`` transaction, so the store-wide
  revision counter (row ``counters``) is read and bumped under SQLite's write
  lock; conditions are checked inside the same transaction, so CAS is exact
  across processes.
* A small pool hands each thread its own connection for the duration of one
  call; connections are never shared by two threads at once, nor across fork.
* Watch reads a ``changes`` table in revision order. The history kept is the
  last ``history`` revisions (default :data:`~guardfab.store.base.DEFAULT_WATCH_HISTORY`);
  rows below that are deleted every 64 revisions. Watchers in this process are
  woken on commit; changes by other processes are seen within ``poll_interval``.
* ``synchronous=NORMAL`` (default) makes a commit durable against a process
  crash but may lose the last commits on power loss; ``FULL`` adds an fsync per
  commit. See docs/adr/0004-state-store.md for the measured cost.
* Checkpoints (copying the WAL back into the database file, with an fsync of
  each under ``NORMAL``) are SQLite's automatic ones by default: run by whichever
  commit crosses 1,000 WAL pages, inside that caller's request. A server passes
  ``checkpoint_interval``: automatic checkpoints are then off on every connection
  and a background thread runs a PASSIVE checkpoint (it blocks neither readers
  nor writers) at that interval, so no request waits for checkpoint fsyncs.
  Durability is the same either way: only when the WAL is copied back changes.
* The WAL file is bounded (``wal_limit_bytes``, 256 MiB by default). A PASSIVE
  checkpoint copies the WAL back but never rewinds it, and SQLite rewinds only
  when a writer finds no reader left in the WAL: under steady load from several
  processes there always is one, and the file grew without end (4 GB in 70 s of
  TPM attestations on the bench). Once the WAL holds more than the limit, PASSIVE
  rounds copy it back, then a RESTART checkpoint taken under the write gate
  (writers queue on the gate, not in SQLite's busy handler) copies the rest and
  waits for readers to leave the WAL (new readers read the database file), so
  the next writer rewinds it; ``journal_size_limit`` then truncates the file to
  the limit. Writers wait only for that last, small copy and its fsync.

The file (and SQLite's -wal/-shm files, which inherit its mode) is 0600; a
store file readable by group or others is refused rather than silently fixed.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from guardfab.errors import GuardfabError
from guardfab.store.base import (
    ANY,
    DEFAULT_WATCH_HISTORY,
    MAX_TXN_OPS,
    WATCH_BATCH_REVISIONS,
    CheckedTxn,
    Condition,
    Entry,
    EventKind,
    Txn,
    WatchEvent,
    check_key,
    check_limit,
    check_prefix,
    check_start_revision,
    check_transaction,
    condition_holds,
    prefix_end,
    raise_conflict,
)
from guardfab.store.errors import (
    StoreError,
    StoreSchemaError,
    StoreUsageError,
    WatchCompactedError,
)
from guardfab.store.watch import ChangeSignal, PollingWatch
from guardfab.store.write_gate import WriteGate

#: The schema this code writes. Older files are migrated; newer ones refused.
SCHEMA_VERSION = 1
#: SQLite header ``application_id`` marking a guardfab store ("gFab").
APPLICATION_ID = 0x67466162
#: Physically delete compacted change rows once every this many revisions.
_PRUNE_EVERY = 64

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " revision INTEGER NOT NULL, compacted INTEGER NOT NULL)",
    "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL,"
    " create_revision INTEGER NOT NULL, expires_at REAL) WITHOUT ROWID",
    "CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE changes (id INTEGER PRIMARY KEY, revision INTEGER NOT NULL,"
    " key TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('put', 'delete')), value BLOB)",
    "CREATE INDEX changes_revision ON changes (revision)",
    "INSERT INTO counters (id, revision, compacted) VALUES (1, 0, 0)",
    f"PRAGMA application_id = {APPLICATION_ID}",
)

#: Above every valid key (keys are ASCII up to "~"): the range end of prefix "".
_KEY_CEILING = "\x7f"
_SQL_GET = (
    "SELECT key, value, revision, create_revision, expires_at FROM kv"
    " WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_SQL_LIST = (
    "SELECT key, value, revision, create_revision, expires_at FROM kv"
    " WHERE key >= ? AND key < ? AND (expires_at IS NULL OR expires_at > ?)"
    " ORDER BY key LIMIT ?"
)
_SQL_LIVE_REVISION = (
    "SELECT revision FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_SQL_DELETE_LIVE = "DELETE FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"
_SQL_CHANGES = (
    "SELECT kind, key, value, revision FROM changes"
    " WHERE revision BETWEEN ? AND ? AND key >= ? AND key < ? ORDER BY revision, id"
)
_UPSERT = (
    "INSERT INTO kv (key, value, revision, create_revision, expires_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, revision = excluded.revision,"
    " expires_at = excluded.expires_at, create_revision = CASE WHEN kv.expires_at IS NULL"
    " OR kv.expires_at > ? THEN kv.create_revision ELSE excluded.create_revision END"
)
_INSERT_CHANGE = "INSERT INTO changes (revision, key, kind, value) VALUES (?, ?, ?, ?)"

#: The WAL size above which a checkpoint has it rewound (see the module notes). At
#: 64 MiB the HGS bench's TPM half-load p99 doubled (a rewind every second under load).
DEFAULT_WAL_LIMIT = 256 * 1024 * 1024
#: Below this, a store under load would empty its WAL at nearly every checkpoint.
MIN_WAL_LIMIT = 1024 * 1024

Synchronous = Literal["NORMAL", "FULL"]
_T = TypeVar("_T")


class SqliteStore:
    """A :class:`~guardfab.store.base.Store` in one SQLite file.

    Args:
        path: The database file; created 0600 if missing.
        clock: Wall-clock seconds, injected so tests control expiry. Processes
            sharing a file must share a clock (the system's, in production).
        history: Revisions of change history kept for watchers.
        poll_interval: How often a blocked watcher looks for other processes' writes.
        synchronous: ``"NORMAL"`` or ``"FULL"`` (fsync on every commit).
        busy_timeout: Seconds a write waits for another writer before failing.
        checkpoint_interval: Seconds between background WAL checkpoints; ``None``
            (default) leaves checkpoints to SQLite, inside the committing call.
        wal_limit_bytes: The WAL size above which a checkpoint empties it
            (with ``checkpoint_interval``), and the size SQLite truncates it to
            whenever it rewinds it.
        history_without_values: Key prefixes whose puts the watch history records
            without the value (a watcher sees ``value=None`` and reads the key if
            it needs it). For large values rewritten on every request that nobody
            watches: each would otherwise be written twice, kept for ``history``
            revisions and pruned again.

    Raises:
        StoreSchemaError: the file is not a guardfab store, is from a newer
            guardfab, or is readable by group or others.
        StoreError: the file could not be opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        history: int = DEFAULT_WATCH_HISTORY,
        poll_interval: float = 0.05,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 10.0,
        checkpoint_interval: float | None = None,
        wal_limit_bytes: int = DEFAULT_WAL_LIMIT,
        history_without_values: Sequence[str] = (),
    ) -> None:
        if history < 1:
            raise StoreUsageError("history must keep at least one revision")
        if checkpoint_interval is not None and not checkpoint_interval > 0:
            raise StoreUsageError("checkpoint_interval must be positive seconds")
        if wal_limit_bytes < MIN_WAL_LIMIT:
            raise StoreUsageError(f"wal_limit_bytes must be at least {MIN_WAL_LIMIT}")
        if synchronous not in ("NORMAL", "FULL"):
            raise StoreUsageError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self._clock = clock
        self._history = history
        self._poll_interval = poll_interval
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._checkpoint_interval = checkpoint_interval
        self._wal_limit = wal_limit_bytes
        self._valueless = tuple(check_prefix(prefix) for prefix in history_without_values)
        self._signal = ChangeSignal()
        _prepare_file(self.path)
        self._gate = WriteGate(self.path.with_name(self.path.name + "-gate"), busy_timeout)
        self._pool = _ConnectionPool(self._connect)
        self._run("open", _init_schema)
        self._checkpointer: _Checkpointer | None = None
        if checkpoint_interval is not None:
            self._checkpointer = _Checkpointer(self.checkpoint, checkpoint_interval)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {self._wal_limit}")
            if self._checkpoint_interval is not None:
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, what: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` on a pooled connection, turning SQLite errors into StoreError."""
        try:
            with self._pool.connection() as conn:
                return body(conn)
        except sqlite3.Error as exc:
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                raise StoreSchemaError(f"{self.path} is not a SQLite database") from exc
            raise StoreError(f"store {what} on {self.path} failed: {exc}") from exc

    def _write(self, body: Callable[[sqlite3.Connection, float], _T]) -> _T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction; roll back if it raises."""

        def transaction(conn: sqlite3.Connection) -> _T:
            return _in_transaction(conn, "BEGIN IMMEDIATE", lambda: body(conn, self._clock()))

        with self._gate.turn():
            result = self._run("write", transaction)
        self._signal.bump()
        return result

    def current_revision(self) -> int:
        """Return the revision of the last write."""
        return self._run("read", lambda conn: _counters(conn)[0])

    def get(self, key: str) -> Entry | None:
        """Return the live entry at ``key`` or ``None``."""
        check_key(key)
        now = self._clock()
        row = self._run("read", lambda conn: conn.execute(_SQL_GET, (key, now)).fetchone())
        return None if row is None else Entry(*row)

    def put(
        self, key: str, value: bytes, *, expect: Condition = ANY, ttl: float | None = None
    ) -> int:
        """Write ``key`` if ``expect`` holds; return the new revision."""
        compares = [] if expect is ANY else [(key, expect)]
        return self.transaction(compares, [(key, value, ttl)], [])

    def delete(self, key: str, *, expect: Condition = ANY) -> bool:
        """Delete ``key`` if ``expect`` holds; return whether a live key was removed."""
        compares = [] if expect is ANY else [(key, expect)]
        checked = check_transaction(compares, [], [key])
        return self._write(lambda conn, now: self._apply(conn, checked, now)[1] > 0)

    def list(
        self, prefix: str, *, start: str | None = None, limit: int | None = None
    ) -> builtins.list[Entry]:
        """Return live entries under ``prefix`` sorted by key, from ``start`` on."""
        check_prefix(prefix)
        low = max(prefix, check_prefix(start, what="start")) if start is not None else prefix
        limit = check_limit(limit)
        end = prefix_end(prefix) or _KEY_CEILING
        params = (low, end, self._clock(), -1 if limit is None else limit)
        rows = self._run("read", lambda conn: conn.execute(_SQL_LIST, params).fetchall())
        return [Entry(*row) for row in rows]

    def transaction(
        self,
        compares: Sequence[tuple[str, Condition]] = (),
        puts: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> int:
        """Apply every put and delete if every compare holds; return the revision."""
        checked = check_transaction(compares, puts, deletes)
        return self._write(lambda conn, now: self._apply(conn, checked, now)[0])

    def locked_transaction(
        self, keys: Sequence[str], build: Callable[[dict[str, Entry | None]], Txn]
    ) -> int:
        """Read ``keys``, then apply the transaction ``build`` makes of them, under one write lock.

        No other writer (thread or process) can commit between the read and the
        write, so a compare on a key just read always holds: what an optimistic
        read-then-commit would lose as a race (and retry) cannot happen. The
        transaction's compares are still checked, and ``build`` runs while every
        other writer waits: it must be quick and must not touch the store.
        """
        for key in keys:
            check_key(key)

        def body(conn: sqlite3.Connection, now: float) -> int:
            entries: dict[str, Entry | None] = {}
            for key in keys:
                row = conn.execute(_SQL_GET, (key, now)).fetchone()
                entries[key] = None if row is None else Entry(*row)
            txn = build(entries)
            checked = check_transaction(txn.compares, txn.puts, txn.deletes)
            return self._apply(conn, checked, now)[0]

        return self._write(body)

    def _apply(self, conn: sqlite3.Connection, txn: CheckedTxn, now: float) -> tuple[int, int]:
        """Apply a checked transaction; return (revision afterwards, keys deleted)."""
        for key, expect in txn.compares:
            found = conn.execute(_SQL_LIVE_REVISION, (key, now)).fetchone()
            current = None if found is None else int(found[0])
            if not condition_holds(expect, current):
                raise_conflict(key, expect, current)
        revision = _counters(conn)[0]
        new = revision + 1
        changes: builtins.list[tuple[int, str, str, bytes | None]] = []
        for key, value, ttl in txn.puts:
            expires_at = None if ttl is None else now + ttl
            conn.execute(_UPSERT, (key, value, new, new, expires_at, now))
            kept = None if self._valueless and key.startswith(self._valueless) else value
            changes.append((new, key, EventKind.PUT.value, kept))
        deleted = 0
        for key in txn.deletes:
            cursor = conn.execute(_SQL_DELETE_LIVE, (key, now))
            if cursor.rowcount:
                deleted += 1
                changes.append((new, key, EventKind.DELETE.value, None))
        if not changes:
            return revision, 0
        conn.executemany(_INSERT_CHANGE, changes)
        self._advance(conn, new)
        return new, deleted

    def _advance(self, conn: sqlite3.Connection, new: int) -> None:
        """Set the store revision to ``new`` and compact watch history behind it."""
        conn.execute(
            "UPDATE counters SET revision = ?, compacted = max(compacted, ?)",
            (new, new - self._history),
        )
        if new % _PRUNE_EVERY == 0:
            conn.execute("DELETE FROM changes WHERE revision <= (SELECT compacted FROM counters)")

    def watch(self, prefix: str, *, start_revision: int | None = None) -> PollingWatch:
        """Watch changes under ``prefix`` from ``start_revision`` (default: the next)."""
        check_prefix(prefix)
        start = check_start_revision(start_revision)
        current, compacted = self._run("read", _counters)
        if start is None:
            start = current + 1
        if start <= compacted:
            raise WatchCompactedError(start, compacted)

        def fetch(revision: int) -> tuple[builtins.list[WatchEvent], int]:
            return self._run("watch", lambda conn: _fetch_changes(conn, prefix, revision))

        return PollingWatch(
            fetch, self._signal, start_revision=start, poll_interval=self._poll_interval
        )

    def compact_expired(self, *, limit: int | None = None) -> int:
        """Remove expired entries, earliest expiry first; return how many.

        At most ``limit`` in this call, at most MAX_TXN_OPS per revision.
        """
        limit = check_limit(limit)
        return self._write(lambda conn, now: self._compact_expired(conn, now, limit))

    def _compact_expired(self, conn: sqlite3.Connection, now: float, limit: int | None) -> int:
        # kv_expiry indexes (expires_at, key): read in that order, no sort, stop at the limit.
        rows = conn.execute(
            "SELECT key FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?"
            " ORDER BY expires_at, key LIMIT ?",
            (now, -1 if limit is None else limit),
        ).fetchall()
        expired = [str(row[0]) for row in rows]
        for offset in range(0, len(expired), MAX_TXN_OPS):
            chunk = expired[offset : offset + MAX_TXN_OPS]
            new = _counters(conn)[0] + 1
            conn.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in chunk])
            conn.executemany(
                _INSERT_CHANGE, [(new, key, EventKind.DELETE.value, None) for key in chunk]
            )
            self._advance(conn, new)
        return len(expired)

    def checkpoint(self) -> tuple[int, int]:
        """Run a WAL checkpoint; return (WAL frames, frames copied back).

        PASSIVE copies what it can without waiting for, or blocking, any reader
        or writer; what it could not copy is left for the next one. If the WAL
        is larger than ``wal_limit_bytes``, more PASSIVE rounds copy what was
        written meanwhile, then a RESTART checkpoint under the write gate copies
        the small rest and waits for readers to leave the WAL, so the next
        writer rewinds it (see the module notes). If readers do not leave within
        a short wait, the WAL stays for the next round.
        """
        frames, copied, page_size = self._run("checkpoint", _passive)
        if frames * page_size <= self._wal_limit:
            return frames, copied
        # Writers wait while the gate is held, for as long as copying and syncing
        # what they wrote since the last round takes: each round copies what was
        # written during the one before, so rounds shrink until one copies little.
        for _ in range(_CATCH_UP_ROUNDS):
            before = copied
            frames, copied, page_size = self._run("checkpoint", _passive)
            if (copied - before) * page_size <= _CATCH_UP_BYTES:
                break
        with self._gate.turn():
            _busy, frames, copied = self._run("checkpoint", _restart_wal)
        return frames, copied

    def close(self) -> None:
        """Stop the checkpointer and close every connection; later calls raise StoreUsageError."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._pool.close()
        self._gate.close()
        self._signal.bump()


#: PASSIVE rounds, and what they may leave, before the WAL's blocking RESTART checkpoint.
_CATCH_UP_ROUNDS = 8
_CATCH_UP_BYTES = 256 * 1024
#: How long a RESTART checkpoint waits for readers to leave the WAL (writers queue
#: meanwhile; readers' transactions last well under this), and how often it looks.
_RESTART_WAIT = 0.2
_RESTART_POLL = 0.0001


def _passive(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A PASSIVE checkpoint: (frames in the WAL, frames copied back, page size)."""
    frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1:]
    return int(frames), int(copied), int(conn.execute("PRAGMA page_size").fetchone()[0])


def _restart_wal(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A RESTART checkpoint, retried until readers leave the WAL or _RESTART_WAIT passes.

    Returns (busy, frames, copied); busy is 1 if readers were still there. It
    polls with SQLite's busy handler off: the handler sleeps 1, 2, 5, 10 ms ...
    between looks, ~20 ms of writers queued for readers gone in microseconds.
    """
    (timeout_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout = 0")
    deadline = time.monotonic() + _RESTART_WAIT
    try:
        while True:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy or time.monotonic() > deadline:
                return int(busy), int(frames), int(copied)
            time.sleep(_RESTART_POLL)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")


def _in_transaction(conn: sqlite3.Connection, begin: str, body: Callable[[], _T]) -> _T:
    """Run ``body`` between ``begin`` and COMMIT, rolling back if anything raises."""
    conn.execute(begin)
    try:
        result = body()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _counters(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT revision, compacted FROM counters").fetchone()
    return int(row[0]), int(row[1])


def _fetch_changes(
    conn: sqlite3.Connection, prefix: str, revision: int
) -> tuple[builtins.list[WatchEvent], int]:
    """Read whole revisions from ``revision`` on, in one snapshot; return them and the next."""

    def body() -> tuple[builtins.list[WatchEvent], int]:
        current, compacted = _counters(conn)
        if revision <= compacted:
            raise WatchCompactedError(revision, compacted)
        upper = min(current, revision + WATCH_BATCH_REVISIONS - 1)
        if upper < revision:
            return [], revision
        end = prefix_end(prefix) or _KEY_CEILING
        rows = conn.execute(_SQL_CHANGES, (revision, upper, prefix, end)).fetchall()
        events = [WatchEvent(EventKind(kind), key, value, rev) for kind, key, value, rev in rows]
        return events, upper + 1

    return _in_transaction(conn, "BEGIN", body)


def _init_schema(conn: sqlite3.Connection) -> None:
    """Switch to WAL, then create the schema or check the existing one's version."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"the store could not switch to WAL mode (got {mode})")
    _in_transaction(conn, "BEGIN IMMEDIATE", lambda: _create_or_check(conn))


def _create_or_check(conn: sqlite3.Connection) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id == 0 and objects == 0:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        return
    if app_id != APPLICATION_ID:
        raise StoreSchemaError(
            "the file is a SQLite database but not a guardfab store",
            hint="point the HGS at its own store file",
        )
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
    if version is None:
        raise StoreSchemaError("the store has no readable schema version")
    if version > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"the store has schema version {version}; this guardfab reads up to {SCHEMA_VERSION}",
            hint="upgrade guardfab on this node; do not downgrade a store in place",
        )


def _prepare_file(path: Path) -> None:
    """Create the store file 0600, or refuse an existing one others can read."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise StoreSchemaError(
                f"store file {path} is accessible to group or others (mode {mode & 0o777:o})",
                hint=f"chmod 600 {path} after checking nobody changed it",
            ) from None
        return
    except FileNotFoundError as exc:
        raise StoreUsageError(f"directory {path.parent} does not exist") from exc
    except OSError as exc:
        raise StoreError(f"cannot create store file {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _Checkpointer:
    """A daemon thread calling ``checkpoint`` every ``interval`` seconds until stopped."""

    def __init__(self, checkpoint: Callable[[], object], interval: float) -> None:
        self._checkpoint = checkpoint
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._checkpoint()
            except StoreError:
                # A failed checkpoint loses nothing (the WAL keeps every commit);
                # the next round retries, and a closed store ends the loop.
                continue

    def stop(self) -> None:
        """Stop the thread and wait for a checkpoint in progress to end."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class _ConnectionPool:
    """Hands out one connection per caller at a time; discards broken ones."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], max_idle: int = 8) -> None:
        self._connect = connect
        self._max_idle = max_idle
        self._idle: builtins.list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Yield a connection; return it to the pool unless SQLite failed on it."""
        conn = self._take() or self._connect()
        try:
            yield conn
        except GuardfabError:
            # Conflicts and refused requests: the transaction was rolled back cleanly.
            self._give_back(conn)
            raise
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)

    def _take(self) -> sqlite3.Connection | None:
        with self._lock:
            if self._closed:
                raise StoreUsageError("the store is closed")
            if self._pid != os.getpid():
                # A forked child must never touch its parent's connections.
                self._idle, self._pid = [], os.getpid()
            return self._idle.pop() if self._idle else None

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()
