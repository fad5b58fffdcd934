"""Group commit of audit appends: shared transactions, separate fates.

Concurrent appends on one AuditLog share store transactions. These tests hold
the first commit at a gate so that the next requests queue up behind it, then
check the promises that sharing must not break: every caller gets its own
record, one caller's failed compare fails only that caller, two requests on
the same key never both win, and write skew between requests is impossible.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from guardfab.store import (
    ABSENT,
    AuditLog,
    AuditRecord,
    Condition,
    ConflictError,
    MemoryStore,
    SqliteStore,
    StoreError,
    StoreUsageError,
    Txn,
    verify,
)
from guardfab.store.audit import AppendRequest


class GatedStore:
    """A MemoryStore whose first transaction waits at a gate; counts transactions."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.transactions = 0
        self.fail_with: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transaction(
        self,
        compares: Sequence[tuple[str, Condition]] = (),
        puts: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> int:
        self.transactions += 1
        if not self.entered.is_set():
            self.entered.set()
            self.gate.wait(timeout=10)
        if self.fail_with is not None:
            raise self.fail_with
        return self.inner.transaction(compares, puts, deletes)


Outcome = AuditRecord | BaseException


@pytest.fixture
def gated() -> Iterator[GatedStore]:
    store = GatedStore()
    yield store
    store.gate.set()
    store.inner.close()


def run_queued(
    store: GatedStore, log: AuditLog, calls: list[Callable[[], AuditRecord]]
) -> list[Outcome]:
    """Block the log on a first append, queue ``calls`` behind it, release, collect."""
    results: list[Outcome | None] = [None] * len(calls)

    def call(index: int, fn: Callable[[], AuditRecord]) -> None:
        try:
            results[index] = fn()
        except Exception as exc:  # noqa: BLE001 -- compared by the test
            results[index] = exc

    leader_result: list[Outcome | None] = [None]

    def lead() -> None:
        try:
            leader_result[0] = log.append(
                kind="admin", actor="leader", subject="s", outcome="success"
            )
        except Exception as exc:  # noqa: BLE001 -- only the followers are checked
            leader_result[0] = exc

    leader = threading.Thread(target=lead)
    leader.start()
    assert store.entered.wait(timeout=10)
    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(calls)]
    for thread in threads:
        thread.start()
    queued = log._group._queue  # the followers are queued behind the gated leader
    for _ in range(1000):
        if len(queued) == len(calls):
            break
        threading.Event().wait(0.005)
    store.gate.set()
    for thread in [leader, *threads]:
        thread.join(timeout=10)
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


def attest(log: AuditLog, actor: str, txn: Txn | None = None) -> Callable[[], AuditRecord]:
    return lambda: log.append(
        kind="attestation", actor=actor, subject=actor, outcome="success", txn=txn
    )


def test_queued_appends_share_one_transaction(gated: GatedStore) -> None:
    log = AuditLog(gated)
    outcomes = run_queued(gated, log, [attest(log, f"h{i}") for i in range(10)])
    assert all(isinstance(o, AuditRecord) for o in outcomes)
    assert gated.transactions == 2  # the gated leader, then one batch of ten
    assert [o.actor for o in outcomes] == [f"h{i}" for i in range(10)]  # type: ignore[union-attr]
    assert sorted(o.seq for o in outcomes) == list(range(2, 12))  # type: ignore[union-attr]
    assert verify(gated.inner).records == 11


def test_batches_respect_max_batch(gated: GatedStore) -> None:
    log = AuditLog(gated, max_batch=3)
    run_queued(gated, log, [attest(log, f"h{i}") for i in range(7)])
    assert gated.transactions == 1 + 3
    assert verify(gated.inner).records == 8


def test_a_failed_compare_fails_only_its_caller(gated: GatedStore) -> None:
    log = AuditLog(gated)
    stale = Txn().compare("hosts/h-bad", 99).put("hosts/h-bad", b"x")
    calls = [
        attest(log, "ok1", Txn().put("hosts/ok1", b"1")),
        attest(log, "bad", stale),
        attest(log, "ok2", Txn().put("hosts/ok2", b"2")),
    ]
    outcomes = run_queued(gated, log, calls)
    assert isinstance(outcomes[0], AuditRecord)
    assert isinstance(outcomes[1], ConflictError)
    assert outcomes[1].key == "hosts/h-bad"
    assert isinstance(outcomes[2], AuditRecord)
    assert gated.inner.get("hosts/h-bad") is None
    assert {e.key for e in gated.inner.list("hosts/")} == {"hosts/ok1", "hosts/ok2"}
    assert verify(gated.inner).records == 3


def test_one_nonce_consumed_once_among_queued_callers(gated: GatedStore) -> None:
    log = AuditLog(gated)
    nonce = "nonces/used/n1"

    def consume(i: int) -> Callable[[], AuditRecord]:
        return attest(log, f"h{i}", Txn().compare(nonce, ABSENT).put(nonce, b"", ttl=60))

    outcomes = run_queued(gated, log, [consume(i) for i in range(6)])
    winners = [o for o in outcomes if isinstance(o, AuditRecord)]
    losers = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(winners) == 1
    assert len(losers) == 5
    assert {o.key for o in losers} == {nonce}
    assert verify(gated.inner).records == 2


def test_no_write_skew_between_queued_callers(gated: GatedStore) -> None:
    log = AuditLog(gated)
    rev_x = gated.inner.put("x", b"0")
    rev_y = gated.inner.put("y", b"0")
    # Each is fine alone; run one after the other, the second must fail.
    a = Txn().compare("x", rev_x).put("y", b"a")
    b = Txn().compare("y", rev_y).put("x", b"b")
    outcomes = run_queued(gated, log, [attest(log, "a", a), attest(log, "b", b)])
    assert sum(isinstance(o, AuditRecord) for o in outcomes) == 1
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 1


def test_queued_writers_of_one_key_all_succeed(gated: GatedStore) -> None:
    log = AuditLog(gated)
    calls = [attest(log, f"h{i}", Txn().put("hosts/h/last", str(i).encode())) for i in range(4)]
    outcomes = run_queued(gated, log, calls)
    assert all(isinstance(o, AuditRecord) for o in outcomes)
    entry = gated.inner.get("hosts/h/last")
    assert entry is not None
    assert gated.transactions == 1 + 4  # one key cannot be written twice in one transaction
    assert verify(gated.inner).records == 5


def test_a_store_failure_reaches_every_caller_in_the_batch(gated: GatedStore) -> None:
    log = AuditLog(gated)
    gated.fail_with = StoreError("disk on fire")
    outcomes = run_queued(gated, log, [attest(log, f"h{i}") for i in range(3)])
    assert all(isinstance(o, StoreError) for o in outcomes)
    assert gated.inner.current_revision() == 0


def test_endless_head_races_give_up_with_store_error() -> None:
    store = MemoryStore()

    class Losing:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def transaction(self, *args: object, **kwargs: object) -> int:
            raise ConflictError("audit/head", "absent", 7)

    log = AuditLog(Losing(), max_attempts=3)
    with pytest.raises(StoreError, match="lost the head race 3 times"):
        log.append(kind="admin", actor="a", subject="s", outcome="success")


def test_oversized_or_invalid_caller_transactions_fail_alone() -> None:
    log = AuditLog(MemoryStore())
    too_big = Txn()
    for i in range(127):
        too_big.put(f"k{i}", b"")
    for txn in (too_big, Txn().put("bad key", b""), Txn().put("k", b"").delete("k")):
        with pytest.raises(StoreUsageError):
            log.append(kind="admin", actor="a", subject="s", outcome="success", txn=txn)
    with pytest.raises(StoreUsageError):
        AuditLog(MemoryStore(), max_batch=0)


def test_append_many_shares_one_transaction_and_keeps_separate_fates(tmp_path: Any) -> None:
    store = SqliteStore(tmp_path / "store.db")
    log = AuditLog(store)
    before = store.current_revision()
    requests = [
        AppendRequest("attestation", "ok1", "ok1", "success", txn=Txn().put("hosts/ok1", b"1")),
        AppendRequest(
            "attestation",
            "bad",
            "bad",
            "success",
            txn=Txn().compare("hosts/bad", 99).put("hosts/bad", b"x"),
        ),
        AppendRequest("Not A Token", "x", "x", "success"),
        AppendRequest("attestation", "ok2", "ok2", "failure", {"status": "Refused"}),
    ]
    results = log.append_many(requests)
    ok1, bad, malformed, ok2 = results
    assert isinstance(ok1, AuditRecord)
    assert ok1.actor == "ok1"
    assert isinstance(bad, ConflictError)
    assert bad.key == "hosts/bad"
    assert isinstance(malformed, StoreUsageError)
    assert isinstance(ok2, AuditRecord)
    assert ok2.details == {"status": "Refused"}
    # Both good requests in one store transaction (the failed compare's retry
    # without it is the only other commit): one revision for the two records.
    assert store.current_revision() == before + 1
    assert store.get("hosts/bad") is None
    assert verify(store).records == 2
    store.close()
