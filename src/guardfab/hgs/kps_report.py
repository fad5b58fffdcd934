"""``guardfab hgs kps report``: the KPs whose last egress is on a key other than the primary's.

Read from the ``seen`` records every release writes (:mod:`guardfab.hgs.kps`),
in both layouts: per (kp_id, owner), and the per-kp_id records of stores
written before the counter included the owner.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from guardfab.hgs.registry import decode
from guardfab.store.base import Entry


def rotation_report(
    entries: Iterable[Entry], primary: tuple[str, int], *, prefix: str
) -> dict[str, Any]:
    """KPs whose last egress is wrapped to a key other than ``primary`` (id, key generation).

    They move to it on their next release; once none is left on a key
    generation, that key is no longer needed for them.
    """
    rows = []
    counts: dict[str, int] = {}
    for kp_id, record in _seen_records(entries, prefix):
        where = (record["kps_key"], int(record.get("key_generation", 0)))
        label = f"{where[0]}#{where[1]}"
        counts[label] = counts.get(label, 0) + 1
        if where != primary:
            rows.append({"kp_id": kp_id, "key_generation": 0, **record})
    return {
        "primary": primary[0],
        "key_generation": primary[1],
        "kps_by_key": counts,
        "on_old_keys": rows,
    }


def _seen_records(entries: Iterable[Entry], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """(kp_id, record) of every ``seen`` entry; an old per-kp_id entry only while its
    (kp_id, owner) has no entry of the current layout yet (it is superseded, not deleted)."""
    current: list[tuple[str, dict[str, Any]]] = []
    legacy: list[tuple[str, dict[str, Any]]] = []
    for entry in entries:
        record = decode(entry.value, what=entry.key)
        kp_id, slash, _owner = entry.key.removeprefix(prefix).partition("/")
        (current if slash else legacy).append((kp_id, record))
    known = {(kp_id, record.get("owner")) for kp_id, record in current}
    return current + [(k, r) for k, r in legacy if (k, r.get("owner")) not in known]
