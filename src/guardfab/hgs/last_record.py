"""The bytes of ``hosts/last/<host>`` and ``hosts/boot/<host>``: a host's last result and boot.

``hosts/last/<host>`` is written on every attestation and read by explain,
what-if and baselines from hosts (:mod:`guardfab.hgs.admin_reports`,
:mod:`guardfab.hgs.admin_baselines`): ``{"result": {...}, "summary": {...} |
null}``, the summary in :meth:`HostSummary.head_dict` form plus
``"events_sha256"``, the SHA-256 of its events member's JSON.

That events member is the verified boot log itself (base64url, ~16 K
characters for 100 events; docs/adr/0018), the same for every attestation until
the host reboots. It lives once under ``hosts/boot/<host>``
(``{"events_sha256": ..., "events": {...}}``), written only when the store does
not already hold it (:mod:`guardfab.hgs.known_boots`, docs/adr/0021); the
attestation's own record is the ~10 KB that does change. Readers put the two back together with
:func:`resolve_record`, which refuses a reference the boot key does not answer.
Records written before the split carry their events inline, and are read as
they are.

Plain JSON, not RFC 8785: the records are neither signed nor hashed as a whole.
The verifier shares one events source per distinct log and quote selection, so
the boot's JSON and digest are made once per source and kept here.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.summary import HostSummary
from guardfab.errors import FormatError, UsageError
from guardfab.hgs import registry as reg
from guardfab.store.base import Entry, Store

#: Boots whose JSON is kept: about one per distinct boot of the fleet.
EVENTS_CACHE_SIZE = 256
#: The stored summary's member naming its events in ``hosts/boot/<host>``.
EVENTS_REF = "events_sha256"
#: Reads of a record and its boot when an attestation keeps replacing both meanwhile.
RESOLVE_ATTEMPTS = 4
_EVENTS_MEMBERS = ({"event_log"}, {"events"})


class UnresolvedBootError(UsageError):
    """A host's last record names a boot that ``hosts/boot/<host>`` does not hold (HTTP 409)."""

    hint = (
        "the store was edited by hand or restored from an inconsistent copy; the host's "
        "next TPM attestation records its boot again"
    )


@dataclass(frozen=True, slots=True)
class StoredBoot:
    """A verified boot as ``hosts/boot/<host>`` holds it."""

    #: SHA-256 (hex) of the summary's events member as JSON: what records name it by.
    events_sha256: str
    #: The stored bytes: ``{"events_sha256": ..., "events": {...}}``.
    value: bytes


class EncodedRecord(NamedTuple):
    """What one attestation stores: its record, and the boot the record names (if any)."""

    last: bytes
    boot: StoredBoot | None


class _Boots:
    """The stored boot of a summary, by the identity of what its events are made from.

    Keyed by ``id()`` of the summary's events source (the verifier's shared
    :class:`~guardfab.attestation.summary.QuotedLog`, or a records tuple) and
    holding the source itself, so an id is never reused for another source
    while its entry exists; a hit also checks identity.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[int, int], tuple[object, StoredBoot]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, summary: HostSummary) -> StoredBoot:
        source = summary.events_identity
        key = (id(source), summary.uintn_size)
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] is source:
                self._items.move_to_end(key)
                return found[1]
        boot = stored_boot(json_text(summary.events_dict()))
        with self._lock:
            self._items[key] = (source, boot)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return boot


_BOOTS = _Boots(EVENTS_CACHE_SIZE)


def stored_boot(events_json: str) -> StoredBoot:
    """The ``hosts/boot/`` value holding ``events_json`` (a summary's events member, as JSON)."""
    digest = _sha256(events_json)
    value = '{"' + EVENTS_REF + '":"' + digest + '","events":' + events_json + "}"
    return StoredBoot(digest, value.encode("utf-8"))


def encode_last_record(result: AttestationResult, result_json: str | None = None) -> EncodedRecord:
    """The stored record of ``result`` and the boot it names (see the module docstring).

    ``result_json``: ``json_text(result.to_dict())`` if the caller already made it
    (the HGS makes it once for both this record and its answer to the host).
    """
    if result_json is None:
        result_json = json_text(result.to_dict())
    boot = summary = None
    if result.summary is not None:
        boot = _BOOTS.get(result.summary)
        head = json_text(result.summary.head_dict())
        summary = head[:-1] + ',"' + EVENTS_REF + '":"' + boot.events_sha256 + '"}'
    last = '{"result":' + result_json + ',"summary":' + (summary or "null") + "}"
    return EncodedRecord(last.encode("utf-8"), boot)


def json_text(value: Any) -> str:
    """Compact JSON, byte for byte what Starlette's ``JSONResponse`` sends for ``value``."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------ reading


def read_last_record(store: Store, host_id: str) -> dict[str, Any] | None:
    """``host_id``'s last record with its summary whole (:func:`resolve_record`), or None."""
    entry = store.get(reg.LAST + host_id)
    return None if entry is None else resolve_record(store, host_id, entry)


def resolve_record(store: Store, host_id: str, entry: Entry) -> dict[str, Any]:
    """The record in ``entry`` (``hosts/last/<host_id>``) with its summary's events put back.

    The record and the boot are two reads: an attestation may replace both
    between them. A boot that does not answer the reference is read again
    with the record; only when the record has not moved is the store itself
    inconsistent. Records written before the split (events inline), records
    without a summary and malformed summaries are returned as stored: their
    readers' own checks name what is wrong with them.

    Raises:
        UnresolvedBootError: the boot named is not in the store, naming the host.
        FormatError: the record is not a JSON object.
    """
    reference, problem = "", ""
    for _ in range(RESOLVE_ATTEMPTS):
        record = reg.decode(entry.value, what=entry.key)
        if not isinstance(record, dict):
            raise FormatError(f"stored {entry.key} is not a JSON object")
        summary = record.get("summary")
        if not isinstance(summary, dict) or EVENTS_REF not in summary:
            return record
        reference = str(summary[EVENTS_REF])
        events, problem = _events_named(store.get(reg.BOOT + host_id), reference)
        if events is not None:
            head = {k: v for k, v in summary.items() if k != EVENTS_REF}
            return {**record, "summary": head | events}
        again = store.get(entry.key)
        if again is None or again.revision == entry.revision:
            break
        entry = again
    raise UnresolvedBootError(
        f"host {host_id!r}: its last attestation names a boot (events_sha256 "
        f"{reference[:16]}...) that {reg.BOOT}{host_id} {problem}"
    )


def _events_named(boot: Entry | None, digest: str) -> tuple[dict[str, Any] | None, str]:
    """The stored events whose JSON hashes to ``digest``, or None and what is wrong instead."""
    if boot is None:
        return None, "does not hold (the key is absent)"
    try:
        stored = json.loads(boot.value)
    except ValueError:
        return None, "holds no JSON"
    events = stored.get("events") if isinstance(stored, dict) else None
    if not isinstance(events, dict) or set(events) not in _EVENTS_MEMBERS:
        return None, "holds no events member"
    actual = _sha256(json_text(events))
    if actual != digest or stored.get(EVENTS_REF) != digest:
        return None, f"holds another boot (events_sha256 {actual[:16]}...)"
    return events, ""
