"""The audit chain under attack, and under concurrent appenders.

The tampering table follows python-tuf's attack tables: each row changes the
stored log the way someone with write access to the store file could, and
names the reason and the sequence number that ``verify`` must report. Rows
that keep the chain self-consistent (cutting the tail and rewinding the head)
are caught only against a signed checkpoint, and the table says so.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from joserfc.jwk import ECKey

from guardfab.errors import FormatError, VerificationError
from guardfab.formats.encoding import canonical_json
from guardfab.store import (
    ABSENT,
    AuditChainError,
    AuditLog,
    ConflictError,
    MemoryStore,
    SqliteStore,
    Store,
    StoreUsageError,
    Txn,
    verify,
)
from guardfab.store.audit import record_key, walk
from guardfab.store.audit_chain import GENESIS_HASH, AuditCheckpoint, AuditHead, AuditRecord

SPAWN = multiprocessing.get_context("spawn")
T0 = 1_800_000_000.0


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    backend: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "s.db")
    yield backend
    backend.close()


def fill(store: Store, count: int = 5) -> AuditLog:
    log = AuditLog(store, clock=lambda: T0)
    for i in range(1, count + 1):
        log.append(
            kind="attestation",
            actor=f"host-{i}",
            subject=f"host-{i}",
            outcome="success" if i % 2 else "failure",
            details={"failed": [] if i % 2 else ["secure-boot"], "n": i},
        )
    return log


def raw(store: Store, seq: int) -> dict[str, object]:
    entry = store.get(record_key("audit/", seq))
    assert entry is not None
    value: dict[str, object] = json.loads(entry.value)
    return value


def rehash(record: dict[str, object]) -> bytes:
    """Re-serialize an edited record with a correct hash of its new content."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return canonical_json({**body, "hash": hashlib.sha256(canonical_json(body)).hexdigest()})


# --- appending and reading -------------------------------------------------------


def test_appended_chain_verifies(store: Store) -> None:
    log = fill(store)
    report = verify(store)
    assert report.records == 5
    assert report.head == log.head()
    assert report.kinds == {"attestation": 5}
    assert report.outcomes == {"success": 3, "failure": 2}
    assert report.first_time == report.last_time == "2027-01-15T08:00:00.000Z"
    records = list(log.iter_records())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == GENESIS_HASH
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
    assert [r.seq for r in log.iter_records(since_seq=3)] == [4, 5]
    assert records[1].details == {"failed": ["secure-boot"], "n": 2}


def test_empty_log_verifies(store: Store) -> None:
    report = verify(store)
    assert (report.records, report.head.seq, report.first_time) == (0, 0, None)
    assert AuditLog(store).head() == AuditHead(0, GENESIS_HASH)


def test_returned_record_is_what_is_stored(store: Store) -> None:
    log = AuditLog(store, clock=lambda: T0 + 0.1234)
    record = log.append(
        kind="key-release", actor="h", subject="vm-1", outcome="success", details={"t": (1, 2)}
    )
    assert record.details == {"t": [1, 2]}
    assert record.time == "2027-01-15T08:00:00.123Z"
    assert list(log.iter_records()) == [record]
    assert record.computed_hash() == record.hash


def test_many_records_page_through(store: Store) -> None:
    fill(store, 1200)
    assert verify(store).records == 1200
    assert sum(1 for _ in AuditLog(store).iter_records(since_seq=100)) == 1100


BAD_EVENTS: list[tuple[str, dict[str, object]]] = [
    ("uppercase kind", {"kind": "Attestation"}),
    ("empty outcome", {"outcome": ""}),
    ("actor with newline", {"actor": "h\nforged"}),
    ("long subject", {"subject": "s" * 300}),
    ("secret key in details", {"details": {"host_private_key": "..."}}),
    ("nested password", {"details": {"req": [{"Password": "x"}]}}),
    ("NaN in details", {"details": {"x": float("nan")}}),
    ("non-JSON details", {"details": {"x": object()}}),
    ("non-str details key", {"details": {1: "x"}}),
    ("huge details", {"details": {"x": "a" * 20_000}}),
]


@pytest.mark.parametrize(("what", "change"), BAD_EVENTS, ids=[r[0] for r in BAD_EVENTS])
def test_bad_events_are_refused_and_write_nothing(
    store: Store, what: str, change: dict[str, object]
) -> None:
    fields: dict[str, object] = {
        "kind": "attestation",
        "actor": "h",
        "subject": "h",
        "outcome": "success",
        **change,
    }
    with pytest.raises(StoreUsageError):
        AuditLog(store).append(**fields)  # type: ignore[arg-type]
    assert store.current_revision() == 0


# --- atomic with the caller's state ----------------------------------------------


def test_nonce_consumption_and_audit_commit_together(store: Store) -> None:
    log = AuditLog(store)
    nonce = "nonces/used/abc"
    txn = Txn().compare(nonce, ABSENT).put(nonce, b"", ttl=300)
    record = log.append(kind="attestation", actor="h1", subject="h1", outcome="success", txn=txn)
    assert store.get(nonce) is not None
    assert record.seq == 1
    before = (store.current_revision(), log.head())
    # A replay of the same nonce: the caller's compare fails, nothing is written,
    # and the append is not retried.
    with pytest.raises(ConflictError) as info:
        log.append(kind="attestation", actor="h1", subject="h1", outcome="success", txn=txn)
    assert info.value.key == nonce
    assert (store.current_revision(), log.head()) == before
    assert verify(store).records == 1


def test_caller_transaction_may_not_touch_the_log(store: Store) -> None:
    log = AuditLog(store)
    for txn in (Txn().put("audit/head", b"{}"), Txn().compare("audit/x", ABSENT)):
        with pytest.raises(StoreUsageError):
            log.append(kind="admin", actor="a", subject="s", outcome="success", txn=txn)
    assert store.current_revision() == 0


def test_append_refuses_to_fork_a_rewound_chain(store: Store) -> None:
    log = fill(store, 3)
    second = AuditRecord.from_bytes(store.get(record_key("audit/", 2)).value, what="t")  # type: ignore[union-attr]
    store.put("audit/head", AuditHead(2, second.hash).to_bytes())
    with pytest.raises(AuditChainError) as info:
        log.append(kind="admin", actor="a", subject="s", outcome="success")
    assert (info.value.seq, info.value.reason) == (3, "beyond-head")


def test_corrupt_head_stops_appends(store: Store) -> None:
    log = fill(store, 2)
    store.put("audit/head", b"not json")
    with pytest.raises(AuditChainError) as info:
        log.append(kind="admin", actor="a", subject="s", outcome="success")
    assert info.value.reason == "head-mismatch"


# --- tampering -------------------------------------------------------------------


def edit_outcome(store: Store) -> None:
    record = raw(store, 3)
    record["outcome"] = "success" if record["outcome"] == "failure" else "failure"
    store.put(record_key("audit/", 3), canonical_json(record))


def edit_and_rehash(store: Store) -> None:
    record = raw(store, 3)
    record["details"] = {"failed": [], "n": 3, "note": "nothing to see"}
    store.put(record_key("audit/", 3), rehash(record))


def swap(store: Store) -> None:
    two, three = store.get(record_key("audit/", 2)), store.get(record_key("audit/", 3))
    assert two is not None
    assert three is not None
    store.transaction(
        puts=[(two.key, three.value, None), (three.key, two.value, None)],
    )


def renumber_swap(store: Store) -> None:
    """Swap records 2 and 3 and fix their seq fields and hashes."""
    two, three = raw(store, 2), raw(store, 3)
    two["seq"], three["seq"] = 3, 2
    store.put(record_key("audit/", 2), rehash(three))
    store.put(record_key("audit/", 3), rehash(two))


def set_head(seq: int, hash_of: int | None = None) -> Callable[[Store], None]:
    def change(store: Store) -> None:
        digest = "ab" * 32 if hash_of is None else str(raw(store, hash_of)["hash"])
        store.put("audit/head", AuditHead(seq, digest).to_bytes())

    return change


def append_forged(prev: str | None, *, move_head: bool) -> Callable[[Store], None]:
    def change(store: Store) -> None:
        record = {**raw(store, 5), "seq": 6, "outcome": "success"}
        record["prev"] = prev or str(raw(store, 5)["hash"])
        data = rehash(record)
        store.put(record_key("audit/", 6), data)
        if move_head:
            store.put("audit/head", AuditHead(6, json.loads(data)["hash"]).to_bytes())

    return change


def cut_tail(store: Store) -> None:
    store.delete(record_key("audit/", 5))
    set_head(4, 4)(store)


@dataclass(frozen=True)
class Tamper:
    name: str
    change: Callable[[Store], object]
    reason: str
    seq: int | None
    needs_checkpoint: bool = False


TAMPERING = [
    Tamper("edit a record's outcome", edit_outcome, "edited", 3),
    Tamper("edit a record and fix its hash", edit_and_rehash, "prev-mismatch", 4),
    Tamper("delete a middle record", lambda s: s.delete(record_key("audit/", 3)), "gap", 3),
    Tamper("delete the first record", lambda s: s.delete(record_key("audit/", 1)), "gap", 1),
    Tamper("swap two records", swap, "reordered", 2),
    Tamper("swap two records and renumber them", renumber_swap, "prev-mismatch", 2),
    Tamper("rewrite the head hash", set_head(5), "head-mismatch", 5),
    Tamper("rewind the head", set_head(4, 4), "beyond-head", 5),
    Tamper("move the head past the end", set_head(6, 5), "truncated", 6),
    Tamper("delete the head", lambda s: s.delete("audit/head"), "beyond-head", 1),
    Tamper(
        "append with a wrong prev", append_forged("cd" * 32, move_head=True), "prev-mismatch", 6
    ),
    Tamper(
        "append without moving the head", append_forged(None, move_head=False), "beyond-head", 6
    ),
    Tamper("garble a record", lambda s: s.put(record_key("audit/", 2), b"{"), "malformed", 2),
    Tamper(
        "unknown field",
        lambda s: s.put(record_key("audit/", 2), rehash({**raw(s, 2), "x": 1})),
        "malformed",
        2,
    ),
    Tamper("stray key in the log", lambda s: s.put("audit/notes", b"hi"), "unexpected-key", None),
    Tamper("cut the tail, fix the head", cut_tail, "truncated", 5, needs_checkpoint=True),
]


@pytest.mark.parametrize("tamper", TAMPERING, ids=[t.name for t in TAMPERING])
def test_tampering_is_detected_and_named(store: Store, tamper: Tamper) -> None:
    log = fill(store)
    key = ECKey.generate_key("P-256")
    checkpoint = log.checkpoint(key)
    tamper.change(store)
    if tamper.needs_checkpoint:
        assert verify(store).records == 4  # self-consistent without the checkpoint
    with pytest.raises(AuditChainError) as info:
        verify(store, checkpoint=checkpoint, checkpoint_key=key)
    assert (info.value.reason, info.value.seq) == (tamper.reason, tamper.seq)
    assert isinstance(info.value, VerificationError)
    assert "audit" in info.value.diagnostics()


def test_checkpoint_pins_history(store: Store) -> None:
    log = fill(store, 3)
    key = ECKey.generate_key("P-256")
    checkpoint = log.checkpoint(key)
    fill(store, 2)  # a second writer appends two more ("host-1", "host-2" again)
    report = verify(store, checkpoint=checkpoint, checkpoint_key=key)
    assert (report.records, report.checkpoint_seq) == (5, 3)
    # Rewriting the whole history consistently is caught at the checkpointed record.
    forged = MemoryStore()
    fill(forged, 2)
    AuditLog(forged).append(kind="admin", actor="x", subject="y", outcome="success")
    with pytest.raises(AuditChainError) as info:
        verify(forged, checkpoint=checkpoint, checkpoint_key=key)
    assert (info.value.reason, info.value.seq) == ("checkpoint", 3)


def test_checkpoint_signature_is_checked(store: Store) -> None:
    log = fill(store, 2)
    signer, other = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    checkpoint = log.checkpoint(signer)
    with pytest.raises(VerificationError):
        verify(store, checkpoint=checkpoint, checkpoint_key=other)
    with pytest.raises(FormatError):
        AuditCheckpoint.verify("not-a-jws", signer)
    with pytest.raises(StoreUsageError):
        verify(store, checkpoint=checkpoint)
    assert AuditCheckpoint.verify(checkpoint, signer).seq == 2


def test_records_appended_during_verification_are_not_tampering(store: Store) -> None:
    fill(store, 3)
    log = AuditLog(store)
    appended = False

    class Racing:
        """A store view that appends once right after the head was read."""

        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def get(self, key: str) -> object:
            nonlocal appended
            entry = store.get(key)
            if key == "audit/head" and not appended:
                appended = True
                log.append(kind="admin", actor="a", subject="s", outcome="success")
            return entry

    assert verify(Racing()).records == 3  # type: ignore[arg-type]
    assert verify(store).records == 4


# --- concurrency -----------------------------------------------------------------


def append_worker(path: str, tag: str, threads: int, count: int) -> None:
    """Run in a child process: append ``count`` records from each of ``threads`` threads."""
    store = SqliteStore(path)
    log = AuditLog(store, max_attempts=1000)

    def work(thread: int) -> None:
        for i in range(count):
            log.append(
                kind="attestation", actor=f"{tag}-{thread}", subject=str(i), outcome="success"
            )

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.close()


def test_threads_append_one_unbroken_chain(store: Store) -> None:
    log = AuditLog(store, max_attempts=1000)
    threads, count = 4, 25

    def work(thread: int) -> None:
        for i in range(count):
            log.append(kind="attestation", actor=f"t{thread}", subject=str(i), outcome="success")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert verify(store).records == threads * count
    seen = {(r.actor, r.subject) for r in log.iter_records()}
    assert len(seen) == threads * count


def test_processes_append_one_unbroken_chain(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    SqliteStore(path).close()
    processes, threads, count = 2, 2, 40
    with SPAWN.Pool(processes) as pool:
        jobs = [
            pool.apply_async(append_worker, (path, f"p{p}", threads, count))
            for p in range(processes)
        ]
        for job in jobs:
            job.get(timeout=60)
    store = SqliteStore(path)
    assert verify(store).records == processes * threads * count
    actors = {r.actor for r in AuditLog(store).iter_records()}
    assert actors == {f"p{p}-{t}" for p in range(processes) for t in range(threads)}
    assert sum(1 for e in walk(store, "audit/")) == processes * threads * count + 1
    store.close()
