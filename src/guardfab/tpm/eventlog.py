"""The TCG PC Client boot event log: parse both formats, replay it to PCR values.

A log is a list of measurements the firmware (and boot loaders after it) made
into the TPM. Two formats exist (TCG PC Client PFP):

* **SHA-1** (TPM 1.2 era): ``TCG_PCClientPCREvent`` records throughout, each with
  one 20-byte SHA-1 digest.
* **crypto-agile**: a first ``TCG_PCClientPCREvent`` of type EV_NO_ACTION whose
  data is the ``Spec ID Event03`` header (the banks and their digest sizes),
  then ``TCG_PCR_EVENT2`` records, each with a ``TPML_DIGEST_VALUES`` list.

Nothing in a log is trusted by itself: a verifier first checks that the replay
of the quoted bank equals the PCR values in a verified quote, and only then
reads facts (:mod:`guardfab.tpm.logfacts`), and only from events whose data
hashes to their digest. The code is pure: bytes in, typed objects out.

Parsing is written for speed (an HGS checks thousands of logs a second): one
pass, precompiled ``struct`` formats, plain tuples per event, and digest checks
and decoding done only when asked for.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable, Collection, Iterable
from typing import Any, NamedTuple

from guardfab.errors import FormatError, VerificationError
from guardfab.tpm import logfacts
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.decode import Decoded, decode
from guardfab.tpm.events import (
    HASHERS,
    MAX_SPEC_ID_BYTES,
    SPEC_ID_SIGNATURE,
    DigestCheck,
    EventType,
    SpecIdEvent,
    alg_name,
    check_digests,
    event_type_name,
    parse_spec_id,
)

#: Hard limits: far above any real log (a laptop's is 20-100 KB and 50-300
#: events; a dbx update event is about 25 KB), low enough to bound the work.
MAX_LOG_BYTES = 8 * 1024 * 1024
MAX_EVENTS = 10_000
MAX_EVENT_DATA = 1024 * 1024
#: A PC Client TPM has 24 PCRs.
PCR_COUNT = 24

_NO_ACTION = int(EventType.EV_NO_ACTION)
_HCRTM = int(EventType.EV_EFI_HCRTM_EVENT)
_SHA1 = int(TpmAlg.SHA1)
_SHA1_EVENT = struct.Struct("<II20sI")
_EVENT2_HEADER = struct.Struct("<III")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_STARTUP_LOCALITY = b"StartupLocality\0"
#: TPM2_Startup runs at locality 0 or 3; an H-CRTM starts PCR 0 at 4.
_STARTUP_LOCALITIES = (0, 3, 4)
#: PC Client PCRs 17-22 (D-RTM) reset to all ones, the others to zero.
_DRTM_PCRS = range(17, 23)


class LogFormat(enum.Enum):
    """Which of the two PC Client record formats the log uses."""

    CRYPTO_AGILE = "crypto-agile"
    SHA1 = "sha1"


class Event(NamedTuple):
    """One measurement: where it is, which PCR and type, its digests and raw data.

    ``number`` is the position in the log (0 is the first record, the Spec ID
    header in a crypto-agile log), as tpm2-tools counts. ``digests`` maps
    TPM_ALG_ID to digest bytes. It may lack a bank the header
    declares (the TPM then did not extend that bank). ``data`` is untrusted
    until its digest check says VERIFIED.
    """

    number: int
    offset: int
    pcr: int
    event_type: int
    digests: dict[int, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        """The PFP name of the event type (``EV_EFI_ACTION``)."""
        return event_type_name(self.event_type)

    def decode(self, uintn_size: int = 8) -> Decoded:
        """Decode the data for a person (hex with a note when it cannot be decoded)."""
        return decode(self.event_type, self.data, uintn_size)


# --------------------------------------------------------------------------- errors


def _truncated(index: int, offset: int, what: str) -> FormatError:
    return FormatError(
        f"event log truncated in event {index} (offset {offset}): no room for {what}",
        hint="copy the whole binary_bios_measurements file; a cut log cannot be replayed",
    )


def _malformed(index: int, offset: int, what: str) -> FormatError:
    return FormatError(f"event log malformed at event {index} (offset {offset}): {what}")


def _check_record(index: int, offset: int, pcr: int, *, size: int, end: int, total: int) -> None:
    """Raise the one error that explains why a record header cannot be accepted."""
    if pcr >= PCR_COUNT:
        raise _malformed(index, offset, f"PCR index {pcr} is not below {PCR_COUNT}")
    if size > MAX_EVENT_DATA:
        raise _malformed(index, offset, f"{size}-byte event data exceeds {MAX_EVENT_DATA}")
    if end > total:
        raise _truncated(index, offset, f"{size} bytes of event data")


# --------------------------------------------------------------------------- record parsers


def _sha1_events(buf: bytes, offset: int, index: int, out: list[Event]) -> None:
    """Parse TCG_PCClientPCREvent records from ``offset`` to the end into ``out``."""
    total = len(buf)
    unpack = _SHA1_EVENT.unpack_from
    while offset < total and index < MAX_EVENTS:
        if total - offset < _SHA1_EVENT.size:
            raise _truncated(index, offset, "a 32-byte event header")
        pcr, event_type, digest, size = unpack(buf, offset)
        start = offset + _SHA1_EVENT.size
        end = start + size
        if pcr >= PCR_COUNT or size > MAX_EVENT_DATA or end > total:
            _check_record(index, offset, pcr, size=size, end=end, total=total)
        out.append(Event(index, offset, pcr, event_type, {_SHA1: digest}, buf[start:end]))
        offset = end
        index += 1
    if offset < total:
        raise _malformed(index, offset, f"more than {MAX_EVENTS} events")


def _digests(
    buf: bytes, pos: int, count: int, sizes: dict[int, int], where: tuple[int, int]
) -> tuple[dict[int, bytes], int]:
    """Read a TPML_DIGEST_VALUES body of ``count`` entries; return digests and end."""
    digests: dict[int, bytes] = {}
    for _ in range(count):
        if pos + 2 > len(buf):
            raise _truncated(*where, "a digest algorithm id")
        (alg,) = _U16.unpack_from(buf, pos)
        size = sizes.get(alg)
        if size is None or alg in digests:
            problem = "repeats" if alg in digests else "was not declared in the header for"
            raise _malformed(*where, f"digest list {problem} bank {alg_name(alg)}")
        end = pos + 2 + size
        if end > len(buf):
            raise _truncated(*where, f"a {size}-byte {alg_name(alg)} digest")
        digests[alg] = buf[pos + 2 : end]
        pos = end
    return digests, pos


def _agile_events(buf: bytes, offset: int, index: int, spec: SpecIdEvent, out: list[Event]) -> None:
    """Parse TCG_PCR_EVENT2 records from ``offset`` to the end into ``out``."""
    sizes = dict(spec.digest_sizes)
    layout, build = _fast_layout(spec.digest_sizes)
    unpack, head = layout.unpack_from, layout.size
    total = len(buf)
    new = tuple.__new__
    while offset < total and index < MAX_EVENTS:
        start = offset + head
        digests = build(values := unpack(buf, offset)) if start <= total else None
        if digests is not None:
            pcr, event_type, size = values[0], values[1], values[-1]
        else:
            pcr, event_type, digests, start, size = _slow_event2(buf, offset, index, sizes)
        end = start + size
        if pcr >= PCR_COUNT or size > MAX_EVENT_DATA or end > total:
            _check_record(index, offset, pcr, size=size, end=end, total=total)
        out.append(new(Event, (index, offset, pcr, event_type, digests, buf[start:end])))
        offset = end
        index += 1
    if offset < total:
        raise _malformed(index, offset, f"more than {MAX_EVENTS} events")


def _slow_event2(
    buf: bytes, offset: int, index: int, sizes: dict[int, int]
) -> tuple[int, int, dict[int, bytes], int, int]:
    """Parse one TCG_PCR_EVENT2 field by field, with an exact error for each fault."""
    where = (index, offset)
    if offset + _EVENT2_HEADER.size > len(buf):
        raise _truncated(index, offset, "a 12-byte event header")
    pcr, event_type, count = _EVENT2_HEADER.unpack_from(buf, offset)
    if count > len(sizes):
        raise _malformed(index, offset, f"{count} digests but the header declares {len(sizes)}")
    digests, pos = _digests(buf, offset + _EVENT2_HEADER.size, count, sizes, where)
    if pos + 4 > len(buf):
        raise _truncated(index, offset, "the event size field")
    (size,) = _U32.unpack_from(buf, pos)
    return pcr, event_type, digests, pos + 4, size


_Head = tuple[Any, ...]
_Builder = Callable[[_Head], "dict[int, bytes] | None"]


def _builder(algs: tuple[int, ...]) -> _Builder:
    """Return a function mapping an unpacked record head to its digests, or None.

    The head is ``(pcr, type, count, alg0, digest0, alg1, digest1, ..., size)``.
    None means the record is not in the common layout (a bank missing, another
    order) and must take the slow path. Literal dicts for 1-3 banks are a third
    of the cost of ``dict(zip(...))``, which matters at 100+ events per log.
    """
    if len(algs) == 1:
        (a0,) = algs
        return lambda h: {a0: h[4]} if h[2] == 1 and h[3] == a0 else None
    if len(algs) == 2:
        a0, a1 = algs
        return lambda h: {a0: h[4], a1: h[6]} if h[2] == 2 and h[3] == a0 and h[5] == a1 else None
    if len(algs) == 3:
        a0, a1, a2 = algs
        return lambda h: (
            {a0: h[4], a1: h[6], a2: h[8]}
            if h[2] == 3 and h[3] == a0 and h[5] == a1 and h[7] == a2
            else None
        )
    count = len(algs)
    return lambda h: (
        dict(zip(algs, h[4:-1:2], strict=True)) if h[2] == count and h[3:-1:2] == algs else None
    )


@functools.lru_cache(maxsize=64)
def _fast_layout(digest_sizes: tuple[tuple[int, int], ...]) -> tuple[struct.Struct, _Builder]:
    """The one-``struct``-call layout of a record that lists every bank in header order.

    Real logs list all declared banks in header order in every event, so the
    whole record head (PCR, type, count, each alg id and digest, size) unpacks
    at once. Cached per header, so a verifier builds it once per platform type.
    """
    fields = "".join(f"H{size}s" for _, size in digest_sizes)
    return struct.Struct(f"<III{fields}I"), _builder(tuple(alg for alg, _ in digest_sizes))


# --------------------------------------------------------------------------- the log


def _pcr0_locality(events: Iterable[Event]) -> int:
    """Return PCR 0's start value (the startup locality) from the events before it is extended.

    A StartupLocality EV_NO_ACTION event (PFP) says TPM2_Startup ran at
    locality 3, so PCR 0 starts at ``00..03``; an EV_EFI_HCRTM_EVENT first in
    PCR 0 means an H-CRTM started it at ``00..04`` (TPM 2.0 Part 1, 34.3). One
    logged after PCR 0 was first extended cannot change the start and is ignored.
    """
    locality: int | None = None
    for event in events:
        if event.pcr != 0:
            continue
        if event.event_type == _HCRTM:
            return 4
        if event.event_type != _NO_ACTION:
            break
        if not event.data.startswith(_STARTUP_LOCALITY):
            continue
        if len(event.data) != 17 or event.data[16] not in _STARTUP_LOCALITIES:
            raise _malformed(event.number, event.offset, "StartupLocality event is not valid")
        if locality is not None:
            raise _malformed(event.number, event.offset, "a second StartupLocality event")
        locality = event.data[16]
    return locality or 0


@functools.cache
def _initial_values(alg_size: int, locality: int) -> tuple[bytes, ...]:
    """Reset values of all PCRs for one digest size and PCR 0 locality (cached)."""
    values = []
    for pcr in range(PCR_COUNT):
        if pcr == 0:
            values.append(bytes(alg_size - 1) + bytes((locality,)))
        elif pcr in _DRTM_PCRS:
            values.append(b"\xff" * alg_size)
        else:
            values.append(bytes(alg_size))
    return tuple(values)


class EventLog:
    """A parsed event log: its format, header, events and PCR 0 start locality.

    Build one with :func:`parse_event_log`. ``events`` includes the Spec ID
    header event (number 0) of a crypto-agile log, so event numbers match the
    numbering other tools print.
    """

    __slots__ = ("_checks", "events", "format", "notes", "spec_id", "startup_locality")

    def __init__(
        self,
        log_format: LogFormat,
        spec_id: SpecIdEvent | None,
        events: tuple[Event, ...],
        startup_locality: int,
        *,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.format = log_format
        self.spec_id = spec_id
        self.events = events
        self.startup_locality = startup_locality
        #: Oddities that were tolerated (shown to people, never decisive).
        self.notes = notes
        self._checks: list[DigestCheck | None] = [None] * len(events)

    @property
    def banks(self) -> tuple[int, ...]:
        """Declared banks as TPM_ALG_IDs, in header order (SHA-1 alone for SHA-1 logs)."""
        if self.spec_id is None:
            return (_SHA1,)
        return tuple(alg for alg, _ in self.spec_id.digest_sizes)

    @property
    def replayable_banks(self) -> tuple[int, ...]:
        """Declared banks this host has a hash implementation for."""
        return tuple(alg for alg in self.banks if alg in HASHERS)

    @property
    def uintn_size(self) -> int:
        """Bytes in a UEFI UINTN, from the header (8, x86-64, for SHA-1 logs)."""
        return self.spec_id.uintn_size if self.spec_id is not None else 8

    def initial_pcrs(self, bank: int) -> tuple[bytes, ...]:
        """Values the PCRs of ``bank`` held before this log's first extend, by index."""
        size = dict(self.spec_id.digest_sizes)[bank] if self.spec_id else 20
        return _initial_values(size, self.startup_locality)

    def replay(self, banks: Iterable[int] | None = None) -> dict[int, dict[int, bytes]]:
        """Recompute PCR values: ``{bank: {pcr: value}}`` for each PCR the log extends.

        Args:
            banks: TPM_ALG_IDs to replay (default: every replayable declared bank).
                Replaying only the quoted bank is the fast path for a verifier.

        Raises:
            VerificationError: a requested bank is not in the log or cannot be computed.
        """
        wanted = self.replayable_banks if banks is None else tuple(banks)
        for bank in wanted:
            if bank not in self.banks or bank not in HASHERS:
                raise VerificationError(
                    f"the event log cannot be replayed in bank {alg_name(bank)}"
                )
        return {bank: self._replay_bank(bank) for bank in wanted}

    def _replay_bank(self, bank: int) -> dict[int, bytes]:
        """Extend one bank through the log; the hot loop of every verification."""
        initial = self.initial_pcrs(bank)
        values = list(initial)
        hasher = HASHERS[bank]
        no_action = _NO_ACTION
        for _index, _offset, pcr, event_type, digests, _data in self.events:
            if event_type != no_action:
                digest = digests.get(bank)
                if digest is not None:
                    values[pcr] = hasher(values[pcr] + digest).digest()
        # A PCR differs from its reset value exactly when something extended it
        # (a hash output equal to the reset value is a preimage, not a risk).
        return {
            pcr: value
            for pcr, value in enumerate(values)
            if value != initial[pcr] or (pcr == 0 and self.startup_locality)
        }

    def digest_check(self, event: Event) -> DigestCheck:
        """Check (once, then cached) whether ``event``'s data is what its digests measured."""
        cached = self._checks[event.number]
        if cached is None:
            cached = check_digests(event.event_type, event.data, event.digests)
            self._checks[event.number] = cached
        return cached

    def facts(self, bank: int | None = None) -> logfacts.LogFacts:
        """Derive the attestation facts; see :func:`guardfab.tpm.logfacts.derive_facts`."""
        return logfacts.derive_facts(self, bank)

    def to_dict(self, pcrs: Collection[int] | None = None) -> dict[str, Any]:
        """The JSON form: ``events``, ``pcrs`` per bank (hex), ``facts``.

        Args:
            pcrs: show only events and PCR values of these PCR indexes.
        """
        events = [self._event_dict(e) for e in self.events if pcrs is None or e.pcr in pcrs]
        values = {
            alg_name(bank): {
                str(index): value.hex()
                for index, value in sorted(bank_values.items())
                if pcrs is None or index in pcrs
            }
            for bank, bank_values in self.replay().items()
        }
        return {"events": events, "pcrs": values, "facts": self.facts().to_dict()}

    def _event_dict(self, event: Event) -> dict[str, Any]:
        status = self.digest_check(event).status
        return {
            "number": event.number,
            "offset": event.offset,
            "pcr": event.pcr,
            "type": event.type_name,
            "type_value": event.event_type,
            "digests": {alg_name(alg): digest.hex() for alg, digest in event.digests.items()},
            "data_size": len(event.data),
            "data": event.decode(self.uintn_size).fields,
            "digest_check": status.value,
            "digest_verified": {"verified": True, "mismatch": False}.get(status.value),
        }


def parse_event_log(data: bytes) -> EventLog:
    """Parse a TCG PC Client event log in either format.

    Raises:
        FormatError: the log is empty, too large, truncated or malformed; the
            message names the event and byte offset.
    """
    if not data:
        raise FormatError("the event log is empty")
    if len(data) > MAX_LOG_BYTES:
        raise FormatError(f"the event log is larger than {MAX_LOG_BYTES} bytes")
    buf = bytes(data)
    if len(buf) < _SHA1_EVENT.size:
        raise _truncated(0, 0, "a 32-byte event header")
    # Crypto-agile logs open with an EV_NO_ACTION event carrying "Spec ID Event03";
    # a SHA-1 log may well begin with other data that happens to spell it.
    if buf.startswith(SPEC_ID_SIGNATURE, _SHA1_EVENT.size) and _first_type(buf) == _NO_ACTION:
        return _agile_log(buf)
    events: list[Event] = []
    _sha1_events(buf, 0, 0, events)
    return EventLog(LogFormat.SHA1, None, tuple(events), _pcr0_locality(events))


def _first_type(buf: bytes) -> int:
    event_type: int = _SHA1_EVENT.unpack_from(buf)[1]
    return event_type


def _agile_log(buf: bytes) -> EventLog:
    """Parse a crypto-agile log: the Spec ID header record, then TCG_PCR_EVENT2 records."""
    pcr, event_type, digest, declared = _SHA1_EVENT.unpack_from(buf)
    if event_type != _NO_ACTION or pcr != 0 or any(digest):
        raise _malformed(0, 0, "the Spec ID header must be EV_NO_ACTION in PCR 0, digest zero")
    head = _SHA1_EVENT.size
    try:
        spec = parse_spec_id(buf[head : head + MAX_SPEC_ID_BYTES], exact=False)
    except FormatError as exc:
        raise _malformed(0, 0, str(exc)) from exc
    notes: tuple[str, ...] = ()
    if spec.size != declared:
        notes = (
            f"the Spec ID header record says {declared} bytes but its fields take {spec.size}; "
            "the next event is read after the fields, as tpm2-tools does",
        )
    events = [Event(0, 0, 0, event_type, {_SHA1: digest}, buf[head : head + spec.size])]
    _agile_events(buf, head + spec.size, 1, spec, events)
    return EventLog(
        LogFormat.CRYPTO_AGILE, spec, tuple(events), _pcr0_locality(events), notes=notes
    )
