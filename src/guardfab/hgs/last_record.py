"""The bytes of ``hosts/last/<host>``: a host's last result and verified summary.

Written on every attestation and read by explain, what-if and baselines from
hosts (:mod:`guardfab.hgs.admin_reports`, :mod:`guardfab.hgs.admin_baselines`),
which decode it as JSON: ``{"result": {...}, "summary": {...} | null}`` with the
summary in :meth:`HostSummary.to_dict` form.

Plain JSON, not RFC 8785: the record is neither signed nor hashed. The bulk of
a TPM host's record is its summary's events: the verified boot log itself
(base64url, ~16 K characters for 100 events; their records and descriptions
are made when someone reads them, docs/adr/0018), the same for every
attestation until the host reboots. The verifier shares one events source per
distinct log and quote selection, so its JSON is kept here per source and
spliced in. The rest (times, PCRs, facts from this quote, the verdicts) is
encoded afresh every time.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.summary import HostSummary

#: Events members whose JSON is kept: about one per distinct boot of the fleet.
EVENTS_CACHE_SIZE = 256


class _EventsJson:
    """JSON of a summary's events member, by the identity of what it is made from.

    Keyed by ``id()`` of the summary's events source (the verifier's shared
    :class:`~guardfab.attestation.summary.QuotedLog`, or a records tuple) and
    holding the source itself, so an id is never reused for another source
    while its entry exists; a hit also checks identity.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[int, int], tuple[object, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, summary: HostSummary) -> str:
        source = summary.events_identity
        key = (id(source), summary.uintn_size)
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] is source:
                self._items.move_to_end(key)
                return found[1]
        member = json_text(summary.events_dict())
        text = member[1:-1]  # '"event_log":"..."' or '"events":[...]', without the braces
        with self._lock:
            self._items[key] = (source, text)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return text


_EVENTS = _EventsJson(EVENTS_CACHE_SIZE)


def encode_last_record(result: AttestationResult, result_json: str | None = None) -> bytes:
    """The stored record of ``result`` (what ``json.loads`` gives back is documented above).

    ``result_json``: ``json_text(result.to_dict())`` if the caller already made it
    (the HGS makes it once for both this record and its answer to the host).
    """
    if result_json is None:
        result_json = json_text(result.to_dict())
    summary = "null" if result.summary is None else _summary_json(result.summary)
    return ('{"result":' + result_json + ',"summary":' + summary + "}").encode("utf-8")


def json_text(value: Any) -> str:
    """Compact JSON, byte for byte what Starlette's ``JSONResponse`` sends for ``value``."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _summary_json(summary: HostSummary) -> str:
    """``summary.to_dict()`` as JSON, its events member from the cache (placed last)."""
    head = json_text(summary.head_dict())
    return head[:-1] + "," + _EVENTS.get(summary) + "}"
