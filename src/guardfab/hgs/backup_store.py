"""Writing a backup's store records into a new HGS's store: SQLite, or an empty etcd prefix.

Every record goes in with a "create only" condition (``ABSENT``): a restore never
overwrites anything, even what appears under the target between the emptiness
check and the write. Transactions are cut to fit both the interface's
:data:`~guardfab.store.base.MAX_TXN_OPS` and, for etcd, the cluster's
``--max-txn-ops`` and request size: a restore is many transactions, not one.

An etcd target is refused unless its prefix holds nothing (expired leftovers and
expiry index keys count). If a transaction fails part way, :meth:`EtcdTarget.undo`
deletes every key created under the prefix since the restore began, so the prefix
is left empty again, as the SQLite restore leaves no file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from guardfab.errors import UsageError
from guardfab.hgs.etcd_admin import open_settings_store
from guardfab.hgs.state import EtcdStoreSettings
from guardfab.store.base import ABSENT, MAX_TXN_OPS, Store, Txn
from guardfab.store.errors import StoreError
from guardfab.store.etcd import EtcdStore

#: Bytes of keys and values one restore transaction carries at most: below etcd's
#: default 1.5 MiB --max-request-bytes, with room for the request's own overhead.
TXN_BYTES = 1024 * 1024
#: What a key costs a transaction besides its bytes: its compare and its read-back.
_KEY_OVERHEAD = 192


def chunks(
    records: Sequence[tuple[str, bytes]], *, max_ops: int, max_bytes: int
) -> Iterator[Sequence[tuple[str, bytes]]]:
    """Cut ``records`` into runs of at most ``max_ops`` records and about ``max_bytes``.

    A record bigger than ``max_bytes`` alone is a run of its own (the store
    decides whether it fits).
    """
    start, size = 0, 0
    for index, (key, value) in enumerate(records):
        cost = len(value) + 3 * len(key) + _KEY_OVERHEAD
        if index > start and (index - start >= max_ops or size + cost > max_bytes):
            yield records[start:index]
            start, size = index, 0
        size += cost
    if start < len(records):
        yield records[start:]


def write_records(
    store: Store, records: Sequence[tuple[str, bytes]], *, max_ops: int = MAX_TXN_OPS
) -> None:
    """Create every record (none may exist), in transactions that fit the store."""
    for run in chunks(records, max_ops=min(max_ops, MAX_TXN_OPS), max_bytes=TXN_BYTES):
        txn = Txn()
        for key, value in run:
            txn.compare(key, ABSENT).put(key, value)
        txn.commit(store)


class EtcdTarget:
    """An empty etcd prefix a restore writes into."""

    def __init__(self, settings: EtcdStoreSettings) -> None:
        self.settings = settings
        self.store: EtcdStore = open_settings_store(settings)
        try:
            held = self.store.stored_keys()
            if held:
                raise UsageError(
                    f"etcd prefix {settings.prefix!r} already holds {held} key(s); a restore "
                    "goes into an empty prefix, and nothing was written",
                    hint="give another --store-etcd-prefix, or delete that prefix after "
                    "checking that no HGS uses it",
                )
            self._start = self.store.current_revision()
        except BaseException:
            self.store.close()
            raise

    def write(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Create the records, in transactions the cluster accepts."""
        write_records(self.store, records, max_ops=self.settings.max_txn_ops)

    def undo(self) -> None:
        """Delete every key created under the prefix since this target was opened.

        Raises:
            StoreError: the clean-up failed too; the message says what to delete by hand.
        """
        try:
            created = [e.key for e in self.store.list("") if e.create_revision > self._start]
            for start in range(0, len(created), MAX_TXN_OPS):
                txn = Txn()
                for key in created[start : start + MAX_TXN_OPS]:
                    txn.delete(key)
                txn.commit(self.store)
        except StoreError as exc:
            raise StoreError(
                f"the restore failed, and so did removing what it had written under etcd "
                f"prefix {self.settings.prefix!r} ({exc}); delete that prefix (etcdctl del "
                f"--prefix {self.settings.prefix}) before restoring into it again"
            ) from None

    def close(self) -> None:
        """Close the connection to the cluster."""
        self.store.close()
