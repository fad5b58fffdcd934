"""Memory (the reference), SQLite and etcd must answer every operation sequence the same way.

A hypothesis state machine drives both stores with the same random puts,
deletes, transactions (with conditions that sometimes hold and sometimes do
not), clock jumps and expiry compactions, and after each step compares
everything observable: return values, raised errors (type and failing key),
entries, revisions, and at the end the full watch history.

A second machine holds a real etcd to memory's answers the same way, except
for revision numbers: etcd's are the cluster's, and a write over an entry that
expired but was not compacted yet takes one more revision there (ADR 0022). So
it translates revisions instead of comparing them: every revision seen on both
sides must map one to one and in order, and a CAS condition on a memory
revision is sent to etcd as the revision it maps to.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from etcd_harness import (  # noqa: F401 -- etcd_server_fixture is a fixture
    MAX_TXN_OPS,
    EtcdCluster,
    etcd_server_fixture,
    new_prefix,
)
from guardfab.store import (
    ABSENT,
    ANY,
    Condition,
    Entry,
    EtcdStore,
    MemoryStore,
    SqliteStore,
    Store,
    WatchEvent,
)
from guardfab.store.errors import ConflictError

KEYS = st.sampled_from(["a", "a/1", "a/2", "b", "b/x", "nonce/1"])
VALUES = st.binary(max_size=8)
TTLS = st.none() | st.sampled_from([0.5, 1.0, 5.0])
CONDITIONS: st.SearchStrategy[Condition] = (
    st.just(ANY) | st.just(ABSENT) | st.integers(min_value=1, max_value=40)
)
PREFIXES = st.sampled_from(["", "a", "a/", "b/", "nonce/", "zz"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def outcome(call: Callable[[Store], object], store: Store) -> tuple[str, object]:
    """Run ``call`` and reduce the result or the conflict to something comparable."""
    try:
        return ("ok", call(store))
    except ConflictError as exc:
        return ("conflict", (exc.key, exc.expected, exc.actual))


class SameAnswers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.tmp = Path(tempfile.mkdtemp(prefix="gf-store-"))
        self.memory = MemoryStore(clock=self.clock, history=25)
        self.sqlite = SqliteStore(self.tmp / "s.db", clock=self.clock, history=25)

    def both(self, call: Callable[[Store], object]) -> object:
        expected = outcome(call, self.memory)
        assert outcome(call, self.sqlite) == expected
        return expected

    def live_condition(self, key: str, pick: int) -> Condition:
        """A condition that sometimes is the key's real current revision."""
        entry = self.memory.get(key)
        return entry.revision if entry is not None and pick % 2 else ABSENT

    @rule(key=KEYS, value=VALUES, expect=CONDITIONS, ttl=TTLS)
    def put(self, key: str, value: bytes, expect: Condition, ttl: float | None) -> None:
        self.both(lambda s: s.put(key, value, expect=expect, ttl=ttl))

    @rule(key=KEYS, value=VALUES, pick=st.integers(0, 3))
    def cas_put(self, key: str, value: bytes, pick: int) -> None:
        expect = self.live_condition(key, pick)
        self.both(lambda s: s.put(key, value, expect=expect))

    @rule(key=KEYS, expect=CONDITIONS)
    def delete(self, key: str, expect: Condition) -> None:
        self.both(lambda s: s.delete(key, expect=expect))

    @rule(
        compares=st.lists(st.tuples(KEYS, CONDITIONS), max_size=3),
        writes=st.dictionaries(KEYS, st.none() | st.tuples(VALUES, TTLS), max_size=4),
        pick=st.integers(0, 3),
    )
    def transaction(
        self,
        compares: list[tuple[str, Condition]],
        writes: dict[str, tuple[bytes, float | None] | None],
        pick: int,
    ) -> None:
        if writes and pick:
            first = next(iter(writes))
            compares = [*compares, (first, self.live_condition(first, pick))]
        puts = [(k, w[0], w[1]) for k, w in writes.items() if w is not None]
        deletes = [k for k, w in writes.items() if w is None]
        self.both(lambda s: s.transaction(compares, puts, deletes))

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(limit=st.none() | st.integers(1, 3))
    def compact_expired(self, limit: int | None) -> None:
        self.both(lambda s: s.compact_expired(limit=limit))

    @rule(prefix=PREFIXES, limit=st.none() | st.integers(1, 3), start=st.none() | KEYS)
    def list_prefix(self, prefix: str, limit: int | None, start: str | None) -> None:
        self.both(lambda s: s.list(prefix, start=start, limit=limit))

    @invariant()
    def same_state(self) -> None:
        self.both(lambda s: (s.current_revision(), s.list("")))

    def teardown(self) -> None:
        try:
            revision = self.memory.current_revision()
            start = max(1, revision - 24)
            for prefix in ("", "a/"):
                self.both(lambda s, p=prefix: drain(s, p, start))  # type: ignore[misc]
        finally:
            self.memory.close()
            self.sqlite.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def drain(store: Store, prefix: str, start: int) -> list[WatchEvent]:
    with store.watch(prefix, start_revision=start) as watch:
        events = []
        while (event := watch.next_event(timeout=0)) is not None:
            events.append(event)
        return events


SameAnswers.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSameAnswers = SameAnswers.TestCase


# --- etcd ------------------------------------------------------------------------

_etcd: list[EtcdCluster] = []


@pytest.fixture(autouse=True)
def _share_etcd(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hand the session's etcd server to the etcd machine (a unittest-style class)."""
    if request.node.name.startswith("test_etcd") or "Etcd" in request.node.nodeid:
        _etcd.append(request.getfixturevalue("etcd_server"))
    yield
    _etcd.clear()


class RevisionMap:
    """Memory revision -> etcd revision, checked to be one to one and in order."""

    def __init__(self) -> None:
        self.pairs: dict[int, int] = {}

    def learn(self, memory: int, etcd: int) -> None:
        known = self.pairs.setdefault(memory, etcd)
        assert known == etcd, f"memory revision {memory} maps to etcd {known} and {etcd}"
        for other, other_etcd in self.pairs.items():
            assert (other < memory) == (other_etcd < etcd), f"order broken at {memory}"

    def to_etcd(self, expect: Condition) -> Condition:
        if not isinstance(expect, int):
            return expect
        # A revision no entry ever had on the memory side must not match on etcd either.
        return self.pairs.get(expect, 10**12 + expect)


class EtcdSameAnswers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _etcd, "the etcd machine runs only with the session's etcd server"
        self.cluster = _etcd[0]
        self.clock = FakeClock()
        self.prefix = new_prefix()
        self.memory = MemoryStore(clock=self.clock)
        self.etcd = EtcdStore(
            self.cluster.endpoints, prefix=self.prefix, clock=self.clock, max_txn_ops=MAX_TXN_OPS
        )
        self.revisions = RevisionMap()

    def entries(self, entries: list[Entry], etcd_entries: list[Entry]) -> None:
        """Compare entries but for revision numbers, which must map consistently."""
        assert [(e.key, e.value, e.expires_at) for e in etcd_entries] == [
            (e.key, e.value, e.expires_at) for e in entries
        ]
        for mine, theirs in zip(entries, etcd_entries, strict=True):
            self.revisions.learn(mine.revision, theirs.revision)
            self.revisions.learn(mine.create_revision, theirs.create_revision)

    def run(
        self,
        call: Callable[[Store], object],
        etcd_call: Callable[[Store], object] | None = None,
        *,
        returns_revision: bool = False,
    ) -> None:
        expected = outcome(call, self.memory)
        got = outcome(etcd_call or call, self.etcd)
        assert got[0] == expected[0], (expected, got)
        if expected[0] == "conflict":
            key, condition, actual = expected[1]  # type: ignore[misc]
            etcd_key, etcd_condition, etcd_actual = got[1]  # type: ignore[misc]
            assert (etcd_key, etcd_condition == "absent", etcd_actual is None) == (
                key,
                condition == "absent",
                actual is None,
            )
            if actual is not None:
                self.revisions.learn(actual, etcd_actual)
        elif not returns_revision:
            assert got == expected

    @rule(key=KEYS, value=VALUES, expect=CONDITIONS, ttl=TTLS)
    def put(self, key: str, value: bytes, expect: Condition, ttl: float | None) -> None:
        theirs = self.revisions.to_etcd(expect)
        self.run(
            lambda s: s.put(key, value, expect=expect, ttl=ttl),
            lambda s: s.put(key, value, expect=theirs, ttl=ttl),
            returns_revision=True,
        )

    @rule(key=KEYS, value=VALUES, pick=st.integers(0, 3))
    def cas_put(self, key: str, value: bytes, pick: int) -> None:
        entry = self.memory.get(key)
        expect: Condition = entry.revision if entry is not None and pick % 2 else ABSENT
        theirs = self.revisions.to_etcd(expect)
        self.run(
            lambda s: s.put(key, value, expect=expect),
            lambda s: s.put(key, value, expect=theirs),
            returns_revision=True,
        )

    @rule(key=KEYS, expect=CONDITIONS)
    def delete(self, key: str, expect: Condition) -> None:
        theirs = self.revisions.to_etcd(expect)
        self.run(lambda s: s.delete(key, expect=expect), lambda s: s.delete(key, expect=theirs))

    @rule(
        compares=st.lists(st.tuples(KEYS, CONDITIONS), max_size=3),
        writes=st.dictionaries(KEYS, st.none() | st.tuples(VALUES, TTLS), max_size=4),
    )
    def transaction(
        self,
        compares: list[tuple[str, Condition]],
        writes: dict[str, tuple[bytes, float | None] | None],
    ) -> None:
        puts = [(k, w[0], w[1]) for k, w in writes.items() if w is not None]
        deletes = [k for k, w in writes.items() if w is None]
        theirs = [(k, self.revisions.to_etcd(e)) for k, e in compares]
        self.run(
            lambda s: s.transaction(compares, puts, deletes),
            lambda s: s.transaction(theirs, puts, deletes),
            returns_revision=True,
        )

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(limit=st.none() | st.integers(1, 3))
    def compact_expired(self, limit: int | None) -> None:
        self.run(lambda s: s.compact_expired(limit=limit))

    @rule(prefix=PREFIXES, limit=st.none() | st.integers(1, 3), start=st.none() | KEYS)
    def list_prefix(self, prefix: str, limit: int | None, start: str | None) -> None:
        self.entries(
            self.memory.list(prefix, start=start, limit=limit),
            self.etcd.list(prefix, start=start, limit=limit),
        )

    @invariant()
    def same_state(self) -> None:
        self.entries(self.memory.list(""), self.etcd.list(""))

    def teardown(self) -> None:
        self.memory.close()
        self.etcd.close()
        self.cluster.wipe(self.prefix)


EtcdSameAnswers.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEtcdSameAnswers = EtcdSameAnswers.TestCase
