"""The etcd backend's expiry index: find expired entries without reading every key.

The HGS sweeps expired nonces every second (``guardfab.hgs.app``); reading the
whole prefix for that would read every live nonce and host record each time. So
every put with a TTL also writes an empty index key, under the same lease,

    0x00 "guardfab-expiry" 0x00 | store prefix | expires_at (8 bytes, order-preserving) | key

which sorts by expiry, then key: memory's order for ``compact_expired``. No store
key starts with 0x00 (keys and prefixes are printable ASCII), so index keys never
show in a list or a watch. An index key whose entry was rewritten or deleted meanwhile
is stale: the sweep reads the entry, skips it, and deletes it alongside real
removals; its lease removes it otherwise. A write that replaces a TTL entry it read
deletes that entry's index key in the same transaction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardfab.store.base import is_live
from guardfab.store.etcd_codec import b64, decode_stamp, encode_stamp, parse_kv, unb64

#: Root of every index key; below every printable key, so outside every store prefix.
INDEX_ROOT = b"\x00guardfab-expiry\x00"

#: Sends one gateway request: (path, body, what, idempotent) -> answer.
Call = Callable[[str, dict[str, Any], str, bool], dict[str, Any]]


def index_key(namespace: bytes, key: str, expires_at: float) -> bytes:
    """Return the index key of ``key`` expiring at ``expires_at``."""
    return INDEX_ROOT + namespace + encode_stamp(expires_at) + key.encode("ascii")


def _parse_index_key(namespace: bytes, raw: bytes) -> tuple[float, str]:
    rest = raw[len(INDEX_ROOT) + len(namespace) :]
    return decode_stamp(rest[:8]), rest[8:].decode("ascii")


@dataclass(frozen=True, slots=True)
class ExpiredEntry:
    """An entry the index and the entry itself both say has expired."""

    key: str
    mod_revision: int
    expires_at: float


@dataclass
class ExpiredScan:
    """What one scan of the index found."""

    expired: list[ExpiredEntry]
    stale_index_keys: list[bytes]


def find_expired(
    call: Call, namespace: bytes, now: float, *, limit: int | None, page: int
) -> ExpiredScan:
    """Return up to ``limit`` entries expired at ``now``, earliest first, and stale index keys.

    Reads the index up to ``now`` a page at a time and, per page, the entries it
    names in one read-only transaction of ``page`` range reads.
    """
    end = INDEX_ROOT + namespace + encode_stamp(math.nextafter(now, math.inf))
    body: dict[str, Any] = {
        "key": b64(INDEX_ROOT + namespace),
        "range_end": b64(end),
        "limit": page,
        "keys_only": True,
    }
    scan = ExpiredScan([], [])
    while True:
        answer = call("/v3/kv/range", body, "an expiry index read", True)
        raw_keys = [unb64(kv.get("key")) for kv in answer.get("kvs") or []]
        if not raw_keys:
            return scan
        _sort_page(call, namespace, now, raw_keys, scan)
        if limit is not None and len(scan.expired) >= limit:
            del scan.expired[limit:]
            return scan
        if not answer.get("more"):
            return scan
        body["key"] = b64(raw_keys[-1] + b"\x00")


def _sort_page(
    call: Call, namespace: bytes, now: float, raw_keys: list[bytes], scan: ExpiredScan
) -> None:
    """Read the entries a page of index keys names; file each as expired or stale."""
    named = [_parse_index_key(namespace, raw) for raw in raw_keys]
    reads = [
        {"request_range": {"key": b64(namespace + key.encode("ascii"))}} for _when, key in named
    ]
    answer = call("/v3/kv/txn", {"compare": [], "success": reads}, "an expiry read", True)
    responses = answer.get("responses") or []
    for raw, (when, key), response in zip(raw_keys, named, responses, strict=True):
        kvs = (response.get("response_range") or {}).get("kvs") or []
        stored = parse_kv(kvs[0], namespace) if kvs else None
        if stored is not None and stored.expires_at == when and not is_live(when, now):
            scan.expired.append(ExpiredEntry(key, stored.mod_revision, when))
        else:
            scan.stale_index_keys.append(raw)
