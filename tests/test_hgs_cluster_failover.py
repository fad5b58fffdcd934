"""The HGS cluster rides through the loss of an etcd member and of an HGS node, end to end.

Real processes throughout: a 3-member etcd cluster on 127.0.0.1, two ``guardfab
hgs serve`` nodes over HTTPS on one etcd prefix (one state directory, copied, as
the admin guide says), and a guarded host-key host whose agent has node A as its
primary HGS and node B as its fallback. The test kills the etcd leader while the
host keeps attesting, then kills node A, and checks what an auditor would: no
answer but 200 or 503 from a node whose store is electing a leader, no nonce
that serves twice (a replay at the other node is refused), and an audit chain
that verifies and holds each attestation whose nonce was consumed exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_harness import EtcdCluster
from guardfab.store import EtcdStore

pytestmark = pytest.mark.slow

PREFIX = "fabric/"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on 127.0.0.1; stopped (or already killed) at teardown."""
    started = EtcdCluster(tmp_path / "etcd", size=3).start()
    yield started
    started.stop()


def follower_first(cluster: EtcdCluster) -> list[str]:
    """The endpoints with a follower first: a store there outlives the leader's death."""
    leader = cluster.leader()
    return [m.endpoint for m in cluster.members if m is not leader] + [leader.endpoint]


# --- the store: a read during an election -----------------------------------------


def test_a_read_during_an_election_waits_for_the_new_leader(cluster: EtcdCluster) -> None:
    """A read that etcd gave up because the leader changed is sent again, not failed.

    Before the fix, every read in flight when the leader died came back, about a
    second later, as "etcdserver: leader changed" (and every HGS request waiting on
    one as a 503), although a read changes nothing and the new leader answers it.
    """
    store = EtcdStore(follower_first(cluster), prefix=PREFIX, timeout=5, max_txn_ops=512)
    try:
        store.put("k", b"v")
        cluster.leader().kill()
        started = time.monotonic()
        entry = store.get("k")  # linearizable: it needs the next leader
        waited = time.monotonic() - started
        revision = store.put("k", b"w")
    finally:
        store.close()
    assert entry is not None
    assert entry.value == b"v"
    assert 0.2 < waited < 5, "the read spanned the election"
    assert revision > entry.revision
