"""EtcdStore.snapshot and stored_keys against a real etcd: what a backup and a restore rely on.

A backup reads the whole prefix in pages; the pages must all be of one revision,
or a transaction that wrote a key early in the order and one late in it could be
copied half old, half new. The test keeps such a transaction running while it
takes snapshots page by page, and checks both keys always agree.
"""

from __future__ import annotations

import threading
import time

import pytest

from etcd_harness import (  # noqa: F401 -- the *_fixture names are fixtures
    StoreOpener,
    etcd_server_fixture,
    etcd_stores_fixture,
)
from guardfab.store import StoreUsageError, Txn


def test_a_paged_snapshot_is_of_one_revision_while_a_writer_runs(
    etcd_stores: StoreOpener,
) -> None:
    store, writer_store = etcd_stores(), etcd_stores()
    filler = Txn()
    for i in range(120):
        filler.put(f"m/{i:03}", b"x" * 64)
    filler.commit(store)
    Txn().put("a/pair", b"0").put("z/pair", b"0").commit(store)
    stop = threading.Event()
    written = [0]

    def write() -> None:  # one transaction moves both ends of the key range together
        while not stop.is_set():
            written[0] += 1
            value = str(written[0]).encode()
            Txn().put("a/pair", value).put("z/pair", value).commit(writer_store)

    thread = threading.Thread(target=write)
    thread.start()
    seen = set()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (len(seen) < 5 or written[0] < 20):
            snapshot = store.snapshot("", page=7)  # ~18 pages, a round trip each
            values = {e.key: e.value for e in snapshot.entries}
            assert values["a/pair"] == values["z/pair"], "pages of different revisions"
            assert len(values) == 122
            assert max(e.revision for e in snapshot.entries) <= snapshot.revision
            seen.add(values["a/pair"])
    finally:
        stop.set()
        thread.join()
    assert len(seen) >= 3, "the writer did not move between snapshots: the test proved nothing"


def test_snapshot_refuses_an_empty_page() -> None:
    from guardfab.store import EtcdStore  # noqa: PLC0415 - nothing is contacted

    store = EtcdStore(["http://127.0.0.1:9"])
    try:
        with pytest.raises(StoreUsageError, match="page"):
            store.snapshot("", page=0)
    finally:
        store.close()


def test_stored_keys_counts_what_a_list_no_longer_shows(etcd_stores: StoreOpener) -> None:
    now = [1000.0]
    store = etcd_stores(clock=lambda: now[0])
    assert store.stored_keys() == 0
    store.put("hosts/a", b"1")
    store.put("nonces/n", b"", ttl=5)  # the entry and its expiry index key
    assert store.stored_keys() == 3
    now[0] += 10  # expired by its stamp; still stored until swept or its lease ends
    assert [e.key for e in store.list("")] == ["hosts/a"]
    assert store.stored_keys() == 3
    other = etcd_stores(prefix=etcd_stores.prefix + "other/")
    other.put("x", b"1")
    assert other.stored_keys() == 1
