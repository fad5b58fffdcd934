"""Which boot the store holds for each host, as one HGS worker last saw it.

An attestation's record names its boot by digest (:mod:`guardfab.hgs.last_record`);
the boot itself, ~16 KB, is stored under ``hosts/boot/<host>`` only when the
store does not hold it already. Several worker processes share one store, so
"already" must hold at the commit, not when this worker last looked.

The rule (docs/adr/0021): this worker remembers ``host -> (digest, revision)``,
each a fact that cannot go stale: *at mod revision r, hosts/boot/<host> held
the boot with this digest*. Revisions are store-wide and never reused, so when
the attestation's transaction compares the boot key with ``r`` and the compare
holds, the store holds that very boot at the commit. When it fails (another
worker wrote another boot of the host since), the attestation forgets the
entry and commits again with the boot in its transaction. A record therefore
never names a boot the store does not hold, whatever the order of reboots
and workers.

A worker learns a revision by reading the key (once per host and boot, when
it has no entry or another boot): if the stored bytes are exactly the boot it
would write, it compares with their revision and skips the put.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from guardfab.hgs import registry as reg
from guardfab.hgs.last_record import StoredBoot
from guardfab.store.base import Store, Txn

#: Hosts remembered per worker (each entry is a digest and a number).
KNOWN_BOOTS_SIZE = 16_384


class KnownBoots:
    """One worker's view of the boots the store holds (bounded, least recently used out)."""

    def __init__(self, store: Store, size: int = KNOWN_BOOTS_SIZE) -> None:
        self._store = store
        self._size = size
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add_to(self, txn: Txn, host_id: str, boot: StoredBoot) -> bool:
        """Make ``txn`` leave ``hosts/boot/<host_id>`` holding ``boot``.

        Returns:
            True if ``txn`` compares the key instead of writing it: a conflict
            on that key then means :meth:`forget` and write it (:func:`write_boot`).
        """
        key = reg.BOOT + host_id
        revision = self._revision_holding(host_id, boot)
        if revision is None:
            txn.put(key, boot.value)
            return False
        txn.compare(key, revision)
        return True

    def forget(self, host_id: str) -> None:
        """Drop what this worker knows of ``host_id``'s boot (the store moved past it)."""
        with self._lock:
            self._items.pop(host_id, None)

    def _revision_holding(self, host_id: str, boot: StoredBoot) -> int | None:
        """A revision at which the store held ``boot`` for the host, or None if it does not."""
        with self._lock:
            known = self._items.get(host_id)
            if known is not None and known[0] == boot.events_sha256:
                self._items.move_to_end(host_id)
                return known[1]
        entry = self._store.get(reg.BOOT + host_id)
        if entry is None or entry.value != boot.value:
            return None
        with self._lock:
            self._items[host_id] = (boot.events_sha256, entry.revision)
            self._items.move_to_end(host_id)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return entry.revision


def write_boot(txn: Txn, host_id: str, boot: StoredBoot) -> Txn:
    """``txn`` with the boot written instead of compared (after the compare lost)."""
    key = reg.BOOT + host_id
    written = txn.copy()
    written.compares = [compare for compare in written.compares if compare.key != key]
    return written.put(key, boot.value)
