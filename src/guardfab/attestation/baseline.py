"""TPM baselines: the known-good boot of a reference host, and what differs from it.

A baseline is the SHA-256 PCR values of a PCR set (0-7 by default) from a
reference host, plus that host's events in those PCRs and its secure boot
variable digests. Matching is a dictionary lookup on the tuple of PCR values,
precomputed per PCR set (:class:`BaselineSet`), so a host that matches costs
nothing. Only a host that matches no baseline pays for the event-by-event diff
against every baseline, which picks the closest (fewest differing events) and
names each event that is missing, extra or changed: the refusal a host gets
and what ``hgs explain HOST`` prints.

A host's new log after a firmware or secure boot update can be filed as a
:class:`CandidateBaseline` and approved with one command; the transitions here
are pure (the service stores the results).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import enum
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from guardfab.attestation.summary import (
    MAX_STORED_EVENTS,
    EventRecord,
    HostSummary,
    hex_digest,
    parse_time,
    pcr_map_from_dict,
    pcr_map_to_dict,
    quoted_events,
)
from guardfab.errors import FormatError, PolicyError, UsageError
from guardfab.formats.encoding import reject_unknown_fields, require_dict, require_int, require_str
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import PCR_COUNT, EventLog, parse_event_log
from guardfab.tpm.events import event_type_name

_SHA256 = int(TpmAlg.SHA256)
#: The PCRs a baseline covers unless told otherwise: the pre-OS (firmware) PCRs.
DEFAULT_BASELINE_PCRS: tuple[int, ...] = tuple(range(8))
#: Secure boot policy variables whose measurements Hgs_SecureBootSettings compares.
SECURE_BOOT_VARIABLE_NAMES = ("PK", "KEK", "db", "dbx")
MAX_NAME_CHARS = 128


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise UsageError(f"baseline name {name!r}: 1 to {MAX_NAME_CHARS} printable characters")
    return name


def _check_pcr_set(pcrs: Iterable[int]) -> tuple[int, ...]:
    ordered = tuple(sorted(set(pcrs)))
    if not ordered or any(not 0 <= pcr < PCR_COUNT for pcr in ordered):
        raise UsageError(f"a baseline needs one or more PCRs in 0-{PCR_COUNT - 1}")
    return ordered


def secure_boot_digests(value: Any) -> dict[str, bytes] | None:
    """SHA-256 digests of the PK/KEK/db/dbx measurements from a ``secure_boot_variables`` fact."""
    if not isinstance(value, dict):
        return None
    try:
        return {name: bytes.fromhex(value[name]["sha256"]) for name in SECURE_BOOT_VARIABLE_NAMES}
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class TpmBaseline:
    """A registered known-good boot: PCR values, reference events and secure boot digests.

    Attributes:
        name: the administrator's name for it (unique).
        pcrs: SHA-256 values of every PCR in the set (an untouched PCR has its reset value).
        events: the reference host's events in those PCRs, for explaining mismatches.
        secure_boot_variables: SHA-256 digests of the PK, KEK, db and dbx measurements,
            or None if the reference log did not show all four.
        uintn_size: UEFI UINTN size of the reference log, for decoding its events.
    """

    name: str
    pcrs: Mapping[int, bytes]
    events: tuple[EventRecord, ...] = ()
    secure_boot_variables: Mapping[str, bytes] | None = None
    uintn_size: int = 8
    pcr_set: tuple[int, ...] = field(init=False, compare=False)
    values: tuple[bytes, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        pcr_set = _check_pcr_set(self.pcrs)
        if any(len(value) != 32 for value in self.pcrs.values()):
            raise UsageError(f"baseline {self.name}: PCR values must be SHA-256 (32 bytes)")
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))
        object.__setattr__(self, "pcr_set", pcr_set)
        object.__setattr__(self, "values", tuple(self.pcrs[pcr] for pcr in pcr_set))
        if self.secure_boot_variables is not None:
            object.__setattr__(
                self, "secure_boot_variables", MappingProxyType(dict(self.secure_boot_variables))
            )

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON)."""
        sb = self.secure_boot_variables
        return {
            "name": self.name,
            "pcrs": {"sha256": pcr_map_to_dict(self.pcrs)},
            "events": [event.to_dict(self.uintn_size) for event in self.events],
            "secure_boot_variables": None if sb is None else {k: v.hex() for k, v in sb.items()},
            "uintn_size": self.uintn_size,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> TpmBaseline:
        """Load a stored baseline (strict)."""
        what = "TPM baseline"
        obj = require_dict(obj, what=what)
        allowed = {"name", "pcrs", "events", "secure_boot_variables", "uintn_size"}
        reject_unknown_fields(obj, allowed, what=what)
        pcrs = require_dict(obj.get("pcrs"), what=f"{what} pcrs")
        reject_unknown_fields(pcrs, {"sha256"}, what=f"{what} pcrs")
        events = obj.get("events")
        if not isinstance(events, list) or len(events) > MAX_STORED_EVENTS:
            raise FormatError(f"{what}: 'events' must be a list of at most {MAX_STORED_EVENTS}")
        sb = obj.get("secure_boot_variables")
        if sb is not None:
            sb = require_dict(sb, what=f"{what} secure_boot_variables")
            reject_unknown_fields(sb, set(SECURE_BOOT_VARIABLE_NAMES), what=what)
            sb = {name: hex_digest(sb, name, what=what) for name in SECURE_BOOT_VARIABLE_NAMES}
        try:
            return cls(
                name=require_str(obj, "name", what=what, max_len=MAX_NAME_CHARS),
                pcrs=pcr_map_from_dict(pcrs.get("sha256"), what=f"{what} pcrs"),
                events=tuple(EventRecord.from_dict(event) for event in events),
                secure_boot_variables=sb,
                uintn_size=require_int(obj, "uintn_size", what=what),
            )
        except UsageError as exc:
            raise FormatError(f"{what}: {exc}") from exc


def baseline_from_log(
    name: str, log_bytes: bytes, *, pcrs: Iterable[int] = DEFAULT_BASELINE_PCRS
) -> TpmBaseline:
    """Make a baseline from a reference host's event log (``hgs baseline add``).

    The log is replayed in the SHA-256 bank; PCRs it never extends keep their
    reset value. Prefer :func:`baseline_from_summary` (a log that already
    matched a verified quote) where possible: a log file alone proves nothing.

    Raises:
        FormatError: the log does not parse or has no SHA-256 bank.
        UsageError: a bad name or PCR set.
    """
    pcr_set = _check_pcr_set(pcrs)
    log = parse_event_log(log_bytes)
    if _SHA256 not in log.replayable_banks:
        raise FormatError("the reference event log has no SHA-256 bank")
    values = _pcr_values(log, pcr_set)
    sb = secure_boot_digests(log.facts(_SHA256).secure_boot_variables.value)
    events = tuple(
        event._replace(text=event.describe(log.uintn_size), data=b"")
        for event in quoted_events(log, pcr_set)
    )
    return TpmBaseline(name, values, events, sb, log.uintn_size)


def _pcr_values(log: EventLog, pcr_set: Sequence[int]) -> dict[int, bytes]:
    replayed = log.replay([_SHA256])[_SHA256]
    initial = log.initial_pcrs(_SHA256)
    return {pcr: replayed.get(pcr, initial[pcr]) for pcr in pcr_set}


def baseline_from_summary(
    name: str, summary: HostSummary, *, pcrs: Iterable[int] = DEFAULT_BASELINE_PCRS
) -> TpmBaseline:
    """Make a baseline from a host's verified attestation (a candidate's source).

    Raises:
        UsageError: the host's quote did not cover every PCR of the set, or a bad name.
    """
    pcr_set = _check_pcr_set(pcrs)
    missing = [pcr for pcr in pcr_set if pcr not in summary.pcrs]
    if missing:
        raise UsageError(f"the host's quote does not cover PCR(s) {missing}")
    events = tuple(
        event._replace(text=event.describe(summary.uintn_size), data=b"")
        for event in summary.events
        if event.pcr in pcr_set
    )
    sb = secure_boot_digests(summary.fact("secure_boot_variables").value)
    values = {pcr: summary.pcrs[pcr] for pcr in pcr_set}
    return TpmBaseline(name, values, events, sb, summary.uintn_size)


# --------------------------------------------------------------------------- diffs


class DiffKind(enum.StrEnum):
    """How one event differs from the baseline."""

    MISSING = "missing"  # in the baseline, not on the host
    EXTRA = "extra"  # on the host, not in the baseline
    CHANGED = "changed"  # same place and type, another digest


@dataclass(frozen=True, slots=True)
class EventDiff:
    """One differing event, with both sides' records (None where a side has none)."""

    kind: DiffKind
    pcr: int
    event_type: int
    baseline_event: EventRecord | None
    host_event: EventRecord | None

    def describe(self, baseline_uintn: int = 8, host_uintn: int = 8) -> str:
        """One line for a person: PCR, kind, type, event numbers, digests and summaries."""
        parts = [f"PCR {self.pcr} {self.kind.value} {event_type_name(self.event_type)}"]
        if self.baseline_event is not None:
            ev = self.baseline_event
            parts.append(
                f"baseline #{ev.number} sha256:{ev.digest.hex()[:16]} {ev.describe(baseline_uintn)}"
            )
        if self.host_event is not None:
            ev = self.host_event
            parts.append(
                f"host #{ev.number} sha256:{ev.digest.hex()[:16]} {ev.describe(host_uintn)}"
            )
        return "; ".join(parts)

    def to_dict(self, baseline_uintn: int = 8, host_uintn: int = 8) -> dict[str, Any]:
        """JSON form."""
        return {
            "kind": self.kind.value,
            "pcr": self.pcr,
            "type": event_type_name(self.event_type),
            "baseline": None
            if self.baseline_event is None
            else self.baseline_event.to_dict(baseline_uintn),
            "host": None if self.host_event is None else self.host_event.to_dict(host_uintn),
        }


def _replaced(pcr: int, old: Sequence[EventRecord], new: Sequence[EventRecord]) -> list[EventDiff]:
    """Pair a replaced run position by position: same type is a change, else missing + extra."""
    out: list[EventDiff] = []
    for index in range(max(len(old), len(new))):
        a = old[index] if index < len(old) else None
        b = new[index] if index < len(new) else None
        if a is not None and b is not None and a.event_type == b.event_type:
            out.append(EventDiff(DiffKind.CHANGED, pcr, a.event_type, a, b))
            continue
        if a is not None:
            out.append(EventDiff(DiffKind.MISSING, pcr, a.event_type, a, None))
        if b is not None:
            out.append(EventDiff(DiffKind.EXTRA, pcr, b.event_type, None, b))
    return out


def diff_events(
    pcr: int, baseline: Sequence[EventRecord], host: Sequence[EventRecord]
) -> list[EventDiff]:
    """The event-by-event difference of one PCR (longest common subsequence of type+digest)."""
    a = [(event.event_type, event.digest) for event in baseline]
    b = [(event.event_type, event.digest) for event in host]
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    out: list[EventDiff] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "delete":
            out += [
                EventDiff(DiffKind.MISSING, pcr, e.event_type, e, None) for e in baseline[i1:i2]
            ]
        elif tag == "insert":
            out += [EventDiff(DiffKind.EXTRA, pcr, e.event_type, None, e) for e in host[j1:j2]]
        elif tag == "replace":
            out += _replaced(pcr, baseline[i1:i2], host[j1:j2])
    return out


@dataclass(frozen=True)
class BaselineComparison:
    """How a host's boot compares with one baseline (the match, or the closest).

    Attributes:
        baseline: the baseline's name.
        matched: every PCR of the baseline's set has the baseline's value.
        differences: the differing events, PCR by PCR (empty when matched).
        pcr_mismatches: PCRs of the set whose quoted value differs.
        unquoted: PCRs of the set that the host's quote did not cover.
    """

    baseline: TpmBaseline
    matched: bool
    differences: tuple[EventDiff, ...] = ()
    pcr_mismatches: tuple[int, ...] = ()
    unquoted: tuple[int, ...] = ()
    host_uintn: int = 8

    @property
    def rank(self) -> tuple[bool, int, int, str]:
        """Sort key for "closest": comparable sets first, then fewest differing events."""
        name = self.baseline.name
        return (bool(self.unquoted), len(self.differences), len(self.pcr_mismatches), name)

    def lines(self) -> list[str]:
        """The explanation for a person, one line per difference."""
        name = self.baseline.name
        if self.matched:
            return [f"matches baseline '{name}' (PCRs {list(self.baseline.pcr_set)})"]
        out = [
            f"closest baseline '{name}': {len(self.differences)} event(s) differ "
            f"in PCR(s) {list(self.pcr_mismatches)}"
        ]
        if self.unquoted:
            out.append(f"  the quote does not cover baseline PCR(s) {list(self.unquoted)}")
        out += [
            "  " + d.describe(self.baseline.uintn_size, self.host_uintn) for d in self.differences
        ]
        explained = {d.pcr for d in self.differences}
        out += [
            f"  PCR {pcr}: the same events, another start value (startup locality)"
            for pcr in self.pcr_mismatches
            if pcr not in explained and pcr not in self.unquoted
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what a refusal carries)."""
        uintn = (self.baseline.uintn_size, self.host_uintn)
        return {
            "baseline": self.baseline.name,
            "matched": self.matched,
            "pcr_mismatches": list(self.pcr_mismatches),
            "unquoted_pcrs": list(self.unquoted),
            "differences": [d.to_dict(*uintn) for d in self.differences],
        }


def compare(summary: HostSummary, baseline: TpmBaseline) -> BaselineComparison:
    """Compare a host with one baseline, event by event."""
    unquoted = tuple(pcr for pcr in baseline.pcr_set if pcr not in summary.pcrs)
    mismatches = tuple(
        pcr for pcr in baseline.pcr_set if summary.pcrs.get(pcr) != baseline.pcrs[pcr]
    )
    if not mismatches:
        return BaselineComparison(baseline, True, host_uintn=summary.uintn_size)
    by_pcr: dict[int, list[EventRecord]] = {}
    for event in baseline.events:
        by_pcr.setdefault(event.pcr, []).append(event)
    differences: list[EventDiff] = []
    for pcr in mismatches:
        if pcr not in unquoted:
            differences += diff_events(pcr, by_pcr.get(pcr, []), summary.events_in(pcr))
    return BaselineComparison(
        baseline, False, tuple(differences), mismatches, unquoted, summary.uintn_size
    )


def _secure_boot_key(digests: Mapping[str, bytes]) -> tuple[bytes, ...]:
    return tuple(digests.get(name, b"") for name in SECURE_BOOT_VARIABLE_NAMES)


class BaselineSet:
    """The registered baselines, indexed for O(1) matching by PCR values.

    Baselines are grouped by PCR set (usually there is one, 0-7); for each set a
    dictionary maps the tuple of PCR values to the baseline. A host matches if,
    for some set, the tuple of its quoted values is a key.
    """

    __slots__ = ("_by_name", "_by_secure_boot", "_by_secure_boot_hex", "_index", "_matched")

    def __init__(self, baselines: Iterable[TpmBaseline] = ()) -> None:
        self._by_name: dict[str, TpmBaseline] = {}
        # PCR set -> the set's values -> baseline; a host's key may hold None (unquoted).
        self._index: dict[tuple[int, ...], dict[tuple[bytes | None, ...], TpmBaseline]] = {}
        self._by_secure_boot: dict[tuple[bytes, ...], TpmBaseline] = {}
        # The same table keyed by the digests' lower-case hex: what a fact carries.
        self._by_secure_boot_hex: dict[tuple[str, ...], TpmBaseline] = {}
        # A match is the same immutable comparison every time; one per baseline and
        # UINTN size a log can declare (4 or 8), made here rather than per attestation.
        self._matched: dict[tuple[str, int], BaselineComparison] = {}
        for baseline in baselines:
            if baseline.name in self._by_name:
                raise UsageError(f"two baselines are named {baseline.name!r}")
            self._by_name[baseline.name] = baseline
            self._index.setdefault(baseline.pcr_set, {}).setdefault(baseline.values, baseline)
            for uintn in (4, 8):
                self._matched[baseline.name, uintn] = BaselineComparison(
                    baseline, True, host_uintn=uintn
                )
            if baseline.secure_boot_variables is not None:
                key = _secure_boot_key(baseline.secure_boot_variables)
                self._by_secure_boot.setdefault(key, baseline)
                hex_key = tuple(digest.hex() for digest in key)
                self._by_secure_boot_hex.setdefault(hex_key, baseline)

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[TpmBaseline]:
        return iter(self._by_name.values())

    @property
    def names(self) -> frozenset[str]:
        """The registered baseline names."""
        return frozenset(self._by_name)

    def get(self, name: str) -> TpmBaseline | None:
        """A baseline by name."""
        return self._by_name.get(name)

    def with_secure_boot(self, digests: Mapping[str, bytes]) -> TpmBaseline | None:
        """A baseline that recorded exactly these PK/KEK/db/dbx measurement digests."""
        return self._by_secure_boot.get(_secure_boot_key(digests))

    def with_secure_boot_fact(self, value: Any) -> TpmBaseline | None:
        """:meth:`with_secure_boot` for a ``secure_boot_variables`` fact's value, unparsed.

        Every attestation asks this, and the verifier writes the digests as
        lower-case hex: looking the four strings up as they are spares parsing
        them. Hex is one-to-one with the digests, so a hit is the baseline the
        parsed digests find. None means only "no hit": a value spelled otherwise
        (upper case) or unreadable is for :func:`secure_boot_digests` to judge.
        """
        if not isinstance(value, dict):
            return None
        try:
            key = tuple([value[name]["sha256"] for name in SECURE_BOOT_VARIABLE_NAMES])
            return self._by_secure_boot_hex.get(key)
        except (KeyError, TypeError):  # a part missing, not indexable, or not hashable
            return None

    def exact(self, pcrs: Mapping[int, bytes]) -> TpmBaseline | None:
        """The baseline whose PCR values the host has exactly, if any (the fast path)."""
        for pcr_set, table in self._index.items():
            # A PCR the quote does not cover reads as None, which no baseline value equals.
            found = table.get(tuple(map(pcrs.get, pcr_set)))
            if found is not None:
                return found
        return None

    def match(self, summary: HostSummary) -> BaselineComparison | None:
        """The matching baseline, else the closest with its diff; None when there are none."""
        found = self.exact(summary.pcrs)
        if found is not None:
            matched = self._matched.get((found.name, summary.uintn_size))
            if matched is None:  # a UINTN size no log declares (a hand-made summary)
                matched = BaselineComparison(found, True, host_uintn=summary.uintn_size)
            return matched
        comparisons = [compare(summary, baseline) for baseline in self._by_name.values()]
        return min(comparisons, key=lambda c: c.rank, default=None)


# --------------------------------------------------------------------------- candidates


class CandidateState(enum.StrEnum):
    """Where a filed candidate baseline stands."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True)
class CandidateBaseline:
    """A host's verified boot filed for an administrator to approve as a baseline.

    Attributes:
        baseline: the baseline it becomes when approved.
        host_id: the host whose verified attestation it was made from.
        filed_at: when it was filed; decided_at: when approved or rejected.
        reason: why it was filed (e.g. "no baseline matched") or rejected.
    """

    baseline: TpmBaseline
    host_id: str
    filed_at: datetime.datetime
    state: CandidateState = CandidateState.PENDING
    decided_at: datetime.datetime | None = None
    reason: str = ""

    def approve(self, *, now: datetime.datetime, existing: Collection[str]) -> CandidateBaseline:
        """Approve: the caller then registers ``self.baseline`` (returned in the new state).

        Raises:
            PolicyError: the candidate was already decided, or its name is taken.
        """
        self._require_pending()
        if self.baseline.name in existing:
            raise PolicyError(f"a baseline named {self.baseline.name!r} already exists")
        return dataclasses.replace(self, state=CandidateState.APPROVED, decided_at=now)

    def reject(self, *, now: datetime.datetime, reason: str) -> CandidateBaseline:
        """Reject with a reason kept for the audit trail."""
        self._require_pending()
        return dataclasses.replace(
            self, state=CandidateState.REJECTED, decided_at=now, reason=reason
        )

    def _require_pending(self) -> None:
        if self.state is not CandidateState.PENDING:
            raise PolicyError(
                f"candidate baseline {self.baseline.name!r} is already {self.state.value}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "baseline": self.baseline.to_dict(),
            "host_id": self.host_id,
            "filed_at": self.filed_at.isoformat(),
            "state": self.state.value,
            "decided_at": None if self.decided_at is None else self.decided_at.isoformat(),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> CandidateBaseline:
        """Load a stored candidate (strict)."""
        what = "candidate baseline"
        obj = require_dict(obj, what=what)
        allowed = {"baseline", "host_id", "filed_at", "state", "decided_at", "reason"}
        reject_unknown_fields(obj, allowed, what=what)
        decided = obj.get("decided_at")
        try:
            state = CandidateState(require_str(obj, "state", what=what))
        except ValueError as exc:
            raise FormatError(f"{what}: unknown state") from exc
        return cls(
            baseline=TpmBaseline.from_dict(obj.get("baseline")),
            host_id=require_str(obj, "host_id", what=what, max_len=256),
            filed_at=parse_time(require_str(obj, "filed_at", what=what), what=what),
            state=state,
            decided_at=None
            if decided is None
            else parse_time(require_str(obj, "decided_at", what=what), what=what),
            reason=require_str(obj, "reason", what=what),
        )


def file_candidate(
    name: str,
    summary: HostSummary,
    *,
    now: datetime.datetime,
    reason: str = "",
    pcrs: Iterable[int] = DEFAULT_BASELINE_PCRS,
) -> CandidateBaseline:
    """File a host's last verified boot as a candidate baseline named ``name``."""
    baseline = baseline_from_summary(name, summary, pcrs=pcrs)
    return CandidateBaseline(baseline, summary.host_id, now, reason=reason)
