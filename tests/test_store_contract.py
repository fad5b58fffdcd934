"""The store contract, run against every backend (memory = the reference, SQLite, etcd).

Each test states one promise of :class:`guardfab.store.base.Store` that the HGS
relies on: CAS is exact, a failed transaction writes nothing, revisions are
store-wide and monotonic, expired keys vanish for every reader at once, and a
watcher sees every change in order.

Revisions are asserted relative to the store's revision when the test starts:
etcd's revision is the cluster's, shared by every key prefix (tests share one
etcd server, each under a prefix of its own, and run one at a time, so within a
test the revisions still move only with the test's own writes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from etcd_harness import EtcdCluster, etcd_server_fixture, new_prefix  # noqa: F401 -- fixture
from guardfab.errors import TransportError, UsageError
from guardfab.store import (
    ABSENT,
    ANY,
    ConflictError,
    EventKind,
    MemoryStore,
    SqliteStore,
    Store,
    StoreError,
    StoreUsageError,
    Txn,
    WatchCompactedError,
    WatchEvent,
)
from guardfab.store.base import MAX_TXN_OPS, MAX_VALUE_BYTES
from guardfab.store.etcd import EtcdStore

#: Seconds drain() waits for one more event: etcd delivers events over a stream
#: a moment after the write returns; the local backends have them at once.
DRAIN_WAIT = {"memory": 0.0, "sqlite": 0.0, "etcd": 0.3}


class FakeClock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Build stores of the parametrized backend; closes them after the test.

    etcd stores of one test share a fresh key prefix on the session's etcd server,
    wiped afterwards (so their leases expire on nothing in later tests).
    """
    opened: list[Store] = []
    prefix = new_prefix()
    cluster = request.getfixturevalue("etcd_server") if request.param == "etcd" else None
    global drain_wait  # noqa: PLW0603 -- one test at a time; read by drain()
    drain_wait = DRAIN_WAIT[request.param]

    def factory(**kwargs: object) -> Store:
        kwargs.setdefault("poll_interval", 0.01)
        if request.param == "memory":
            store: Store = MemoryStore(**kwargs)  # type: ignore[arg-type]
        elif request.param == "sqlite":
            store = SqliteStore(tmp_path / f"store{len(opened)}.db", **kwargs)  # type: ignore[arg-type]
        else:
            store = _etcd_store(request, prefix, kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
    if cluster is not None:
        cluster.wipe(prefix)


def _etcd_store(request: pytest.FixtureRequest, prefix: str, kwargs: dict[str, object]) -> Store:
    """An EtcdStore: no poll interval (etcd pushes events), no history (etcd compacts)."""
    kwargs.pop("poll_interval")
    kwargs.pop("history", None)
    cluster: EtcdCluster = request.getfixturevalue("etcd_server")
    return EtcdStore(cluster.endpoints, prefix=prefix, max_txn_ops=512, **kwargs)  # type: ignore[arg-type]


drain_wait = 0.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(make_store: StoreFactory, clock: FakeClock) -> Store:
    return make_store(clock=clock)


def snapshot(store: Store) -> tuple[int, list[tuple[str, bytes, int, int]]]:
    """Everything a reader can observe, to prove that a failed call changed nothing."""
    entries = store.list("")
    return store.current_revision(), [
        (e.key, e.value, e.revision, e.create_revision) for e in entries
    ]


def drain(watch: object, *, wait: float | None = None) -> list[WatchEvent]:
    """Collect events until the watch has nothing more within ``wait`` seconds."""
    events = []
    timeout = drain_wait if wait is None else wait
    while (event := watch.next_event(timeout=timeout)) is not None:  # type: ignore[attr-defined]
        events.append(event)
    return events


# --- CAS -------------------------------------------------------------------------


def test_new_store_is_empty(store: Store) -> None:
    if isinstance(store, EtcdStore):
        assert store.current_revision() >= 1  # the cluster's; a new etcd starts at 1
    else:
        assert store.current_revision() == 0
    assert store.get("hosts/tpm/a") is None
    assert store.list("") == []


def test_create_only_if_absent(store: Store) -> None:
    revision = store.put("hosts/tpm/a", b"v1", expect=ABSENT)
    entry = store.get("hosts/tpm/a")
    assert entry is not None
    assert (entry.value, entry.revision, entry.create_revision) == (b"v1", revision, revision)
    before = snapshot(store)
    with pytest.raises(ConflictError) as info:
        store.put("hosts/tpm/a", b"v2", expect=ABSENT)
    assert (info.value.key, info.value.expected, info.value.actual) == (
        "hosts/tpm/a",
        "absent",
        revision,
    )
    assert b"v1" not in str(info.value).encode()
    assert snapshot(store) == before


def test_compare_and_swap_on_revision(store: Store) -> None:
    first = store.put("k", b"1")
    second = store.put("k", b"2", expect=first)
    assert second == first + 1
    entry = store.get("k")
    assert entry is not None
    assert (entry.value, entry.revision, entry.create_revision) == (b"2", second, first)
    before = snapshot(store)
    with pytest.raises(ConflictError) as info:
        store.put("k", b"stale", expect=first)
    assert info.value.actual == second
    with pytest.raises(ConflictError):
        store.put("absent", b"x", expect=first)
    assert snapshot(store) == before


def test_revision_is_store_wide_and_monotonic(store: Store) -> None:
    base = store.current_revision()
    revisions = [store.put(f"k/{i % 3}", b"v") for i in range(10)]
    assert revisions == list(range(base + 1, base + 11))
    assert store.current_revision() == base + 10
    entries = {e.key: e for e in store.list("k/")}
    assert entries["k/0"].revision == base + 10
    assert entries["k/0"].create_revision == base + 1
    assert entries["k/2"].revision == base + 9


def test_delete_conditions(store: Store) -> None:
    base = store.current_revision()
    assert store.delete("missing") is False
    assert store.current_revision() == base
    revision = store.put("k", b"v")
    with pytest.raises(ConflictError):
        store.delete("k", expect=revision + 7)
    with pytest.raises(ConflictError):
        store.delete("missing", expect=revision)
    assert store.get("k") is not None
    assert store.delete("k", expect=revision) is True
    assert store.get("k") is None
    assert store.current_revision() == revision + 1
    assert store.delete("k") is False
    assert store.current_revision() == revision + 1


def test_recreated_key_gets_new_create_revision(store: Store) -> None:
    store.put("k", b"1")
    store.delete("k")
    third = store.put("k", b"2", expect=ABSENT)
    entry = store.get("k")
    assert entry is not None
    assert entry.create_revision == third


# --- transactions ----------------------------------------------------------------


def test_transaction_is_all_or_nothing(store: Store) -> None:
    nonce = store.put("nonces/n1", b"")
    store.put("hosts/h1", b"old")
    before = snapshot(store)
    with pytest.raises(ConflictError) as info:
        store.transaction(
            compares=[("nonces/n1", nonce), ("hosts/h1", ABSENT), ("hosts/h2", 999)],
            puts=[("hosts/h1", b"new", None), ("audit/1", b"record", None)],
            deletes=["nonces/n1"],
        )
    assert info.value.key == "hosts/h1"  # the first failing compare, in the given order
    assert snapshot(store) == before


def test_transaction_writes_share_one_revision(store: Store) -> None:
    base = store.current_revision()
    store.put("a", b"1")
    store.put("b", b"1")
    revision = store.transaction(
        compares=[("a", ANY), ("c", ABSENT)],
        puts=[("c", b"3", None), ("a", b"2", None)],
        deletes=["b", "never-existed"],
    )
    assert revision == base + 3
    assert [(e.key, e.value, e.revision) for e in store.list("")] == [
        ("a", b"2", base + 3),
        ("c", b"3", base + 3),
    ]


def test_transaction_without_effect_keeps_revision(store: Store) -> None:
    first = store.put("a", b"1")
    assert store.transaction(compares=[("a", first)], deletes=["missing"]) == first
    assert store.transaction() == first
    assert store.current_revision() == first


def test_txn_builder_commits_and_copies(store: Store) -> None:
    txn = Txn().compare("n", ABSENT).put("n", b"", ttl=30).put("x", b"1").delete("y")
    assert txn.written_keys() == {"n", "x", "y"}
    copy = txn.copy().put("z", b"2")
    assert len(txn.puts) == 2
    assert copy.commit(store) == store.current_revision()
    with pytest.raises(ConflictError):
        txn.commit(store)
    assert {e.key for e in store.list("")} == {"n", "x", "z"}


BAD_REQUESTS: list[tuple[str, Callable[[Store], object]]] = [
    ("empty key", lambda s: s.put("", b"v")),
    ("space in key", lambda s: s.put("a b", b"v")),
    ("non-ASCII key", lambda s: s.put("h\u00f6st", b"v")),
    ("control char in key", lambda s: s.get("a\x00b")),
    ("key too long", lambda s: s.put("k" * 513, b"v")),
    ("bytes key", lambda s: s.get(b"k")),  # type: ignore[arg-type]
    ("str value", lambda s: s.put("k", "v")),  # type: ignore[arg-type]
    ("value too large", lambda s: s.put("k", b"x" * (MAX_VALUE_BYTES + 1))),
    ("zero ttl", lambda s: s.put("k", b"v", ttl=0)),
    ("negative ttl", lambda s: s.put("k", b"v", ttl=-1)),
    ("nan ttl", lambda s: s.put("k", b"v", ttl=float("nan"))),
    ("bool ttl", lambda s: s.put("k", b"v", ttl=True)),
    ("revision 0", lambda s: s.put("k", b"v", expect=0)),
    ("bool revision", lambda s: s.put("k", b"v", expect=True)),
    ("string condition", lambda s: s.delete("k", expect="absent")),  # type: ignore[arg-type]
    ("key twice", lambda s: s.transaction(puts=[("k", b"1", None)], deletes=["k"])),
    ("too many ops", lambda s: s.transaction(deletes=[f"k{i}" for i in range(MAX_TXN_OPS + 1)])),
    ("bad limit", lambda s: s.list("", limit=0)),
    ("bad start revision", lambda s: s.watch("", start_revision=0)),
    ("bad prefix", lambda s: s.list("a b")),
]


@pytest.mark.parametrize(("what", "call"), BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests_are_refused_and_change_nothing(
    store: Store, what: str, call: Callable[[Store], object]
) -> None:
    store.put("k0", b"v")
    before = snapshot(store)
    with pytest.raises(StoreUsageError) as info:
        call(store)
    assert isinstance(info.value, UsageError)
    assert snapshot(store) == before


# --- expiry ----------------------------------------------------------------------


def test_ttl_expiry_with_injected_clock(store: Store, clock: FakeClock) -> None:
    revision = store.put("nonces/used/n1", b"", ttl=10)
    entry = store.get("nonces/used/n1")
    assert entry is not None
    assert entry.expires_at == clock.now + 10
    clock.advance(9.999)
    assert store.get("nonces/used/n1") is not None
    with pytest.raises(ConflictError):
        store.put("nonces/used/n1", b"", expect=ABSENT, ttl=10)
    clock.advance(0.001)
    assert store.get("nonces/used/n1") is None
    assert store.list("nonces/") == []
    assert store.delete("nonces/used/n1") is False
    with pytest.raises(ConflictError):
        store.put("nonces/used/n1", b"", expect=revision)
    again = store.put("nonces/used/n1", b"", expect=ABSENT)
    entry = store.get("nonces/used/n1")
    assert entry is not None
    assert (entry.create_revision, entry.expires_at) == (again, None)


def test_writes_over_an_expired_entry_see_it_absent(store: Store, clock: FakeClock) -> None:
    old = store.put("t/a", b"old", ttl=5)
    store.put("t/b", b"old", ttl=5)
    clock.advance(5)
    before = store.current_revision()
    assert store.delete("t/b") is False  # nothing live to delete: no write at all
    assert store.current_revision() == before
    with pytest.raises(ConflictError) as info:
        store.delete("t/b", expect=old + 1)
    assert info.value.actual is None
    again = store.put("t/a", b"new")  # an unconditional put creates the key anew
    entry = store.get("t/a")
    assert entry is not None
    assert (entry.value, entry.revision, entry.create_revision) == (b"new", again, again)
    assert entry.expires_at is None
    assert [e.key for e in store.list("t/")] == ["t/a"]


def test_a_ttl_entry_rewritten_without_ttl_stays(store: Store, clock: FakeClock) -> None:
    first = store.put("t/a", b"1", ttl=5)
    second = store.put("t/a", b"2", expect=first)
    clock.advance(10)
    entry = store.get("t/a")
    assert entry is not None
    assert (entry.value, entry.revision, entry.create_revision) == (b"2", second, first)
    assert entry.expires_at is None
    third = store.put("t/a", b"3", expect=second, ttl=50)
    entry = store.get("t/a")
    assert entry is not None
    assert (entry.revision, entry.expires_at) == (third, clock.now + 50)


def test_compact_expired_removes_and_notifies(store: Store, clock: FakeClock) -> None:
    base = store.current_revision()
    store.put("t/a", b"1", ttl=5)
    store.put("t/b", b"2", ttl=50)
    store.put("t/c", b"3")
    watch = store.watch("t/")
    assert store.compact_expired() == 0
    clock.advance(5)
    assert store.compact_expired() == 1
    assert store.compact_expired() == 0
    assert [e.key for e in store.list("t/")] == ["t/b", "t/c"]
    assert drain(watch) == [WatchEvent(EventKind.DELETE, "t/a", None, base + 4)]


def test_compact_expired_spreads_large_batches_over_revisions(
    store: Store, clock: FakeClock
) -> None:
    count = MAX_TXN_OPS + 10
    base = store.current_revision()
    for i in range(count):
        store.put(f"n/{i:04d}", b"", ttl=1)
    clock.advance(1)
    assert store.compact_expired() == count
    assert store.current_revision() == base + count + 2
    assert store.list("") == []


def test_compact_expired_with_a_limit_removes_the_earliest_expired_first(
    store: Store, clock: FakeClock
) -> None:
    store.put("t/a", b"", ttl=3)
    store.put("t/b", b"", ttl=1)
    store.put("t/c", b"", ttl=2)
    store.put("t/d", b"", ttl=60)
    clock.advance(5)
    before = store.current_revision()
    watch = store.watch("t/")
    assert store.compact_expired(limit=2) == 2
    assert store.current_revision() == before + 1  # one transaction per call
    assert [(e.kind, e.key) for e in drain(watch)] == [
        (EventKind.DELETE, "t/b"),
        (EventKind.DELETE, "t/c"),
    ]
    # Expired but not yet removed: absent to readers all the same.
    assert [e.key for e in store.list("t/")] == ["t/d"]
    assert store.compact_expired(limit=2) == 1  # t/a, the last one expired
    assert store.compact_expired(limit=2) == 0
    assert store.current_revision() == before + 2


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_compact_expired_refuses_a_bad_limit(store: Store, limit: object) -> None:
    with pytest.raises(UsageError, match="limit"):
        store.compact_expired(limit=limit)  # type: ignore[arg-type]


# --- list ------------------------------------------------------------------------


def test_list_by_prefix_sorted_with_start_and_limit(store: Store) -> None:
    for key in ["hosts/b", "hosts/a", "hostsX", "host", "hosts/a/x", "policies/p"]:
        store.put(key, key.encode())
    assert [e.key for e in store.list("hosts/")] == ["hosts/a", "hosts/a/x", "hosts/b"]
    assert [e.key for e in store.list("hosts/", limit=2)] == ["hosts/a", "hosts/a/x"]
    assert [e.key for e in store.list("hosts/", start="hosts/a0")] == ["hosts/b"]
    assert [e.key for e in store.list("hosts/", start="a")] == [
        "hosts/a",
        "hosts/a/x",
        "hosts/b",
    ]
    assert [e.key for e in store.list("hosts/", start="zzz")] == []
    assert len(store.list("")) == 6
    assert store.list("hosts/a")[0].value == b"hosts/a"


def test_list_prefix_ending_in_tilde(store: Store) -> None:
    store.put("a~", b"1")
    store.put("a~b", b"2")
    store.put("b", b"3")
    assert [e.key for e in store.list("a~")] == ["a~", "a~b"]


# --- watch -----------------------------------------------------------------------


def test_watch_replays_history_in_order(store: Store) -> None:
    base = store.current_revision()
    store.put("hosts/a", b"1")
    store.put("other/x", b"x")
    store.transaction(puts=[("hosts/b", b"2", None)], deletes=["hosts/a"])
    store.put("hosts/b", b"3")
    with store.watch("hosts/", start_revision=base + 1) as watch:
        events = drain(watch)
    assert events == [
        WatchEvent(EventKind.PUT, "hosts/a", b"1", base + 1),
        WatchEvent(EventKind.PUT, "hosts/b", b"2", base + 3),
        WatchEvent(EventKind.DELETE, "hosts/a", None, base + 3),
        WatchEvent(EventKind.PUT, "hosts/b", b"3", base + 4),
    ]
    with store.watch("hosts/", start_revision=base + 4) as watch:
        assert [e.revision for e in drain(watch)] == [base + 4]


def test_watch_defaults_to_future_and_wakes_on_write(store: Store) -> None:
    old = store.put("k/old", b"")
    watch = store.watch("k/")
    assert watch.next_event(timeout=0) is None
    writer = threading.Timer(0.05, lambda: store.put("k/new", b"n"))
    writer.start()
    event = watch.next_event(timeout=5)
    writer.join()
    assert event == WatchEvent(EventKind.PUT, "k/new", b"n", old + 1)
    watch.cancel()


def test_watch_spans_many_revisions(store: Store) -> None:
    base = store.current_revision()
    for i in range(300):
        store.put(f"w/{i % 7}", str(i).encode())
    with store.watch("w/", start_revision=base + 1) as watch:
        events = drain(watch)
    assert [e.revision for e in events] == list(range(base + 1, base + 301))


def test_watch_cancel_ends_a_blocked_iterator(store: Store) -> None:
    watch = store.watch("k/")
    seen: list[WatchEvent] = []
    reader = threading.Thread(target=lambda: seen.extend(watch))
    reader.start()
    store.put("k/1", b"1")
    for _ in range(500):
        if seen:
            break
        threading.Event().wait(0.01)
    watch.cancel()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert [e.key for e in seen] == ["k/1"]


def test_watch_from_compacted_revision_is_refused(
    make_store: StoreFactory, request: pytest.FixtureRequest
) -> None:
    store = make_store(history=5)
    base = store.current_revision()
    watch = store.watch("", start_revision=base + 1)
    for i in range(10):
        store.put(f"k{i}", b"")
    if isinstance(store, EtcdStore):  # etcd keeps what its compaction leaves: keep 5 too
        request.getfixturevalue("etcd_server").compact(base + 6)
    with pytest.raises(WatchCompactedError) as info:
        store.watch("", start_revision=base + 5)
    assert info.value.compact_revision == base + 5
    assert [e.revision for e in drain(store.watch("", start_revision=base + 6))] == [
        base + 6,
        base + 7,
        base + 8,
        base + 9,
        base + 10,
    ]
    if isinstance(store, EtcdStore):
        # An etcd watcher streams events as they happen: one connected before the
        # compaction already holds them all and is not behind. (One that has to
        # reconnect from a compacted revision gets WatchCompactedError: see
        # tests/test_store_etcd_cluster.py.)
        assert [e.revision for e in drain(watch)] == list(range(base + 1, base + 11))
    else:
        with pytest.raises(WatchCompactedError):
            watch.next_event(timeout=0)  # this watcher fell behind the kept history


# --- lifecycle and threads -------------------------------------------------------


def test_closed_store_refuses_calls(make_store: StoreFactory) -> None:
    store = make_store()
    store.put("k", b"v")
    store.close()
    with pytest.raises(StoreUsageError):
        store.get("k")
    with pytest.raises(StoreUsageError):
        store.put("k", b"v")


def cas_increment(store: Store, key: str) -> int:
    """Increment a counter with a CAS retry loop; return how many conflicts it hit."""
    conflicts = 0
    while True:
        entry = store.get(key)
        value = 0 if entry is None else int(entry.value)
        try:
            store.put(
                key, str(value + 1).encode(), expect=ABSENT if entry is None else entry.revision
            )
        except ConflictError:
            conflicts += 1
            continue
        return conflicts


def test_threads_lose_no_cas_update(store: Store) -> None:
    threads, increments = 4, 50
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(increments):
                cas_increment(store, "counter")
        except Exception as exc:  # noqa: BLE001 -- surfaced by the assert below
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    entry = store.get("counter")
    assert entry is not None
    assert int(entry.value) == threads * increments


def test_store_errors_are_transport_errors() -> None:
    assert issubclass(StoreError, TransportError)
    assert not issubclass(ConflictError, TransportError)
