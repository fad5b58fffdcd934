"""The store interface behind the HGS: revisioned keys, CAS, TTL, transactions, watch.

The HGS service processes are stateless; everything they remember (registered
hosts, consumed nonces, policies, the audit log) lives behind :class:`Store`.
One node uses the embedded SQLite backend; a cluster uses etcd 3.4 through
its HTTP gateway (:mod:`guardfab.store.etcd`, ADR 0022). The interface is
shaped after etcd; the mapping is one to one except where noted:

=========================  ==============================================
guardfab                   etcd v3
=========================  ==============================================
``Entry.revision``         ``kv.mod_revision`` (store-wide, monotonic)
``Entry.create_revision``  ``kv.create_revision``
``expect=ABSENT``          ``compare create_revision == 0``
``expect=<int>``           ``compare mod_revision == <int>``
``ttl=``                   an expiry stamp stored with the value (decides,
                           by the store's clock) and a lease of ``ceil(ttl)``
                           plus slack (only collects)
``transaction()``          ``Txn`` (compares; success = puts + deletes;
                           failure = a range read of each compared key,
                           which names the key whose compare failed)
``list(prefix)``           ``Range(key, range_end=prefix_end(key))``
``watch(prefix, rev)``     ``Watch(key, range_end, start_revision=rev)``
``WatchCompactedError``    ``ErrCompacted`` / ``compact_revision``
``compact_expired()``      deletes what the stored expiry stamps say has
                           expired, found through an expiry index; leases
                           only collect leftovers later (ADR 0022)
=========================  ==============================================

Semantics every backend shares (the in-memory store is the reference):

* Every write bumps one store-wide revision; all puts and deletes of one
  transaction share it. A delete of an absent key changes nothing and bumps
  nothing.
* An entry whose TTL has run out is absent for every reader and every condition
  at once. It is physically removed (with a delete event for watchers) by
  :meth:`Store.compact_expired`, or replaced by a later put.
* Keys are printable ASCII without spaces, at most :data:`MAX_KEY_LENGTH`
  characters, so byte order, code point order and etcd's order agree.
"""

from __future__ import annotations

import builtins
import enum
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Self

from guardfab.store.errors import ConflictError, StoreUsageError

#: Longest key accepted. Keys are paths like ``hosts/tpm/<id>``.
MAX_KEY_LENGTH = 512
#: Largest value accepted: below etcd's default 1.5 MiB request limit.
MAX_VALUE_BYTES = 1024 * 1024
#: Most puts + deletes (and, separately, compares) in one transaction: etcd's
#: default ``--max-txn-ops``.
MAX_TXN_OPS = 128
#: Longest TTL accepted (ten years); etcd caps lease TTLs in the same range.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600.0
#: Revisions of change history the local backends keep for watchers. At 2,000
#: writes/s that is 5 s: enough for a watcher polling every 50 ms, small enough
#: (a few MB) to keep in every write. A watcher further behind gets
#: WatchCompactedError and re-lists, exactly as with a compacted etcd.
DEFAULT_WATCH_HISTORY = 10_000
#: Revisions a watcher fetches at once; bounds one fetch to this many revisions
#: of at most MAX_TXN_OPS events each.
WATCH_BATCH_REVISIONS = 64


class Expect(enum.Enum):
    """The two conditions that are not a revision number."""

    #: No condition: write whatever is there.
    ANY = "any"
    #: The key must be absent (never written, deleted or expired).
    ABSENT = "absent"


ANY = Expect.ANY
ABSENT = Expect.ABSENT

#: A write condition: :data:`ANY`, :data:`ABSENT`, or the exact ``revision`` the
#: key must still have (compare-and-swap).
Condition = Expect | int


@dataclass(frozen=True, slots=True)
class Entry:
    """One key as a reader sees it."""

    key: str
    value: bytes
    #: Store revision of the last write to this key (etcd ``mod_revision``).
    revision: int
    #: Store revision at which the key was created (etcd ``create_revision``).
    create_revision: int
    #: Clock time after which the key is gone, or ``None`` for no expiry.
    expires_at: float | None


class EventKind(enum.Enum):
    """What a watch event reports."""

    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watcher, in revision order."""

    kind: EventKind
    key: str
    #: The new value for a put; ``None`` for a delete, and for a put under a prefix
    #: the store keeps in its history without values (SqliteStore history_without_values).
    value: bytes | None
    revision: int


class Compare(NamedTuple):
    """A transaction condition on one key."""

    key: str
    expect: Condition


class Put(NamedTuple):
    """A transaction write of one key."""

    key: str
    value: bytes
    ttl: float | None = None


class Watch(Protocol):
    """A running watch: a blocking iterator of events with a stop handle.

    Iterating blocks until the next event and ends after :meth:`cancel`;
    :meth:`next_event` waits at most ``timeout`` seconds, which is what tests and
    loops that also do other work want.
    """

    def next_event(self, timeout: float | None = None) -> WatchEvent | None:
        """Return the next event, or ``None`` on timeout or after cancel."""
        ...

    def cancel(self) -> None:
        """Stop the watch; a blocked iterator ends."""
        ...

    def __iter__(self) -> Iterator[WatchEvent]: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class Store(Protocol):
    """A revisioned key-value store with CAS, TTL, transactions and watch.

    Implementations are safe to share between threads. Backend failures raise
    :class:`~guardfab.store.errors.StoreError`; failed conditions raise
    :class:`~guardfab.store.errors.ConflictError` and change nothing.
    """

    def current_revision(self) -> int:
        """Return the store-wide revision of the last write (0 for a new store)."""
        ...

    def get(self, key: str) -> Entry | None:
        """Return the live entry at ``key``, or ``None`` if absent or expired."""
        ...

    def put(
        self, key: str, value: bytes, *, expect: Condition = ANY, ttl: float | None = None
    ) -> int:
        """Write ``key`` if ``expect`` holds; return the new revision."""
        ...

    def delete(self, key: str, *, expect: Condition = ANY) -> bool:
        """Delete ``key`` if ``expect`` holds; return whether a live key was removed."""
        ...

    def list(
        self, prefix: str, *, start: str | None = None, limit: int | None = None
    ) -> builtins.list[Entry]:
        """Return live entries under ``prefix`` sorted by key, from key ``start`` on."""
        ...

    def transaction(
        self,
        compares: Sequence[tuple[str, Condition]] = (),
        puts: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> int:
        """Apply all puts and deletes if every compare holds, else nothing.

        Returns:
            The store revision after the transaction (unchanged if it wrote nothing).

        Raises:
            ConflictError: naming the first compare, in the given order, that failed.
        """
        ...

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        """Watch changes under ``prefix`` from ``start_revision`` (default: the next one).

        Raises:
            WatchCompactedError: ``start_revision`` is older than the kept history.
        """
        ...

    def compact_expired(self, *, limit: int | None = None) -> int:
        """Remove expired entries, earliest expiry first (a delete event each); return how many.

        ``limit`` removes at most that many in this call, so a caller can spread a
        large backlog over short transactions instead of one long one.
        """
        ...

    def close(self) -> None:
        """Release the backend's resources; the store is unusable afterwards."""
        ...


#: An optional store capability (SQLite has it; etcd, a compare-then-commit store,
#: does not): read some keys and commit the transaction built from them under one
#: write lock (see :meth:`guardfab.store.sqlite.SqliteStore.locked_transaction`).
LockedTransaction = Callable[[Sequence[str], Callable[[dict[str, "Entry | None"]], "Txn"]], int]


@dataclass
class Txn:
    """A transaction being built, so several parties can add to one atomic write.

    The HGS builds its own state change (consume a nonce, record a host) in a
    ``Txn`` and hands it to :meth:`guardfab.store.audit.AuditLog.append`, which
    adds the audit record and commits both at once.
    """

    compares: builtins.list[Compare] = field(default_factory=builtins.list)
    puts: builtins.list[Put] = field(default_factory=builtins.list)
    deletes: builtins.list[str] = field(default_factory=builtins.list)

    def compare(self, key: str, expect: Condition) -> Txn:
        """Require ``key`` to satisfy ``expect``; return ``self`` for chaining."""
        self.compares.append(Compare(key, expect))
        return self

    def put(self, key: str, value: bytes, *, ttl: float | None = None) -> Txn:
        """Write ``key``; return ``self`` for chaining."""
        self.puts.append(Put(key, value, ttl))
        return self

    def delete(self, key: str) -> Txn:
        """Delete ``key`` (no-op if absent); return ``self`` for chaining."""
        self.deletes.append(key)
        return self

    def written_keys(self) -> set[str]:
        """Return every key this transaction puts or deletes."""
        return {put.key for put in self.puts} | set(self.deletes)

    def copy(self) -> Txn:
        """Return an independent copy (the operations are immutable tuples)."""
        return Txn(list(self.compares), list(self.puts), list(self.deletes))

    def commit(self, store: Store) -> int:
        """Run this transaction on ``store``; return the resulting revision."""
        return store.transaction(self.compares, self.puts, self.deletes)


#: Store keys: printable ASCII without spaces (checked in C: this runs for every key written).
_PRINTABLE_ASCII = re.compile(r"[!-~]*")


def check_key(key: object, *, what: str = "key") -> str:
    """Return ``key`` if it is an acceptable store key, else raise StoreUsageError."""
    if not isinstance(key, str) or not key:
        raise StoreUsageError(f"{what} must be a non-empty string")
    return check_prefix(key, what=what)


def check_prefix(prefix: object, *, what: str = "prefix") -> str:
    """Return ``prefix`` if it is printable ASCII (possibly empty), else raise."""
    if not isinstance(prefix, str):
        raise StoreUsageError(f"{what} must be a string")
    if len(prefix) > MAX_KEY_LENGTH:
        raise StoreUsageError(f"{what} is longer than {MAX_KEY_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(prefix):
        raise StoreUsageError(f"{what} must be printable ASCII without spaces")
    return prefix


def prefix_end(prefix: str) -> str | None:
    """Return the smallest key above every key starting with ``prefix`` (etcd range_end).

    ``None`` means "no upper bound" (the empty prefix). Keys are ASCII up to
    ``~``, so bumping the last character never overflows.
    """
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def check_value(value: object) -> bytes:
    """Return ``value`` if it is bytes of an acceptable size, else raise."""
    if not isinstance(value, bytes):
        raise StoreUsageError("value must be bytes")
    if len(value) > MAX_VALUE_BYTES:
        raise StoreUsageError(f"value of {len(value)} bytes is larger than {MAX_VALUE_BYTES}")
    return value


def check_ttl(ttl: object) -> float | None:
    """Return ``ttl`` as seconds (or ``None``) if it is positive and finite, else raise."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise StoreUsageError("ttl must be a number of seconds")
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_SECONDS):
        raise StoreUsageError(f"ttl must be more than 0 and at most {MAX_TTL_SECONDS:.0f} s")
    return float(ttl)


def check_condition(expect: object) -> Condition:
    """Return ``expect`` if it is ANY, ABSENT or a positive revision, else raise."""
    if isinstance(expect, Expect):
        return expect
    if isinstance(expect, bool) or not isinstance(expect, int) or expect < 1:
        raise StoreUsageError("expect must be ANY, ABSENT or a revision number >= 1")
    return expect


def check_start_revision(start_revision: object) -> int | None:
    """Return ``start_revision`` if it is ``None`` or a revision >= 1, else raise."""
    if start_revision is None:
        return None
    if isinstance(start_revision, bool) or not isinstance(start_revision, int):
        raise StoreUsageError("start_revision must be a revision number >= 1")
    if start_revision < 1:
        raise StoreUsageError("start_revision must be a revision number >= 1")
    return start_revision


def check_limit(limit: object) -> int | None:
    """Return ``limit`` if it is ``None`` or a positive int, else raise."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StoreUsageError("limit must be a positive integer")
    return limit


def describe_condition(expect: Condition) -> str:
    """Render a condition for an error message."""
    if isinstance(expect, Expect):
        return expect.value
    return f"revision {expect}"


def condition_holds(expect: Condition, current_revision: int | None) -> bool:
    """Tell whether ``expect`` holds for a key at ``current_revision`` (``None``: absent)."""
    if expect is ANY:
        return True
    if expect is ABSENT:
        return current_revision is None
    return current_revision == expect


def raise_conflict(key: str, expect: Condition, current_revision: int | None) -> None:
    """Raise the ConflictError for a failed ``expect`` on ``key``."""
    raise ConflictError(key, describe_condition(expect), current_revision)


def is_live(expires_at: float | None, now: float) -> bool:
    """Tell whether an entry expiring at ``expires_at`` is still visible at ``now``."""
    return expires_at is None or now < expires_at


@dataclass(frozen=True)
class CheckedTxn:
    """A transaction whose every key, value, TTL and condition was validated."""

    compares: tuple[Compare, ...]
    puts: tuple[Put, ...]
    deletes: tuple[str, ...]


def check_transaction(
    compares: Sequence[tuple[str, Condition]],
    puts: Sequence[tuple[str, bytes, float | None]],
    deletes: Sequence[str],
) -> CheckedTxn:
    """Validate a transaction before any backend touches it.

    Raises:
        StoreUsageError: a bad key, value, TTL or condition; more operations than
            :data:`MAX_TXN_OPS`; or one key written twice (etcd refuses that too).
    """
    if len(compares) > MAX_TXN_OPS or len(puts) + len(deletes) > MAX_TXN_OPS:
        raise StoreUsageError(f"a transaction holds at most {MAX_TXN_OPS} operations of a kind")
    checked_compares = tuple(Compare(check_key(k), check_condition(e)) for k, e in compares)
    checked_puts = tuple(Put(check_key(k), check_value(v), check_ttl(t)) for k, v, t in puts)
    checked_deletes = tuple(check_key(k) for k in deletes)
    written = [put.key for put in checked_puts] + list(checked_deletes)
    if len(set(written)) != len(written):
        raise StoreUsageError("a transaction must not write the same key twice")
    return CheckedTxn(checked_compares, checked_puts, checked_deletes)
