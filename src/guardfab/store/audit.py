"""The append-only, hash-chained audit log, kept in any :class:`~guardfab.store.base.Store`.

Layout under the prefix (default ``audit/``)::

    audit/00000000000000000001   record 1 (canonical JSON, see audit_chain)
    audit/00000000000000000002   record 2, whose prev = hash(record 1)
    ...
    audit/head                   {"seq": N, "hash": hash(record N)}

An append writes record N+1 and moves the head in one transaction that
compares the head's revision (and that record N+1 is absent). Two appenders
racing -- threads, processes, or HGS nodes on etcd -- cannot both win: the loser
gets a ConflictError on the head, re-reads it and retries, so the chain never
forks and no record is lost. A store that can read and commit under one write lock
(SQLite's ``locked_transaction``) reads the head inside the append's transaction:
no race can be lost there, and the compare stays as a second guard.

The HGS usually has its own state change to make in the same breath (consume a
nonce, record a host's new certificate). It builds a :class:`~guardfab.store.base.Txn`
and passes it as ``txn=``; the state change and the audit record then commit
together or not at all, and a conflict on the caller's own keys (a replayed
nonce) is raised at once instead of retried::

    txn = Txn().compare(nonce_key, ABSENT).put(nonce_key, b"", ttl=nonce_ttl)
    audit.append(kind="attestation", actor=host_id, subject=host_id,
                 outcome="success", details={"policies": passed}, txn=txn)
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from guardfab.errors import FormatError
from guardfab.formats import jose
from guardfab.store.audit_chain import (
    EMPTY_HEAD,
    AuditCheckpoint,
    AuditEvent,
    AuditHead,
    AuditRecord,
    AuditReport,
    ChainVerifier,
    format_time,
)
from guardfab.store.base import (
    ABSENT,
    MAX_TXN_OPS,
    Entry,
    LockedTransaction,
    Store,
    Txn,
    check_prefix,
    check_transaction,
    describe_condition,
)
from guardfab.store.errors import AuditChainError, ConflictError, StoreError, StoreUsageError
from guardfab.store.group_commit import GroupCommit, Pending

#: Where the audit log lives unless told otherwise.
AUDIT_PREFIX = "audit/"
#: Appends give up after this many lost races (each costs one read and one
#: failed transaction; see the ADR for measured contention).
DEFAULT_MAX_ATTEMPTS = 64
#: Most concurrent appends committed in one transaction (etcd's 128-operation
#: limit caps it further for callers with large transactions).
DEFAULT_MAX_BATCH = 32
#: Entries read per store call while walking the log.
PAGE_SIZE = 512
_SEQ_DIGITS = 20


@dataclass(frozen=True)
class AppendRequest:
    """One record to append with :meth:`AuditLog.append_many` (fields as for ``append``)."""

    kind: str
    actor: str
    subject: str
    outcome: str
    details: dict[str, object] | None = None
    txn: Txn | None = None


#: A place in append_many's results not filled yet (every one is before it returns).
_NOT_YET = StoreError("the audit append was not committed")


class AuditLog:
    """Appends to, reads and checkpoints the audit chain in ``store``.

    Args:
        store: Any Store; the log shares its transactions with the caller's state.
        clock: Wall-clock seconds for record times (injected for tests).
        prefix: Key prefix of the log; must end with ``/``.
        max_attempts: Lost head races tolerated per append before StoreError.
        max_batch: Most appends group-committed in one store transaction.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = AUDIT_PREFIX,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if not check_prefix(prefix).endswith("/"):
            raise StoreUsageError("the audit prefix must end with '/'")
        if max_attempts < 1 or max_batch < 1:
            raise StoreUsageError("max_attempts and max_batch must be at least 1")
        self._store = store
        self._clock = clock
        self.prefix = prefix
        self.head_key = prefix + "head"
        self._max_attempts = max_attempts
        self._max_batch = max_batch
        self._group: GroupCommit[_Append] = GroupCommit(self._select, self._commit_batch)
        # A store that can read the head and commit under one write lock (SQLite)
        # never loses a head race: no retry, no separate read of the head.
        self._locked_transaction: LockedTransaction | None = getattr(
            store, "locked_transaction", None
        )

    def record_key(self, seq: int) -> str:
        """Return the key of record ``seq``."""
        return record_key(self.prefix, seq)

    def head(self) -> AuditHead:
        """Return the current head (seq 0 and the genesis hash for an empty log)."""
        entry = self._store.get(self.head_key)
        return EMPTY_HEAD if entry is None else AuditHead.from_bytes(entry.value)

    def append(
        self,
        *,
        kind: str,
        actor: str,
        subject: str,
        outcome: str,
        details: dict[str, object] | None = None,
        txn: Txn | None = None,
    ) -> AuditRecord:
        """Append one record, atomically with ``txn`` if given; return the record.

        Concurrent calls on one AuditLog are group-committed: they may share a
        store transaction, but each caller's ``txn`` is still all-or-nothing, and
        a failed compare in one caller's ``txn`` fails only that caller.

        Raises:
            StoreUsageError: a field is malformed, details look secret, or ``txn``
                is invalid, too large, or touches the audit prefix.
            ConflictError: one of the caller's own compares in ``txn`` failed;
                nothing of it was written.
            AuditChainError: the head is corrupt, or a record already sits
                beyond it (someone rewound the head): appending would fork.
            StoreError: the store failed, or the head stayed contended for
                ``max_attempts`` tries.
        """
        request = self._request(AppendRequest(kind, actor, subject, outcome, details, txn))
        self._group.submit(request)
        return request.outcome()

    def append_many(self, requests: Sequence[AppendRequest]) -> list[AuditRecord | Exception]:
        """Append several records queued together; each result is a record or its error.

        Compatible requests share store transactions (as concurrent :meth:`append`
        calls do), so an event loop that collected a turn's appends commits them
        with one ``COMMIT``. Each request keeps :meth:`append`'s guarantees and
        errors, returned in its place instead of raised: one request's failed
        compare or bad field fails only that request.
        """
        results: list[AuditRecord | Exception] = []
        queued: list[tuple[int, _Append]] = []
        for request in requests:
            try:
                queued.append((len(results), self._request(request)))
            except StoreUsageError as exc:
                results.append(exc)
            else:
                results.append(_NOT_YET)
        self._group.submit_many([pending for _, pending in queued])
        for index, pending in queued:
            try:
                results[index] = pending.outcome()
            except Exception as exc:  # noqa: BLE001 -- returned in the request's place
                results[index] = exc
        return results

    def _request(self, request: AppendRequest) -> _Append:
        """Validate one request into a queued append (StoreUsageError if malformed)."""
        event = AuditEvent(
            request.kind, request.actor, request.subject, request.outcome,
            dict(request.details or {}),
        )  # fmt: skip
        pending = _Append(event, Txn() if request.txn is None else request.txn.copy())
        if any(key.startswith(self.prefix) for key in pending.compared | pending.written):
            raise StoreUsageError("the caller's transaction must not touch the audit log")
        return pending

    def _select(self, queue: deque[_Append]) -> list[_Append]:
        """Take the next batch: requests whose keys cannot interfere, within etcd's op limit.

        A request joins only if it writes no key that the batch compares or
        writes, and compares no key the batch writes. All compares of one
        transaction see the state before any of its writes; with no key read by
        one request and written by another, the batch gives the same result as
        running its requests one after another in any order (no write skew).
        Requests left out stay queued, in order, for the next batch.
        """
        batch: list[_Append] = []
        skipped: list[_Append] = []
        compared: set[str] = set()
        written: set[str] = set()
        compares = writes = 1  # the head's compare and put
        while queue:
            request = queue.popleft()
            fits = (
                len(batch) < self._max_batch
                and compares + request.compare_ops <= MAX_TXN_OPS
                and writes + request.write_ops <= MAX_TXN_OPS
                and not request.written & (compared | written)
                and not request.compared & written
            )
            if not fits:
                skipped.append(request)
                continue
            batch.append(request)
            compared |= request.compared
            written |= request.written
            compares += request.compare_ops
            writes += request.write_ops
        queue.extend(skipped)
        return batch

    def _commit_batch(self, batch: list[_Append]) -> None:
        """Commit ``batch``, dropping requests whose own compares fail, retrying head races."""
        lost_races = 0
        while batch:
            try:
                records = self._try_commit(batch)
            except ConflictError as exc:
                if exc.key != self.head_key:
                    batch = self._drop_failed(batch, exc)
                    continue
                lost_races += 1
                if lost_races >= self._max_attempts:
                    raise StoreError(
                        f"audit append lost the head race {lost_races} times",
                        hint="the store is overloaded; retry later or add HGS capacity",
                    ) from exc
                # Jitter, not security: spreads racing appenders apart.
                time.sleep(random.uniform(0, min(0.0002 * 2**lost_races, 0.02)))  # noqa: S311
                continue
            for request, record in zip(batch, records, strict=True):
                request.resolve(record)
            return

    def _try_commit(self, batch: list[_Append]) -> list[AuditRecord]:
        locked = self._locked_transaction
        if locked is None:
            txn, records = self._batch_txn(batch, self._store.get(self.head_key))
            txn.commit(self._store)
            return records
        built: list[AuditRecord] = []

        def build(entries: dict[str, Entry | None]) -> Txn:
            txn, records = self._batch_txn(batch, entries[self.head_key])
            built[:] = records
            return txn

        locked([self.head_key], build)
        return built

    def _batch_txn(
        self, batch: list[_Append], entry: Entry | None
    ) -> tuple[Txn, list[AuditRecord]]:
        """The batch's transactions, its records linked after head ``entry``, the head moved."""
        head = EMPTY_HEAD if entry is None else AuditHead.from_bytes(entry.value)
        txn = Txn()
        for request in batch:
            txn.compares += request.txn.compares
            txn.puts += request.txn.puts
            txn.deletes += request.txn.deletes
        # The head's compare goes before the records': a lost head race must read
        # as a race, not as a record found beyond the head.
        txn.compare(self.head_key, ABSENT if entry is None else entry.revision)
        records: list[AuditRecord] = []
        prev, now = head, self._clock()
        for request in batch:
            record = request.event.link(seq=prev.seq + 1, time=now, prev=prev.hash)
            key = self.record_key(record.seq)
            txn.compare(key, ABSENT).put(key, record.to_bytes())
            records.append(record)
            prev = AuditHead(record.seq, record.hash)
        txn.put(self.head_key, prev.to_bytes())
        return txn, records

    def _drop_failed(self, batch: list[_Append], exc: ConflictError) -> list[_Append]:
        """Fail the request whose own compare failed; return the rest to retry.

        Raises:
            AuditChainError: the failed compare is on a record key (a fork).
        """
        if exc.key.startswith(self.prefix):
            raise AuditChainError(
                "a record already exists beyond the head; refusing to fork the chain",
                seq=parse_record_key(self.prefix, exc.key),
                reason="beyond-head",
            ) from exc
        for index, request in enumerate(batch):
            if any(
                key == exc.key and describe_condition(expect) == exc.expected
                for key, expect in request.txn.compares
            ):
                request.fail(exc)
                return batch[:index] + batch[index + 1 :]
        raise exc

    def iter_records(self, since_seq: int = 0) -> Iterator[AuditRecord]:
        """Yield the records after ``since_seq`` in order, parsed but not verified.

        Use :func:`verify` for integrity; this is for reading and exporting.

        Raises:
            AuditChainError: a record does not parse (reason ``malformed``).
        """
        for entry in walk(self._store, self.prefix, start=self.record_key(since_seq + 1)):
            seq = parse_record_key(self.prefix, entry.key)
            if seq is None:
                continue
            try:
                yield AuditRecord.from_bytes(entry.value, what=f"audit record {seq}")
            except FormatError as exc:
                raise AuditChainError(str(exc), seq=seq, reason="malformed") from exc

    def checkpoint(self, signing_key: jose.AsymmetricKey) -> str:
        """Return a signed checkpoint of the current head, to keep outside the store.

        A checkpoint held elsewhere (a log collector, an auditor's mailbox) is what
        makes cutting records off the tail detectable.
        """
        head = self.head()
        return AuditCheckpoint(head.seq, head.hash, format_time(self._clock())).sign(signing_key)

    def verify(
        self,
        *,
        checkpoint: str | None = None,
        checkpoint_key: jose.AsymmetricKey | None = None,
    ) -> AuditReport:
        """Verify this log; see :func:`verify`."""
        return verify(
            self._store, prefix=self.prefix, checkpoint=checkpoint, checkpoint_key=checkpoint_key
        )


def record_key(prefix: str, seq: int) -> str:
    """Return the key of record ``seq`` under ``prefix`` (zero-padded, so keys sort)."""
    return f"{prefix}{seq:0{_SEQ_DIGITS}d}"


def parse_record_key(prefix: str, key: str) -> int | None:
    """Return the record number of ``key``, or ``None`` if it is not a record key."""
    suffix = key[len(prefix) :] if key.startswith(prefix) else ""
    if len(suffix) != _SEQ_DIGITS or not suffix.isascii() or not suffix.isdigit():
        return None
    seq = int(suffix)
    return seq if seq >= 1 else None


def walk(
    store: Store, prefix: str, *, start: str | None = None, page_size: int = PAGE_SIZE
) -> Iterator[Entry]:
    """Yield every live entry under ``prefix`` from ``start`` on, a page at a time."""
    if page_size < 2:
        raise StoreUsageError("page_size must be at least 2")
    last: str | None = None
    while True:
        page = store.list(prefix, start=start, limit=page_size)
        for entry in page:
            if entry.key != last:
                yield entry
        if len(page) < page_size:
            return
        # ``start`` is inclusive: re-read the last key and skip it, which stays
        # correct for keys of any length.
        start = last = page[-1].key


def verify(
    store: Store,
    *,
    prefix: str = AUDIT_PREFIX,
    checkpoint: str | None = None,
    checkpoint_key: jose.AsymmetricKey | None = None,
) -> AuditReport:
    """Walk the whole chain in ``store``; raise at the first record that does not verify.

    Args:
        store: The store holding the log.
        prefix: The log's key prefix.
        checkpoint: A signed checkpoint (from :meth:`AuditLog.checkpoint`) the
            log must still contain; this is what catches a cut-off tail.
        checkpoint_key: The key that signed ``checkpoint``.

    Raises:
        AuditChainError: naming the first broken ``seq`` and a ``reason``.
        VerificationError: the checkpoint's signature does not verify.
        StoreError: the store failed.
    """
    verified: AuditCheckpoint | None = None
    if checkpoint is not None:
        if checkpoint_key is None:
            raise StoreUsageError("a checkpoint needs the key that signed it")
        verified = AuditCheckpoint.verify(checkpoint, checkpoint_key)
    head_key = prefix + "head"
    snapshot = store.current_revision()
    head_entry = store.get(head_key)
    head = None if head_entry is None else AuditHead.from_bytes(head_entry.value)
    verifier = ChainVerifier(head, snapshot, verified)
    for entry in walk(store, prefix):
        if entry.key == head_key:
            continue
        seq = parse_record_key(prefix, entry.key)
        if seq is None:
            raise AuditChainError(
                f"unexpected key {entry.key!r} in the audit log", seq=None, reason="unexpected-key"
            )
        verifier.feed(seq, entry.value, entry.revision)
    return verifier.finish()


class _Append(Pending[AuditRecord]):
    """One caller's append waiting to be group-committed."""

    def __init__(self, event: AuditEvent, txn: Txn) -> None:
        super().__init__()
        # Validate alone, so one caller's bad request never fails a shared batch.
        check_transaction(txn.compares, txn.puts, txn.deletes)
        self.event = event
        self.txn = txn
        self.compared = frozenset(compare.key for compare in txn.compares)
        self.written = frozenset(txn.written_keys())
        self.compare_ops = len(txn.compares) + 1  # + "record key absent"
        self.write_ops = len(txn.puts) + len(txn.deletes) + 1  # + the record
        if self.compare_ops >= MAX_TXN_OPS or self.write_ops >= MAX_TXN_OPS:
            raise StoreUsageError("the caller's transaction leaves no room for the audit record")
