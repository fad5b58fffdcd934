"""The in-memory store: reference semantics for every backend, and the test double.

Logic above the store (nonces, host registry, audit log) is unit-tested against
this class; the contract tests run the same suite against SQLite, and a
hypothesis state machine checks that both give the same answers to the same
operations. Simplicity beats speed here: one lock, plain dicts and lists.
"""

from __future__ import annotations

import bisect
import builtins
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guardfab.store.base import (
    ANY,
    DEFAULT_WATCH_HISTORY,
    MAX_TXN_OPS,
    WATCH_BATCH_REVISIONS,
    CheckedTxn,
    Condition,
    Entry,
    EventKind,
    WatchEvent,
    check_key,
    check_limit,
    check_prefix,
    check_start_revision,
    check_transaction,
    condition_holds,
    is_live,
    raise_conflict,
)
from guardfab.store.errors import StoreUsageError, WatchCompactedError
from guardfab.store.watch import ChangeSignal, PollingWatch


@dataclass(frozen=True, slots=True)
class _Row:
    value: bytes
    revision: int
    create_revision: int
    expires_at: float | None


class MemoryStore:
    """A :class:`~guardfab.store.base.Store` held in one process's memory.

    Args:
        clock: Wall-clock seconds; injected so tests control expiry.
        history: Revisions of change history kept for watchers.
        poll_interval: Longest a blocked watcher sleeps before re-checking.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        history: int = DEFAULT_WATCH_HISTORY,
        poll_interval: float = 0.05,
    ) -> None:
        if history < 1:
            raise StoreUsageError("history must keep at least one revision")
        self._clock = clock
        self._history = history
        self._poll_interval = poll_interval
        self._lock = threading.RLock()
        self._rows: dict[str, _Row] = {}
        self._revision = 0
        self._compacted = 0
        self._events: builtins.list[WatchEvent] = []
        self._signal = ChangeSignal()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUsageError("the store is closed")

    def _live(self, key: str, now: float) -> _Row | None:
        row = self._rows.get(key)
        if row is None or not is_live(row.expires_at, now):
            return None
        return row

    def current_revision(self) -> int:
        """Return the revision of the last write."""
        with self._lock:
            self._check_open()
            return self._revision

    def get(self, key: str) -> Entry | None:
        """Return the live entry at ``key`` or ``None``."""
        check_key(key)
        with self._lock:
            self._check_open()
            row = self._live(key, self._clock())
            return None if row is None else _entry(key, row)

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
        with self._lock:
            self._check_open()
            return self._apply(checked, self._clock()) > 0

    def list(
        self, prefix: str, *, start: str | None = None, limit: int | None = None
    ) -> builtins.list[Entry]:
        """Return live entries under ``prefix`` sorted by key, from ``start`` on."""
        check_prefix(prefix)
        low = max(prefix, check_prefix(start, what="start")) if start is not None else prefix
        limit = check_limit(limit)
        with self._lock:
            self._check_open()
            now = self._clock()
            keys = sorted(k for k in self._rows if k.startswith(prefix) and k >= low)
            entries = []
            for key in keys:
                row = self._live(key, now)
                if row is not None:
                    entries.append(_entry(key, row))
                    if limit is not None and len(entries) >= limit:
                        break
            return entries

    def transaction(
        self,
        compares: Sequence[tuple[str, Condition]] = (),
        puts: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> int:
        """Apply every put and delete if every compare holds; return the revision."""
        checked = check_transaction(compares, puts, deletes)
        with self._lock:
            self._check_open()
            self._apply(checked, self._clock())
            return self._revision

    def _apply(self, txn: CheckedTxn, now: float) -> int:
        """Apply a checked transaction under the lock; return how many keys it deleted."""
        for key, expect in txn.compares:
            row = self._live(key, now)
            current = None if row is None else row.revision
            if not condition_holds(expect, current):
                raise_conflict(key, expect, current)
        new_revision = self._revision + 1
        events: builtins.list[WatchEvent] = []
        for key, value, ttl in txn.puts:
            row = self._live(key, now)
            created = new_revision if row is None else row.create_revision
            expires_at = None if ttl is None else now + ttl
            self._rows[key] = _Row(value, new_revision, created, expires_at)
            events.append(WatchEvent(EventKind.PUT, key, value, new_revision))
        for key in txn.deletes:
            if self._live(key, now) is not None:
                del self._rows[key]
                events.append(WatchEvent(EventKind.DELETE, key, None, new_revision))
        if events:
            self._record(events, new_revision)
        return sum(1 for event in events if event.kind is EventKind.DELETE)

    def _record(self, events: builtins.list[WatchEvent], new_revision: int) -> None:
        self._revision = new_revision
        self._events.extend(events)
        self._compacted = max(self._compacted, new_revision - self._history)
        # Trim the physically kept events once half of them are compacted away.
        cut = bisect.bisect_right(self._events, self._compacted, key=lambda e: e.revision)
        if cut > len(self._events) // 2:
            del self._events[:cut]
        self._signal.bump()

    def watch(self, prefix: str, *, start_revision: int | None = None) -> PollingWatch:
        """Watch changes under ``prefix`` from ``start_revision`` (default: the next)."""
        check_prefix(prefix)
        start = check_start_revision(start_revision)
        with self._lock:
            self._check_open()
            if start is None:
                start = self._revision + 1
            if start <= self._compacted:
                raise WatchCompactedError(start, self._compacted)

        def fetch(revision: int) -> tuple[builtins.list[WatchEvent], int]:
            return self._fetch(prefix, revision)

        return PollingWatch(
            fetch, self._signal, start_revision=start, poll_interval=self._poll_interval
        )

    def _fetch(self, prefix: str, revision: int) -> tuple[builtins.list[WatchEvent], int]:
        with self._lock:
            self._check_open()
            if revision <= self._compacted:
                raise WatchCompactedError(revision, self._compacted)
            upper = min(self._revision, revision + WATCH_BATCH_REVISIONS - 1)
            first = bisect.bisect_left(self._events, revision, key=lambda e: e.revision)
            last = bisect.bisect_right(self._events, upper, key=lambda e: e.revision)
            batch = [e for e in self._events[first:last] if e.key.startswith(prefix)]
            return batch, max(revision, upper + 1)

    def compact_expired(self, *, limit: int | None = None) -> int:
        """Remove expired entries, earliest expiry first; return how many.

        At most ``limit`` in this call, at most MAX_TXN_OPS per revision.
        """
        limit = check_limit(limit)
        with self._lock:
            self._check_open()
            now = self._clock()
            by_expiry = sorted(
                (r.expires_at or 0.0, k)
                for k, r in self._rows.items()
                if not is_live(r.expires_at, now)
            )
            expired = [key for _when, key in by_expiry[:limit]]
            for offset in range(0, len(expired), MAX_TXN_OPS):
                chunk = expired[offset : offset + MAX_TXN_OPS]
                new_revision = self._revision + 1
                for key in chunk:
                    del self._rows[key]
                events = [WatchEvent(EventKind.DELETE, k, None, new_revision) for k in chunk]
                self._record(events, new_revision)
            return len(expired)

    def close(self) -> None:
        """Drop the data; later calls raise StoreUsageError and watchers stop."""
        with self._lock:
            self._closed = True
            self._rows.clear()
        self._signal.bump()


def _entry(key: str, row: _Row) -> Entry:
    return Entry(key, row.value, row.revision, row.create_revision, row.expires_at)
