"""EtcdStore on a real 3-member etcd cluster on 127.0.0.1: losing a member, even the leader.

What the HGS cluster relies on (ADR 0004, 0022): writes go on through the other
members, revisions never go back, a compare-and-swap still refuses a stale
revision, and a watcher either sees every change once and in order across the
failover or is told clearly that the history it needed was compacted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_harness import EtcdCluster, EtcdMember
from guardfab.store import ConflictError, EtcdStore, StoreError, WatchCompactedError, WatchEvent


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three members started together; stopped (or already killed) at teardown."""
    started = EtcdCluster(tmp_path / "cluster", size=3).start()
    yield started
    started.stop()


def ordered(cluster: EtcdCluster, first: EtcdMember) -> list[str]:
    """The cluster's endpoints with ``first`` first, so the store starts on it."""
    return [first.endpoint] + [m.endpoint for m in cluster.members if m is not first]


def collect(watch: object, count: int, timeout: float = 10.0) -> list[WatchEvent]:
    """Wait for ``count`` events (the watch may be reconnecting meanwhile)."""
    events: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        event = watch.next_event(timeout=0.2)  # type: ignore[attr-defined]
        if event is not None:
            events.append(event)
    return events


def put_retrying(store: EtcdStore, key: str, value: bytes) -> tuple[int, list[str]]:
    """Put until it succeeds, as an HGS client retries a 503; return the revision and the errors.

    A write that reached a member in the second before it noticed the leader was
    gone is lost with the leader: etcd cannot say whether it was applied, and the
    store says so as a StoreError instead of waiting.
    """
    stalls: list[str] = []
    deadline = time.monotonic() + 20
    while True:
        try:
            return store.put(key, value), stalls
        except StoreError as exc:
            stalls.append(str(exc))
            if time.monotonic() > deadline:
                raise


def test_writes_watch_and_cas_survive_killing_the_leader(cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    store = EtcdStore(ordered(cluster, leader), prefix="fabric/", timeout=2)
    try:
        first = store.put("hosts/a", b"v1")
        second = store.put("hosts/a", b"v2", expect=first)
        watch = store.watch("hosts/", start_revision=first)  # streamed by the leader
        assert [e.revision for e in collect(watch, 2)] == [first, second]

        leader.kill()
        started = time.monotonic()
        third, stalls = put_retrying(store, "hosts/b", b"after")
        resumed_after = time.monotonic() - started
        fourth = store.put("hosts/a", b"v3", expect=second)

        assert second < third < fourth <= store.current_revision()
        assert resumed_after < 10, f"writes resumed only after {resumed_after:.1f} s: {stalls}"
        assert all("127.0.0.1" in stall for stall in stalls)  # each names the member
        assert cluster.leader() is not leader
        with pytest.raises(ConflictError) as info:
            store.put("hosts/a", b"stale", expect=second)
        assert info.value.actual == fourth
        entry = store.get("hosts/a")
        assert entry is not None
        assert (entry.value, entry.revision, entry.create_revision) == (b"v3", fourth, first)
        # The watcher lost its member and resumed on another one: every change
        # after the ones it had, once, in order.
        assert [(e.key, e.value, e.revision) for e in collect(watch, 2)] == [
            ("hosts/b", b"after", third),
            ("hosts/a", b"v3", fourth),
        ]
        assert watch.next_event(timeout=0.3) is None
        watch.cancel()
    finally:
        store.close()


def test_a_watcher_resuming_into_compacted_history_is_told(cluster: EtcdCluster) -> None:
    follower = next(m for m in cluster.members if m is not cluster.leader())
    others = [m for m in cluster.members if m is not follower]
    writer = EtcdStore([m.endpoint for m in others], prefix="fabric/", timeout=15)
    reader = EtcdStore(ordered(cluster, follower), prefix="fabric/", timeout=15)
    try:
        seen = writer.put("hosts/a", b"1")
        watch = reader.watch("hosts/", start_revision=seen)  # streamed by the follower
        assert [e.revision for e in collect(watch, 1)] == [seen]
        assert follower.process is not None
        os.kill(follower.process.pid, signal.SIGSTOP)  # its stream goes quiet, not closed
        missed = writer.put("hosts/b", b"2")
        writer.put("other/x", b"3")
        cluster.compact(writer.current_revision(), via=others[0])  # what it missed is gone
        follower.kill()  # now its stream ends and the watcher reconnects elsewhere
        with pytest.raises(WatchCompactedError) as info:
            collect(watch, 1)
        assert info.value.compact_revision >= missed
        assert "re-read" in info.value.hint
        with pytest.raises(WatchCompactedError):  # and it stays failed
            watch.next_event(timeout=0)
    finally:
        writer.close()
        reader.close()
