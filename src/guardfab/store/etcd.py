"""The etcd 3.4 backend: the store interface over a Raft-replicated cluster (ADR 0022).

Every guardfab key lives under a key prefix (a namespace), so several fabrics or
test runs can share one cluster. The mapping is ADR 0004's table; the parts that
are not one to one:

* **Expiry** is decided by a stamp stored with the value (:mod:`etcd_codec`) and
  the injected clock, like the other backends. Leases (``ceil(ttl)`` plus slack,
  shared by puts of the same TTL within a second) only collect the garbage.
* **Writes over an expired entry.** etcd keeps a key's ``create_revision`` until
  the key is deleted, so a write to a key that is physically there but expired by
  its stamp first deletes it (a revision compare, a delete event, one revision),
  then retries: the new entry gets a fresh ``create_revision`` as in memory.
  Each written key without a condition carries the compare ``lease == 0`` (true
  for an absent key and for one without TTL), so the common case is one round trip
  and a key with a TTL costs one more.
* **Conflicts** are named by reading every compared key in the failure branch of
  the same ``Txn`` and checking the conditions, in order, with the same clock time.
* **Revisions** are the cluster's: writes to other prefixes move them too.
* **compact_expired** finds expired entries through an expiry index that every
  TTL put writes beside the entry (:mod:`etcd_expiry`), not by reading the prefix.
"""

from __future__ import annotations

import builtins
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from guardfab.store.base import (
    ABSENT,
    ANY,
    MAX_TXN_OPS,
    CheckedTxn,
    Condition,
    Entry,
    check_key,
    check_limit,
    check_prefix,
    check_start_revision,
    check_transaction,
    condition_holds,
    is_live,
    raise_conflict,
)
from guardfab.store.errors import StoreError, StoreUsageError
from guardfab.store.etcd_codec import (
    StoredKey,
    as_int,
    b64,
    encode_value,
    live_threshold,
    parse_kv,
    unb64,
)
from guardfab.store.etcd_expiry import INDEX_ROOT, ExpiredEntry, find_expired, index_key
from guardfab.store.etcd_gateway import CODE_NOT_FOUND, EtcdGateway, EtcdRequestError
from guardfab.store.etcd_watch import EtcdWatch, range_end_of

#: etcd's default ``--max-request-bytes`` (1.5 MiB).
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
#: Seconds a lease outlives the TTL it serves: covers the request's latency, the
#: lease's reuse window and modest clock skew, so no lease ends before its stamp.
LEASE_SLACK_SECONDS = 5
#: Puts of the same whole-second TTL share one lease for this long.
LEASE_REUSE_SECONDS = 1.0
#: Attempts of one transaction when expired entries or TTL keys need a second look.
MAX_ATTEMPTS = 16
_PAGE = 256
_OP_OVERHEAD_BYTES = 64


@dataclass(frozen=True)
class Snapshot:
    """Every live entry under a prefix as of one etcd revision."""

    revision: int
    entries: list[Entry]


@dataclass
class _Plan:
    """One attempt of a transaction, in etcd's terms."""

    compares: list[dict[str, Any]] = field(default_factory=list)
    success: list[dict[str, Any]] = field(default_factory=list)
    read_keys: list[str] = field(default_factory=list)
    #: Expiry index keys of TTL entries this transaction replaces or deletes.
    old_index_keys: list[bytes] = field(default_factory=list)
    size: int = 0


class EtcdStore:
    """A :class:`~guardfab.store.base.Store` on an etcd 3.4 cluster via its JSON gateway.

    Args:
        endpoints: Client URLs of the cluster's members (``https://10.0.0.1:2379``).
        prefix: Key prefix of this store; keep one per fabric.
        ca_file: CA bundle for ``https`` endpoints.
        cert_file: Client certificate, if the members require one.
        key_file: Its private key.
        username: etcd user, if the cluster has authentication on.
        password: That user's password.
        timeout: Seconds per request, failover between members included.
        clock: Wall-clock seconds; decides expiry, as in the other backends.
        max_txn_ops: The cluster's ``--max-txn-ops``. A guardfab transaction of n
            operations can need up to 3n etcd compares; larger ones are refused
            before they are sent. Run etcd with ``--max-txn-ops 512`` to accept
            everything the interface does.
        max_request_bytes: The cluster's ``--max-request-bytes``.
    """

    #: Every call waits on the network (one or more round trips to a member, seconds
    #: during an election): an HGS runs its requests on threads instead of its event
    #: loop (:attr:`guardfab.hgs.service.HgsService.store_threads`). The local
    #: backends lack it.
    waits_on_network: ClassVar[bool] = True

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "guardfab/",
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        max_txn_ops: int = MAX_TXN_OPS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self._namespace = check_prefix(prefix, what="etcd key prefix").encode("ascii")
        self._gateway = EtcdGateway(
            endpoints,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            username=username,
            password=password,
            timeout=timeout,
        )
        self._clock = clock
        self._max_txn_ops = max_txn_ops
        self._max_request_bytes = max_request_bytes
        self._leases: dict[int, tuple[int, float]] = {}
        self._lease_lock = threading.Lock()
        self._watches: weakref.WeakSet[EtcdWatch] = weakref.WeakSet()
        self._closed = False

    @property
    def endpoints(self) -> builtins.list[str]:
        """The members' client URLs, as normalized."""
        return list(self._gateway.endpoints)

    # --- reads ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUsageError("the store is closed")

    def _full(self, key: str) -> str:
        return b64(self._namespace + key.encode("ascii"))

    def _call(
        self, path: str, body: dict[str, Any], what: str, *, idempotent: bool
    ) -> dict[str, Any]:
        self._check_open()
        return self._gateway.call(path, body, what=what, idempotent=idempotent)

    def current_revision(self) -> int:
        """Return the cluster's revision (writes under other prefixes count too)."""
        body = {"key": b64(self._namespace or b"\x00"), "count_only": True}
        answer = self._call("/v3/kv/range", body, "a revision read", idempotent=True)
        return as_int(answer.get("header", {}).get("revision"))

    def get(self, key: str) -> Entry | None:
        """Return the live entry at ``key``, or ``None`` if absent or expired."""
        check_key(key)
        answer = self._call("/v3/kv/range", {"key": self._full(key)}, "a read", idempotent=True)
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        return _live_entry(parse_kv(kvs[0], self._namespace), self._clock())

    def list(
        self, prefix: str, *, start: str | None = None, limit: int | None = None
    ) -> builtins.list[Entry]:
        """Return live entries under ``prefix`` sorted by key, from ``start`` on.

        Pages are read at the revision of the first page, so the result is one
        consistent snapshot however many pages it takes.
        """
        return self._read_range(prefix, start=start, limit=limit)[1]

    def snapshot(self, prefix: str = "", *, page: int = _PAGE) -> Snapshot:
        """Return every live entry under ``prefix`` as of one revision, and that revision.

        A backup needs this: every page is read at the revision the first one
        was read at, so an entry written meanwhile is in no page, and two entries
        one transaction wrote are both old or both new. If etcd compacts that
        revision before the last page, the read fails (``StoreError``) rather than
        mixing revisions.
        """
        if page < 1:
            raise StoreUsageError("a snapshot page holds at least one key")
        revision, entries = self._read_range(prefix, start=None, limit=None, page=page)
        return Snapshot(revision, entries)

    def _read_range(
        self, prefix: str, *, start: str | None, limit: int | None, page: int = _PAGE
    ) -> tuple[int, builtins.list[Entry]]:
        check_prefix(prefix)
        low = max(prefix, check_prefix(start, what="start")) if start is not None else prefix
        limit = check_limit(limit)
        now = self._clock()
        end = b64(range_end_of(self._namespace, prefix))
        body: dict[str, Any] = {"key": self._full(low), "range_end": end, "limit": page}
        entries: builtins.list[Entry] = []
        while True:
            answer = self._call("/v3/kv/range", body, "a list", idempotent=True)
            # The first page fixes the revision; every later page is read at it.
            body.setdefault("revision", as_int(answer.get("header", {}).get("revision")))
            kvs = answer.get("kvs") or []
            for kv in kvs:
                entry = _live_entry(parse_kv(kv, self._namespace), now)
                if entry is not None:
                    entries.append(entry)
                    if limit is not None and len(entries) >= limit:
                        return body["revision"], entries
            if not answer.get("more") or not kvs:
                return body["revision"], entries
            body["key"] = b64(_after(kvs[-1]))

    def stored_keys(self) -> int:
        """Return how many keys this store's prefix physically holds, expired ones included.

        Counts the expiry index keys of the prefix too: a restore refuses a prefix
        where this is not 0, since nothing there may be mixed with a backup.
        """
        ranges = [
            (self._namespace or b"\x00", range_end_of(self._namespace, "")),
            (INDEX_ROOT + self._namespace, _end_of_bytes(INDEX_ROOT + self._namespace)),
        ]
        total = 0
        for key, end in ranges:
            body = {"key": b64(key), "range_end": b64(end), "count_only": True}
            answer = self._call("/v3/kv/range", body, "a key count", idempotent=True)
            total += as_int(answer.get("count"))
        return total

    # --- writes --------------------------------------------------------------

    def put(
        self, key: str, value: bytes, *, expect: Condition = ANY, ttl: float | None = None
    ) -> int:
        """Write ``key`` if ``expect`` holds; return the new revision."""
        compares = [] if expect is ANY else [(key, expect)]
        return self.transaction(compares, [(key, value, ttl)], [])

    def delete(self, key: str, *, expect: Condition = ANY) -> bool:
        """Delete ``key`` if ``expect`` holds; return whether a live key was removed."""
        compares = [] if expect is ANY else [(key, expect)]
        return self._transact(check_transaction(compares, [], [key]))[1] > 0

    def transaction(
        self,
        compares: Sequence[tuple[str, Condition]] = (),
        puts: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> int:
        """Apply every put and delete if every compare holds; return the revision."""
        return self._transact(check_transaction(compares, puts, deletes))[0]

    def _transact(self, txn: CheckedTxn) -> tuple[int, int]:
        """Run ``txn`` until it commits or a condition fails; return (revision, deleted)."""
        self._check_open()
        known: dict[str, StoredKey | None] = {}
        for _attempt in range(MAX_ATTEMPTS):
            now = self._clock()
            plan = self._plan(txn, known, now)
            try:
                answer = self._send_txn(plan)
            except EtcdRequestError as exc:
                if exc.code == CODE_NOT_FOUND and "lease" in exc.etcd_message:
                    self._forget_leases()
                    continue
                raise
            if answer.get("succeeded"):
                return _revision(answer), _deleted(answer)
            reads = self._reads(plan.read_keys, answer)
            _raise_first_conflict(txn, reads, now)
            self._remove_expired_in_the_way(txn, reads, now)
            known = reads
        raise StoreError(
            f"a transaction on etcd gave up after {MAX_ATTEMPTS} attempts: its keys kept "
            "changing under it"
        )

    def _plan(self, txn: CheckedTxn, known: dict[str, StoredKey | None], now: float) -> _Plan:
        plan = _Plan()
        guarded: set[str] = set()
        for key, expect in txn.compares:
            if expect is ABSENT:
                plan.compares.append(_compare(self._full(key), "CREATE", 0))
                guarded.add(key)
            elif isinstance(expect, int):
                plan.compares.append(_compare(self._full(key), "MOD", expect))
                plan.compares.append(_alive(self._full(key), now))
                guarded.add(key)
        skipped = self._guard_written_keys(txn, known, now, guarded, plan)
        new_index_keys = self._add_puts(txn, now, plan)
        for key in txn.deletes:
            if key not in skipped:
                plan.success.append({"request_delete_range": {"key": self._full(key)}})
        for raw in plan.old_index_keys:
            if raw not in new_index_keys:
                plan.success.append({"request_delete_range": {"key": b64(raw)}})
        plan.read_keys = list(
            dict.fromkeys([k for k, e in txn.compares if e is not ANY] + sorted(guarded))
        )
        plan.size += sum(len(k) + _OP_OVERHEAD_BYTES for k in plan.read_keys)
        self._check_size(plan)
        return plan

    def _add_puts(self, txn: CheckedTxn, now: float, plan: _Plan) -> set[bytes]:
        """Add the puts (a TTL one with its expiry index key); return those index keys."""
        index_keys: set[bytes] = set()
        for key, value, ttl in txn.puts:
            expires_at = None if ttl is None else now + ttl
            put: dict[str, Any] = {
                "key": self._full(key),
                "value": b64(encode_value(value, expires_at)),
            }
            if expires_at is not None and ttl is not None:
                lease = self._lease(ttl)
                put["lease"] = lease
                raw = index_key(self._namespace, key, expires_at)
                index_keys.add(raw)
                plan.success.append({"request_put": {"key": b64(raw), "lease": lease}})
            plan.success.append({"request_put": put})
            plan.size += len(value) + 2 * len(key) + _OP_OVERHEAD_BYTES
        return index_keys

    def _guard_written_keys(
        self,
        txn: CheckedTxn,
        known: dict[str, StoredKey | None],
        now: float,
        guarded: set[str],
        plan: _Plan,
    ) -> set[str]:
        """Add the compares that keep writes off expired entries; return deletes to skip.

        Without knowledge a written key must have no lease (absent, or no TTL). A key
        read live last time must still be that entry and live; a delete of a key read
        expired is dropped (memory would delete nothing) while the key stays as read.
        """
        skipped: set[str] = set()
        put_keys = {put.key for put in txn.puts}
        for key in sorted(txn_written(txn) - guarded):
            stored = known.get(key)
            full = self._full(key)
            if stored is None:
                plan.compares.append(_compare(full, "LEASE", 0))
            elif is_live(stored.expires_at, now):
                plan.compares.append(_compare(full, "MOD", stored.mod_revision))
                plan.compares.append(_alive(full, now))
                if stored.expires_at is not None:
                    plan.old_index_keys.append(index_key(self._namespace, key, stored.expires_at))
            elif key not in put_keys:
                plan.compares.append(_compare(full, "MOD", stored.mod_revision))
                skipped.add(key)
            else:
                plan.compares.append(_compare(full, "LEASE", 0))
            guarded.add(key)
        return skipped

    def _check_size(self, plan: _Plan) -> None:
        biggest = max(len(plan.compares), len(plan.success), len(plan.read_keys))
        if biggest > self._max_txn_ops:
            raise StoreUsageError(
                f"this transaction needs {biggest} etcd operations of a kind; the store was "
                f"told the cluster allows {self._max_txn_ops} (etcd --max-txn-ops)"
            )
        if plan.size > self._max_request_bytes:
            raise StoreUsageError(
                f"this transaction is about {plan.size} bytes; etcd accepts requests of at "
                f"most {self._max_request_bytes} bytes (--max-request-bytes)"
            )

    def _send_txn(self, plan: _Plan) -> dict[str, Any]:
        body = {
            "compare": plan.compares,
            "success": plan.success,
            "failure": [{"request_range": {"key": self._full(k)}} for k in plan.read_keys],
        }
        return self._call("/v3/kv/txn", body, "a transaction", idempotent=False)

    def _reads(
        self, keys: builtins.list[str], answer: dict[str, Any]
    ) -> dict[str, StoredKey | None]:
        """Pair the failure branch's range answers with the keys they read."""
        responses = answer.get("responses") or []
        if len(responses) != len(keys):
            raise StoreError("etcd answered a failed transaction without its reads")
        reads: dict[str, StoredKey | None] = {}
        for key, response in zip(keys, responses, strict=True):
            kvs = (response.get("response_range") or {}).get("kvs") or []
            reads[key] = parse_kv(kvs[0], self._namespace) if kvs else None
        return reads

    def _remove_expired_in_the_way(
        self, txn: CheckedTxn, reads: dict[str, StoredKey | None], now: float
    ) -> None:
        """Delete expired entries that an ABSENT compare or a put must not see."""
        in_the_way = {k for k, e in txn.compares if e is ABSENT} | {p.key for p in txn.puts}
        expired = [
            ExpiredEntry(key, stored.mod_revision, stored.expires_at)
            for key, stored in reads.items()
            if stored is not None
            and stored.expires_at is not None
            and key in in_the_way
            and not is_live(stored.expires_at, now)
        ]
        if expired:
            self._delete_expired(expired)
            for entry in expired:
                reads[entry.key] = None

    def _delete_expired(
        self, entries: Sequence[ExpiredEntry], stale_index_keys: Sequence[bytes] = ()
    ) -> bool:
        """Delete entries still at their revisions, with their index keys, in one revision."""
        deletes = [self._full(e.key) for e in entries] + [
            b64(index_key(self._namespace, e.key, e.expires_at)) for e in entries
        ]
        deletes += [b64(raw) for raw in stale_index_keys]
        body = {
            "compare": [_compare(self._full(e.key), "MOD", e.mod_revision) for e in entries],
            "success": [{"request_delete_range": {"key": key}} for key in deletes],
            "failure": [],
        }
        answer = self._call("/v3/kv/txn", body, "an expiry clean-up", idempotent=False)
        return bool(answer.get("succeeded"))

    # --- leases --------------------------------------------------------------

    def _lease(self, ttl: float) -> int:
        """Return a lease that outlives ``ttl`` from now, granting one if needed."""
        seconds = math.ceil(ttl)
        with self._lease_lock:
            cached = self._leases.get(seconds)
            if cached is not None and time.monotonic() - cached[1] < LEASE_REUSE_SECONDS:
                return cached[0]
        asked_at = time.monotonic()
        body = {"TTL": seconds + LEASE_SLACK_SECONDS + math.ceil(LEASE_REUSE_SECONDS)}
        answer = self._call("/v3/lease/grant", body, "a lease grant", idempotent=True)
        lease = as_int(answer.get("ID"))
        if not lease:
            raise StoreError("etcd granted a lease without an ID")
        with self._lease_lock:
            self._leases[seconds] = (lease, asked_at)
        return lease

    def _forget_leases(self) -> None:
        with self._lease_lock:
            self._leases.clear()

    # --- watch, expiry, lifecycle --------------------------------------------

    def watch(self, prefix: str, *, start_revision: int | None = None) -> EtcdWatch:
        """Watch changes under ``prefix`` from ``start_revision`` (default: the next)."""
        check_prefix(prefix)
        start = check_start_revision(start_revision)
        self._check_open()
        watch = EtcdWatch(self._gateway, self._namespace, prefix, start)
        self._watches.add(watch)
        return watch

    def compact_expired(self, *, limit: int | None = None) -> int:
        """Delete entries expired by their stamp, earliest first; return how many.

        etcd's leases would remove them too, but seconds later and on the server's
        clock; this deletes what the injected clock says is gone, found through the
        expiry index (:mod:`etcd_expiry`), with a revision compare each so a
        concurrent rewrite survives, at most MAX_TXN_OPS per revision (half the
        cluster's max_txn_ops if that is less: each removal is two deletes).
        """
        limit = check_limit(limit)
        self._check_open()
        chunk = max(1, min(MAX_TXN_OPS, self._max_txn_ops // 2))
        removed = 0
        for _attempt in range(MAX_ATTEMPTS):
            wanted = None if limit is None else limit - removed
            scan = find_expired(
                self._call_positional, self._namespace, self._clock(), limit=wanted, page=chunk
            )
            stale = scan.stale_index_keys[: max(0, self._max_txn_ops - 2 * chunk)]
            for offset in range(0, len(scan.expired), chunk):
                batch = scan.expired[offset : offset + chunk]
                if not self._delete_expired(batch, stale if offset == 0 else ()):
                    break  # one of them changed meanwhile: look again
                removed += len(batch)
            else:
                return removed
        return removed

    def _call_positional(
        self, path: str, body: dict[str, Any], what: str, idempotent: bool
    ) -> dict[str, Any]:
        return self._call(path, body, what, idempotent=idempotent)

    def close(self) -> None:
        """Stop every watch and close the connections; later calls raise StoreUsageError."""
        self._closed = True
        for watch in list(self._watches):
            watch.cancel()
        self._gateway.close()


def txn_written(txn: CheckedTxn) -> set[str]:
    """Return every key ``txn`` puts or deletes."""
    return {put.key for put in txn.puts} | set(txn.deletes)


def _compare(full_key: str, target: str, number: int) -> dict[str, Any]:
    field_name = {"CREATE": "create_revision", "MOD": "mod_revision", "LEASE": "lease"}[target]
    return {"key": full_key, "target": target, "result": "EQUAL", field_name: number}


def _alive(full_key: str, now: float) -> dict[str, Any]:
    """The compare that holds when the key exists and its stamp is later than ``now``."""
    return {
        "key": full_key,
        "target": "VALUE",
        "result": "GREATER",
        "value": b64(live_threshold(now)),
    }


def _live_entry(stored: StoredKey, now: float) -> Entry | None:
    if not is_live(stored.expires_at, now):
        return None
    return Entry(
        stored.key, stored.payload, stored.mod_revision, stored.create_revision, stored.expires_at
    )


def _raise_first_conflict(txn: CheckedTxn, reads: dict[str, StoredKey | None], now: float) -> None:
    """Raise the ConflictError memory would raise: the first condition, in order, that fails."""
    for key, expect in txn.compares:
        if expect is ANY:
            continue
        stored = reads[key]
        live = stored is not None and is_live(stored.expires_at, now)
        current = stored.mod_revision if stored is not None and live else None
        if not condition_holds(expect, current):
            raise_conflict(key, expect, current)


def _after(kv: dict[str, Any]) -> bytes:
    return unb64(kv.get("key")) + b"\x00"


def _end_of_bytes(key: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``key`` (which ends below 0xff)."""
    return key[:-1] + bytes([key[-1] + 1])


def _revision(answer: dict[str, Any]) -> int:
    return as_int(answer.get("header", {}).get("revision"))


def _deleted(answer: dict[str, Any]) -> int:
    return sum(
        as_int((response.get("response_delete_range") or {}).get("deleted"))
        for response in answer.get("responses") or []
    )
