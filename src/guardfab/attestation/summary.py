"""The verified, minimal record of one host's last attestation.

Policies, baseline matching and ``hgs what-if`` all read a :class:`HostSummary`,
never raw evidence: it is built only after the quote verified and the event log
replayed to the quoted PCRs, so everything in it is bound by the TPM. Keeping
the policy input this small is what lets the HGS re-evaluate every host against
a proposed trust change without asking hosts for new evidence. It holds no
secrets: PCR values, the facts the policies read, and the events of the quoted
PCRs -- stored as the boot log they come from (read back, it must replay to the
stored PCRs), whose events are made and described only when someone reads
them; summaries stored before that keep one record (digest, type, a one-line
description) per event.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from guardfab.errors import FormatError, VerificationError
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.decode import decode
from guardfab.tpm.eventlog import PCR_COUNT, EventLog, Measurement, parse_event_log
from guardfab.tpm.logfacts import Fact

_SHA256 = int(TpmAlg.SHA256)
#: Descriptions longer than this are cut: they are for people, never decisive.
MAX_SUMMARY_CHARS = 160
#: Bounds for stored records (a real log has 50-300 events).
MAX_STORED_EVENTS = 4096
#: A stored boot log (base64url): evidence carries at most 1 MiB of log.
MAX_STORED_LOG_CHARS = (1024 * 1024 * 4 + 2) // 3


#: Event data up to this size has its description cached: hosts re-attest with
#: the same boot, so the same events are described again and again when the
#: service stores their summaries. Larger data (a dbx update) is not kept.
_CACHED_DATA_BYTES = 4096


@functools.lru_cache(maxsize=16384)
def _describe(event_type: int, data: bytes, uintn_size: int) -> str:
    text = decode(event_type, data, uintn_size).summary
    return text if len(text) <= MAX_SUMMARY_CHARS else text[: MAX_SUMMARY_CHARS - 3] + "..."


class EventRecord(Measurement):
    """One measured event of a quoted PCR: what the quote binds, plus a description.

    The fields are the log's :class:`~guardfab.tpm.eventlog.Measurement`: ``digest``
    is the event's SHA-256 digest (the bank the quote covers); ``data`` is the raw
    event data while the log is at hand (decoded only when a person needs it, so
    the hot path never pays for decoding); ``text`` is the stored description once
    the data is gone.
    """

    __slots__ = ()

    def describe(self, uintn_size: int = 8) -> str:
        """A one-line description of the event data, for diffs and explanations."""
        if self.text is not None:
            return self.text
        if len(self.data) <= _CACHED_DATA_BYTES:
            return _describe(self.event_type, self.data, uintn_size)
        return _describe.__wrapped__(self.event_type, self.data, uintn_size)

    def to_dict(self, uintn_size: int = 8) -> dict[str, Any]:
        """The stored form: no raw data, only its description."""
        return {
            "number": self.number,
            "pcr": self.pcr,
            "type": self.event_type,
            "digest": self.digest.hex(),
            "summary": self.describe(uintn_size),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> EventRecord:
        """Load a stored record; strict, since a bad record would mislead a diff."""
        what = "event record"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"number", "pcr", "type", "digest", "summary"}, what=what)
        pcr = require_int(obj, "pcr", what=what)
        if pcr >= PCR_COUNT:
            raise FormatError(f"{what}: PCR {pcr} is not below {PCR_COUNT}")
        return cls(
            number=require_int(obj, "number", what=what),
            pcr=pcr,
            event_type=require_int(obj, "type", what=what),
            digest=hex_digest(obj, "digest", what=what),
            text=require_str(obj, "summary", what=what, max_len=MAX_SUMMARY_CHARS),
        )


def hex_digest(obj: Mapping[str, Any], key: str, *, what: str, size: int = 32) -> bytes:
    """Read a lower-case hex SHA-256 (by default) digest field, exactly ``size`` bytes."""
    text = obj.get(key)
    if not isinstance(text, str):
        raise FormatError(f"{what}: field '{key}' must be a string")
    if len(text) > 2 * size:
        raise FormatError(f"{what}: field '{key}' is longer than {2 * size} characters")
    try:
        value = bytes.fromhex(text)
    except ValueError as exc:
        raise FormatError(f"{what}: field '{key}' is not hex") from exc
    if len(value) != size or text != value.hex():
        raise FormatError(f"{what}: field '{key}' must be {size} bytes of lower-case hex")
    return value


_SHA256_HEX_CHARS = 64
#: The canonical spelling of every PCR index: what a PCR map's keys must be.
_PCR_INDEXES = {str(index): index for index in range(PCR_COUNT)}


def pcr_map_from_dict(obj: Any, *, what: str) -> dict[int, bytes]:
    """Read ``{"0": hex, ...}`` (decimal PCR indexes, canonical spelling) as SHA-256 values."""
    obj = require_dict(obj, what=what)
    if len(obj) > PCR_COUNT:
        raise FormatError(f"{what}: more than {PCR_COUNT} PCRs")
    values: dict[int, bytes] = {}
    for key, text in obj.items():
        index = _PCR_INDEXES.get(key)
        if index is None:
            if isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key:
                raise FormatError(f"{what}: PCR {key} is not below {PCR_COUNT}")
            raise FormatError(f"{what}: PCR index {key!r} is not a decimal number")
        # Every attestation reads a dozen values: a plain ``str`` of the right length is
        # read once per exact text (a subclass could redefine equality), inline, with no
        # per-field error context; anything else, and a non-canonical text, goes to
        # hex_digest, which says exactly why (or takes a subclass).
        if type(text) is str and len(text) == _SHA256_HEX_CHARS:
            try:
                values[index] = _canonical_sha256(text)
                continue
            except ValueError:
                pass
        values[index] = hex_digest(obj, key, what=f"{what} PCR {key}")
    return values


#: Canonical PCR values kept by their exact text: a host reports the same values at
#: every attestation until it reboots, and hosts of one build share most of them.
PCR_VALUE_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=PCR_VALUE_CACHE_SIZE)
def _canonical_sha256(text: str) -> bytes:
    """The 32 bytes of 64 lower-case hex characters (ValueError, never kept, if not)."""
    value = bytes.fromhex(text)
    if value.hex() != text:
        raise ValueError("not canonical lower-case hex")
    return value


def pcr_map_to_dict(values: Mapping[int, bytes]) -> dict[str, str]:
    """The JSON form of a PCR map: decimal index to lower-case hex, in index order."""
    return {str(index): values[index].hex() for index in sorted(values)}


#: A fact as a summary holds it: the log's own :class:`~guardfab.tpm.logfacts.Fact`
#: (its JSON value, None when not shown; event numbers; a note). A verifier hands a
#: log's facts on as they are (a record type of its own cost a copy per fact per new
#: log) and makes the quote's facts as the same type; stored by :func:`fact_to_dict`.
FactRecord = Fact


def fact_to_dict(fact: FactRecord) -> dict[str, Any]:
    """A fact's stored (JSON) form."""
    return {"value": fact.value, "events": list(fact.events), "note": fact.note}


def fact_from_dict(obj: Any, *, what: str) -> FactRecord:
    """Load a stored fact."""
    obj = require_dict(obj, what=what)
    reject_unknown_fields(obj, _FACT_FIELDS, what=what)
    events = obj.get("events")
    if not isinstance(events, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in events
    ):
        raise FormatError(f"{what}: 'events' must be a list of integers")
    note = require_str(obj, "note", what=what)
    return FactRecord(obj.get("value"), tuple(events), note)


_FACT_FIELDS = frozenset(FactRecord._fields)


class QuotedLog:
    """A verified boot log and the PCRs its quote covers: where a summary's events come from.

    The verifier keeps one per distinct log and quote selection. The summary's
    records (every quoted event) are made from it only when someone reads them
    (``hgs explain``, what-if, a baseline from a host), and the HGS stores the
    log itself, once per boot, instead of a description of every event
    (docs/adr/0018-summary-events-from-the-stored-log.md).
    """

    __slots__ = ("_by_pcr", "_events", "data", "log", "pcrs")

    def __init__(self, data: bytes, log: EventLog, pcrs: Iterable[int]) -> None:
        self.data = data
        self.log = log
        self.pcrs = frozenset(pcrs)
        self._events: tuple[EventRecord, ...] | None = None
        self._by_pcr: dict[int, tuple[EventRecord, ...]] = {}

    def events(self) -> tuple[EventRecord, ...]:
        """Every SHA-256 event of the quoted PCRs, as records (made once, then kept)."""
        if self._events is None:
            self._events = quoted_events(self.log, self.pcrs)
        return self._events

    def events_in(self, pcr: int) -> tuple[EventRecord, ...]:
        """The SHA-256 events of one quoted PCR (made without the others, then kept)."""
        found = self._by_pcr.get(pcr)
        if found is None:
            if pcr not in self.pcrs:
                return ()
            found = tuple(self.log.measurements(_SHA256, (pcr,), EventRecord))
            self._by_pcr[pcr] = found
        return found


class HostSummary:
    """What the HGS keeps from a host's last verified TPM attestation.

    Attributes:
        host_id: the host's registered identity.
        verified_at: when the evidence was verified (the caller's clock).
        pcrs: the quoted SHA-256 PCR values, by index (the quote's selection).
        events: the events of quoted PCRs that extend the SHA-256 bank, in log
            order. Events of PCRs outside the quote are left out: nothing binds
            them. Given as records, or as the :class:`QuotedLog` they are made
            from on first read (what a verifier passes: a policy reads one PCR's
            events, and a host that matches a baseline needs none).
        facts: what the policies read, by name (:mod:`guardfab.tpm.logfacts`
            plus the quote's clock facts and the CI policy PCR digests).
        uintn_size: UEFI UINTN size from the log header, for decoding.
    """

    __slots__ = (
        "_by_pcr",
        "_events",
        "_source",
        "facts",
        "host_id",
        "pcrs",
        "uintn_size",
        "verified_at",
    )
    __hash__ = None  # type: ignore[assignment]  # mutable caches inside; compared by value

    def __init__(
        self,
        host_id: str,
        verified_at: datetime.datetime,
        pcrs: Mapping[int, bytes],
        events: tuple[EventRecord, ...] | QuotedLog,
        facts: Mapping[str, FactRecord],
        *,
        uintn_size: int = 8,
    ) -> None:
        self.host_id = host_id
        self.verified_at = verified_at
        self.pcrs: Mapping[int, bytes] = MappingProxyType(dict(pcrs))
        self.facts: Mapping[str, FactRecord] = MappingProxyType(dict(facts))
        self.uintn_size = uintn_size
        self._source = events if isinstance(events, QuotedLog) else None
        self._events = None if isinstance(events, QuotedLog) else tuple(events)
        self._by_pcr: Mapping[int, tuple[EventRecord, ...]] | None = None

    @property
    def events(self) -> tuple[EventRecord, ...]:
        """Every quoted SHA-256 event, in log order (made from the log on first read)."""
        if self._events is None:
            assert self._source is not None  # one of the two is always set
            self._events = self._source.events()
        return self._events

    @property
    def source(self) -> QuotedLog | None:
        """The verified log the events come from (None for a summary stored as records)."""
        return self._source

    def events_in(self, pcr: int) -> tuple[EventRecord, ...]:
        """The events of one PCR, in log order (empty for a PCR the quote did not cover)."""
        if self._events is None and self._source is not None:
            return self._source.events_in(pcr)
        if self._by_pcr is None:
            self._by_pcr = events_by_pcr(self.events)
        return self._by_pcr.get(pcr, ())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostSummary):
            return NotImplemented
        return self._compared() == other._compared()

    def _compared(self) -> tuple[Any, ...]:
        return (
            self.host_id,
            self.verified_at,
            dict(self.pcrs),
            self.events,
            dict(self.facts),
            self.uintn_size,
        )

    def __repr__(self) -> str:
        return (
            f"HostSummary(host_id={self.host_id!r}, verified_at={self.verified_at!r}, "
            f"pcrs={sorted(self.pcrs)}, facts={sorted(self.facts)})"
        )

    def replace(self, **changes: Any) -> HostSummary:
        """A copy with some fields changed (``events`` as records or a :class:`QuotedLog`)."""
        fields: dict[str, Any] = {
            "host_id": self.host_id,
            "verified_at": self.verified_at,
            "pcrs": self.pcrs,
            "events": self._source if self._events is None else self._events,
            "facts": self.facts,
            "uintn_size": self.uintn_size,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"HostSummary has no field(s) {', '.join(sorted(unknown))}")
        return HostSummary(**(fields | changes))

    def fact(self, name: str) -> FactRecord:
        """One fact by name; an unknown name is a fact nobody could show."""
        found = self.facts.get(name)
        return found if found is not None else FactRecord(None, (), f"no fact named {name}")

    def facts_dict(self) -> dict[str, Any]:
        """Facts as the API shows them: values by name, plus ``evidence`` (events, note)."""
        out: dict[str, Any] = {name: fact.value for name, fact in self.facts.items()}
        out["evidence"] = {
            name: {"events": list(fact.events), "note": fact.note}
            for name, fact in self.facts.items()
        }
        return out

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON): :meth:`head_dict` plus :meth:`events_dict`."""
        return self.head_dict() | self.events_dict()

    def head_dict(self) -> dict[str, Any]:
        """The stored form without the events (what changes at every attestation)."""
        return {
            "host_id": self.host_id,
            "verified_at": self.verified_at.isoformat(),
            "pcrs": {"sha256": pcr_map_to_dict(self.pcrs)},
            "facts": {name: fact_to_dict(fact) for name, fact in self.facts.items()},
            "uintn_size": self.uintn_size,
        }

    def events_dict(self) -> dict[str, Any]:
        """The stored events: the verified log itself, or (summaries stored so) the records.

        A summary made by a verifier stores its boot log (``event_log``, base64url):
        one C call, where a description of every event cost a decode each, and the
        same for every attestation of the boot. Records are stored, without raw
        data, only for a summary that was loaded from records.
        """
        if self._source is not None:
            return {"event_log": b64url_encode(self._source.data)}
        return {"events": [event.to_dict(self.uintn_size) for event in self.events]}

    @property
    def events_identity(self) -> object:
        """The object :meth:`events_dict` is a pure function of (with ``uintn_size``)."""
        return self._source if self._source is not None else self.events

    @classmethod
    def from_dict(cls, obj: Any) -> HostSummary:
        """Load a stored summary; strict, unknown fields rejected.

        The events are either the stored boot log (parsed, and replayed: it must
        reproduce every stored PCR it extends) or, in records written before
        that, one record per event.
        """
        what = "host summary"
        obj = require_dict(obj, what=what)
        allowed = {"host_id", "verified_at", "pcrs", "facts", "uintn_size"}
        form = "event_log" if "event_log" in obj else "events"
        reject_unknown_fields(obj, allowed | {form}, what=what)
        pcrs_obj = require_dict(obj.get("pcrs"), what=f"{what} pcrs")
        reject_unknown_fields(pcrs_obj, {"sha256"}, what=f"{what} pcrs")
        pcrs = pcr_map_from_dict(pcrs_obj.get("sha256"), what=f"{what} pcrs")
        facts = require_dict(obj.get("facts"), what=f"{what} facts")
        uintn_size = require_int(obj, "uintn_size", what=what)
        events: tuple[EventRecord, ...] | QuotedLog
        if form == "event_log":
            events = _stored_log(obj, pcrs, what=what)
            uintn_size = events.log.uintn_size
        else:
            events = _stored_records(obj.get("events"), what=what)
        return cls(
            host_id=require_str(obj, "host_id", what=what, max_len=256),
            verified_at=parse_time(require_str(obj, "verified_at", what=what), what=what),
            pcrs=pcrs,
            events=events,
            facts={
                str(name): fact_from_dict(fact, what=f"{what} fact {name}")
                for name, fact in facts.items()
            },
            uintn_size=uintn_size,
        )


def _stored_records(events: Any, *, what: str) -> tuple[EventRecord, ...]:
    if not isinstance(events, list) or len(events) > MAX_STORED_EVENTS:
        raise FormatError(f"{what}: 'events' must be a list of at most {MAX_STORED_EVENTS}")
    return tuple(EventRecord.from_dict(event) for event in events)


def _stored_log(obj: Mapping[str, Any], pcrs: Mapping[int, bytes], *, what: str) -> QuotedLog:
    """The stored boot log, parsed, and proven to replay to the stored PCRs it extends."""
    text = require_str(dict(obj), "event_log", what=what, max_len=MAX_STORED_LOG_CHARS)
    data = b64url_decode(text, what=f"{what} event_log")
    try:
        log = parse_event_log(data)
        replayed = log.replay([_SHA256])[_SHA256]
    except (FormatError, VerificationError) as exc:
        raise FormatError(f"{what}: the stored event log is unusable: {exc}") from exc
    wrong = sorted(pcr for pcr, value in replayed.items() if pcrs.get(pcr, value) != value)
    if wrong:
        raise FormatError(f"{what}: the stored event log does not replay to PCR(s) {wrong}")
    return QuotedLog(data, log, pcrs)


def parse_time(text: str, *, what: str) -> datetime.datetime:
    """Parse an ISO 8601 timestamp that must carry a time zone."""
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError as exc:
        raise FormatError(f"{what}: not an ISO 8601 time") from exc
    if value.tzinfo is None:
        raise FormatError(f"{what}: the time has no time zone")
    return value


def quoted_events(log: EventLog, quoted: Iterable[int]) -> tuple[EventRecord, ...]:
    """The SHA-256 events of the quoted PCRs, as records (no decoding: that is lazy)."""
    return tuple(log.measurements(_SHA256, frozenset(quoted), EventRecord))


def events_by_pcr(events: Iterable[EventRecord]) -> Mapping[int, tuple[EventRecord, ...]]:
    """Events grouped by PCR, each group in log order (read-only)."""
    groups: dict[int, list[EventRecord]] = {}
    for event in events:
        groups.setdefault(event.pcr, []).append(event)
    return MappingProxyType({pcr: tuple(group) for pcr, group in groups.items()})
