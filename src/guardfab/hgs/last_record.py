"""The bytes of ``hosts/last/<host>``: a host's last result and verified summary.

Written on every attestation and read by explain, what-if and baselines from
hosts (:mod:`guardfab.hgs.admin_reports`, :mod:`guardfab.hgs.admin_baselines`),
which decode it as JSON: ``{"result": {...}, "summary": {...} | null}`` with the
summary in :meth:`HostSummary.to_dict` form.

Plain JSON, not RFC 8785: the record is neither signed nor hashed. Most of a TPM
host's record is its summary's list of events (100 events: ~20 KB), which is the
same on every attestation until the host reboots; the verifier keeps one events
tuple per distinct boot log, so its JSON is kept here per tuple and spliced in.
The rest (times, PCRs, facts from this quote, the verdicts) is encoded afresh
every time.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from typing import Any

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.summary import EventRecord, HostSummary

#: Event lists whose JSON is kept: about one per distinct boot of the fleet.
EVENTS_CACHE_SIZE = 256
#: How a JSON object whose last member is null ends: where a cached member goes.
_NULL_TAIL = "null}"


class _EventsJson:
    """JSON of event tuples, by the tuple's identity (the verifier shares one per log).

    Keyed by ``id()`` and holding the tuple itself, so an id is never reused for
    another tuple while its entry exists; a hit also checks identity.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[int, int], tuple[tuple[EventRecord, ...], str]]
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(self, events: tuple[EventRecord, ...], uintn_size: int) -> str:
        key = (id(events), uintn_size)
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] is events:
                self._items.move_to_end(key)
                return found[1]
        text = _dumps([event.to_dict(uintn_size) for event in events])
        with self._lock:
            self._items[key] = (events, text)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return text


_EVENTS = _EventsJson(EVENTS_CACHE_SIZE)


def encode_last_record(result: AttestationResult) -> bytes:
    """The stored record of ``result`` (what ``json.loads`` gives back is documented above)."""
    text = _with_last_member({"result": result.to_dict(), "summary": None})
    if result.summary is None:
        return text.encode("utf-8")
    return _spliced(text, _summary_json(result.summary)).encode("utf-8")


def _summary_json(summary: HostSummary) -> str:
    """``summary.to_dict()`` as JSON, its events from the cache (moved to the end)."""
    fields = dataclasses.replace(summary, events=(), by_pcr={}).to_dict()
    del fields["events"]
    fields["events"] = None
    return _spliced(_with_last_member(fields), _EVENTS.get(summary.events, summary.uintn_size))


def _with_last_member(value: dict[str, Any]) -> str:
    """JSON of ``value``, whose last member must be null (to be replaced by a splice)."""
    text = _dumps(value)
    if not text.endswith(_NULL_TAIL):
        raise AssertionError("the member to splice must be the last one and null")
    return text


def _spliced(text: str, member: str) -> str:
    return text[: -len(_NULL_TAIL)] + member + "}"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
