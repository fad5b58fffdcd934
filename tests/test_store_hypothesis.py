"""Memory (the reference) and SQLite must answer every operation sequence the same way.

A hypothesis state machine drives both stores with the same random puts,
deletes, transactions (with conditions that sometimes hold and sometimes do
not), clock jumps and expiry compactions, and after each step compares
everything observable: return values, raised errors (type and failing key),
entries, revisions, and at the end the full watch history.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from guardfab.store import ABSENT, ANY, Condition, MemoryStore, SqliteStore, Store, WatchEvent
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
