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
pass with one precompiled ``struct`` call per record, whose result is kept as
the record's row; :class:`Event` objects, data copies, digest checks and
decoding are made only for what someone reads (a verifier reads a few events
for its facts and the digests of the quoted bank).
"""

from __future__ import annotations

import enum
import functools
import operator
import struct
from collections.abc import Callable, Collection, Container, Iterable
from operator import countOf
from typing import Any, NamedTuple, Protocol, TypeGuard, TypeVar, cast

from guardfab.errors import FormatError, VerificationError
from guardfab.tpm import logfacts
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.decode import Decoded, decode
from guardfab.tpm.events import (
    HASHERS,
    MAX_BANKS,
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
_SEPARATOR = int(EventType.EV_SEPARATOR)
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


class Measurement(NamedTuple):
    """What one event extended into one bank: its number, PCR, type, digest and data.

    ``data`` is as logged: untrusted until a digest check of the event says VERIFIED.
    ``text`` is a one-line description standing in for the data where a record is
    kept without it (None while the data is at hand).
    """

    number: int
    pcr: int
    event_type: int
    digest: bytes
    data: bytes = b""
    text: str | None = None

    @property
    def type_name(self) -> str:
        """The PFP name of the event type."""
        return event_type_name(self.event_type)


_M = TypeVar("_M", bound=Measurement)


class SeparatorRecord(NamedTuple):
    """An EV_SEPARATOR as a verifier's facts read it: where, its data, one bank's digest.

    ``digest`` is the record's digest in the bank asked for (None if the record
    lists none there); ``data`` is as logged, untrusted until compared with it.
    """

    number: int
    pcr: int
    data: bytes
    digest: bytes | None


class _Copyable(Protocol):
    """A hashlib object, as the replay uses it (a fresh one copied for each extend)."""

    def copy(self) -> _Copyable: ...
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


# --------------------------------------------------------------------------- record layouts

#: One record as a row: ``(pcr, type, ..., size)``, the unpacked record head
#: (crypto-agile: ``(pcr, type, count, alg0, digest0, alg1, digest1, ..., size)``;
#: SHA-1: ``(pcr, type, digest, size)``). A record that does not list every
#: bank in header order gets a row of the same shape, None where it has no digest.
_Row = tuple[Any, ...]


class _Layout(NamedTuple):
    """Where a log's rows keep what: the record head, each bank's digest position.

    A row is regular (lists every bank in header order, so its unpacked size is
    the record's) when ``shape_of(row) == shape``: ``(count, alg0, alg1, ...)``
    read by one C call; ``shape_columns`` pairs each of those positions with
    its value, to check many rows a column at a time. ``digests`` makes a
    regular row's digest dict (literal dicts for 1-2 banks are a third of the
    cost of a comprehension). ``sizes`` (digest size per bank) and
    ``replayable`` (the banks this host can hash) follow from the header too,
    so a log need not rebuild them.
    """

    head: struct.Struct
    algs: tuple[int, ...]
    digest_at: dict[int, int]
    digests: Callable[[_Row], dict[int, bytes]]
    shape: tuple[int, ...]
    shape_of: Callable[[_Row], Any]
    shape_columns: tuple[tuple[Callable[[_Row], Any], int], ...]
    sizes: dict[int, int]
    replayable: tuple[int, ...]


_PCR_OF = operator.itemgetter(0)
_SIZE_OF = operator.itemgetter(-1)


#: PCR sets this small are looked up in a log's PCR index (:meth:`EventLog._numbers_in`).
_FEW_PCRS = 8


def _few(pcrs: Container[int]) -> TypeGuard[Collection[int]]:
    """Whether ``pcrs`` is a sized collection small enough for the PCR index."""
    return isinstance(pcrs, Collection) and len(pcrs) <= _FEW_PCRS


def _digests_maker(digest_at: dict[int, int]) -> Callable[[_Row], dict[int, bytes]]:
    """A function making the digest dict of a regular row, in header order."""
    pairs = tuple(digest_at.items())
    if len(pairs) == 1:
        ((a0, i0),) = pairs
        return lambda row: {a0: row[i0]}
    if len(pairs) == 2:  # the common SHA-1 + SHA-256 log
        (a0, i0), (a1, i1) = pairs
        return lambda row: {a0: row[i0], a1: row[i1]}
    return lambda row: {alg: row[at] for alg, at in pairs}


@functools.lru_cache(maxsize=64)
def _agile_layout(digest_sizes: tuple[tuple[int, int], ...]) -> _Layout:
    """The one-``struct``-call head of a record listing every bank in header order.

    Real logs list all declared banks in header order in every event, so the
    whole record head (PCR, type, count, each alg id and digest, size) unpacks
    at once. Cached per header, so a verifier builds it once per platform type.
    """
    fields = "".join(f"H{size}s" for _, size in digest_sizes)
    algs = tuple(alg for alg, _ in digest_sizes)
    at = {alg: 4 + 2 * k for k, alg in enumerate(algs)}
    positions = (2, *(3 + 2 * k for k in range(len(algs))))
    shape = (len(algs), *algs)
    columns = tuple(zip(map(operator.itemgetter, positions), shape, strict=True))
    head = struct.Struct(f"<III{fields}I")
    return _Layout(
        head,
        algs,
        at,
        _digests_maker(at),
        shape,
        operator.itemgetter(*positions),
        columns,
        dict(digest_sizes),
        tuple(alg for alg in algs if alg in HASHERS),
    )


#: SHA-1 records have one layout; their walk never asks for a shape.
_SHA1_LAYOUT = _Layout(
    _SHA1_EVENT,
    (_SHA1,),
    {_SHA1: 2},
    _digests_maker({_SHA1: 2}),
    (),
    tuple,
    (),
    {_SHA1: 20},
    (_SHA1,),
)


class _Records(NamedTuple):
    """A parsed log before any event object exists: rows, data starts, odd records.

    ``starts[n]`` is where event ``n``'s data begins. ``irregular`` maps the
    number of each record whose head is not the layout's (the crypto-agile
    header, a record missing a bank or listing them in another order) to its
    offset and its digests as the record lists them.
    """

    buf: bytes
    layout: _Layout
    rows: list[_Row]
    starts: list[int]
    irregular: dict[int, tuple[int, dict[int, bytes]]]


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


# --------------------------------------------------------------------------- record walkers


def _sha1_records(buf: bytes) -> _Records:
    """Walk TCG_PCClientPCREvent records from the start to the end."""
    rows: list[_Row] = []
    starts: list[int] = []
    total = len(buf)
    unpack, head = _SHA1_EVENT.unpack_from, _SHA1_EVENT.size
    offset = index = 0
    while offset < total and index < MAX_EVENTS:
        if total - offset < head:
            raise _truncated(index, offset, "a 32-byte event header")
        row = unpack(buf, offset)
        pcr, size = row[0], row[3]
        start = offset + head
        end = start + size
        if pcr >= PCR_COUNT or size > MAX_EVENT_DATA or end > total:
            _check_record(index, offset, pcr, size=size, end=end, total=total)
        rows.append(row)
        starts.append(start)
        offset = end
        index += 1
    if offset < total:
        raise _malformed(index, offset, f"more than {MAX_EVENTS} events")
    return _Records(buf, _SHA1_LAYOUT, rows, starts, {})


def _agile_walk(buf: bytes, offset: int, spec: SpecIdEvent, records: _Records) -> bytes | None:
    """Walk TCG_PCR_EVENT2 records from ``offset`` to the end into ``records``.

    The hot loop of a first check of a log. Real logs list every bank in header
    order in every record, so it first walks trusting that (one ``struct`` call
    and two appends per record), then checks every row's shape, PCR and size at
    once; only a log where that fails is walked again record by record, which
    handles odd records and names the exact fault. Returns the PCR index of
    every row (:meth:`EventLog._numbers_in`) when the regular walk made it.
    """
    start_rows = len(records.rows)
    index = _walk_regular(buf, offset, records)
    if index is None:
        del records.rows[start_rows:], records.starts[start_rows:]
        _walk_careful(buf, offset, spec, records)
    return index


def _walk_regular(buf: bytes, offset: int, records: _Records) -> bytes | None:
    """Walk records as if all were in the layout; every row's PCR index if every row proves it."""
    layout, rows, starts = records.layout, records.rows, records.starts
    unpack, head, total = layout.head.unpack_from, layout.head.size, len(buf)
    first = len(rows)
    add_row, add_start = rows.append, starts.append
    try:
        # Bounded by the buffer: every record advances by at least its head.
        while offset < total:
            row = unpack(buf, offset)
            add_row(row)
            offset += head
            add_start(offset)
            offset += row[-1]
    except struct.error:  # a record head cut short: let the careful walk name it
        return None
    new = rows[first:]
    # Records end exactly at the buffer's end, so no size exceeds the buffer:
    # the per-record size bound needs checking only in a log larger than it.
    regular = (
        offset == total
        and len(rows) <= MAX_EVENTS
        # Column by column (no tuple per row): each holds its one value in every row.
        and all(
            countOf(map(column, new), value) == len(new) for column, value in layout.shape_columns
        )
        and (total <= MAX_EVENT_DATA or not new or max(map(_SIZE_OF, new)) <= MAX_EVENT_DATA)
    )
    # The PCR bound is checked on the PCR index, which a verifier reads next.
    return _pcr_index(rows) if regular else None


#: Every valid PCR index, as the bytes a PCR index deletes to check its PCRs.
_VALID_PCRS = bytes(range(PCR_COUNT))


def _pcr_index(rows: list[_Row]) -> bytes | None:
    """Each row's PCR as one byte, or None if a PCR is not below PCR_COUNT."""
    try:
        index = bytes(map(_PCR_OF, rows))
    except ValueError:  # a PCR above 255
        return None
    # Deleting every valid PCR leaves nothing exactly when all are valid (one C call).
    return None if index.translate(None, _VALID_PCRS) else index


def _walk_careful(buf: bytes, offset: int, spec: SpecIdEvent, records: _Records) -> None:
    """Walk records one by one, with an exact error for each fault and odd records allowed."""
    layout, rows, starts = records.layout, records.rows, records.starts
    unpack, head = layout.head.unpack_from, layout.head.size
    total = len(buf)
    index = len(rows)
    while offset < total and index < MAX_EVENTS:
        start = offset + head
        row = unpack(buf, offset) if start <= total else None
        if row is None or layout.shape_of(row) != layout.shape:
            row, start = _irregular_row(buf, offset, index, spec, records)
        pcr, size = row[0], row[-1]
        end = start + size
        if pcr >= PCR_COUNT or size > MAX_EVENT_DATA or end > total:
            _check_record(index, offset, pcr, size=size, end=end, total=total)
        rows.append(row)
        starts.append(start)
        offset = end
        index += 1
    if offset < total:
        raise _malformed(index, offset, f"more than {MAX_EVENTS} events")


def _irregular_row(
    buf: bytes, offset: int, index: int, spec: SpecIdEvent, records: _Records
) -> tuple[_Row, int]:
    """Parse one record not in the common layout; its row and data start."""
    pcr, event_type, digests, start, size = _slow_event2(buf, offset, index, spec)
    records.irregular[index] = (offset, digests)
    return _row_of(pcr, event_type, digests, size, records.layout.algs), start


def _row_of(
    pcr: int, event_type: int, digests: dict[int, bytes], size: int, algs: tuple[int, ...]
) -> _Row:
    """A row in the layout's shape for a record that lists its digests otherwise."""
    row: list[Any] = [pcr, event_type, len(digests)]
    for alg in algs:
        row += (alg, digests.get(alg))
    row.append(size)
    return tuple(row)


def _slow_event2(
    buf: bytes, offset: int, index: int, spec: SpecIdEvent
) -> tuple[int, int, dict[int, bytes], int, int]:
    """Parse one TCG_PCR_EVENT2 field by field, with an exact error for each fault."""
    sizes = dict(spec.digest_sizes)
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


# --------------------------------------------------------------------------- the log


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
    numbering other tools print. The parse keeps one row per record; an
    :class:`Event` (digest dict, data copy) is made only for the events someone
    reads, so a verifier that replays and reads a few facts never makes most.
    """

    __slots__ = (
        "_checks",
        "_events",
        "_pcr_index",
        "_records",
        "format",
        "notes",
        "spec_id",
        "startup_locality",
    )

    def __init__(
        self,
        log_format: LogFormat,
        spec_id: SpecIdEvent | None,
        records: _Records,
        *,
        notes: tuple[str, ...] = (),
        pcr_index: bytes | None = None,
    ) -> None:
        self.format = log_format
        self.spec_id = spec_id
        self._records = records
        #: Oddities that were tolerated (shown to people, never decisive).
        self.notes = notes
        self._events: tuple[Event, ...] | None = None
        self._checks: list[DigestCheck | None] = [None] * len(records.rows)
        #: Each record's PCR as one byte (from the parse, or made when first needed).
        self._pcr_index = pcr_index
        self.startup_locality = self._pcr0_locality()

    # ------------------------------------------------------------------ events

    @property
    def events(self) -> tuple[Event, ...]:
        """Every event in log order (made on first use, then kept)."""
        if self._events is None:
            self._events = self._make_events(range(len(self._records.rows)))
        return self._events

    def events_in(
        self, pcrs: Container[int], event_types: Container[int] | None = None
    ) -> tuple[Event, ...]:
        """The events of ``pcrs`` (of ``event_types`` only, if given), in log order."""
        rows = self._records.rows
        if event_types is None:
            numbers = [n for n, row in enumerate(rows) if row[0] in pcrs]
        else:
            numbers = [n for n, row in enumerate(rows) if row[0] in pcrs and row[1] in event_types]
        if self._events is not None:
            return tuple(self._events[n] for n in numbers)
        return self._make_events(numbers)

    def pcr_and_separators(self, pcr: int, separators_below: int) -> tuple[Event, ...]:
        """Every event of ``pcr`` and the EV_SEPARATOR events of PCRs below ``separators_below``.

        What the facts read (PCR 7 whole, the separators of PCRs 0-7), in log
        order. A verifier asks for them in every log it has not seen before: one
        pass comparing each row's PCR and type as ints costs less than finding
        eight PCRs' records in the PCR index and then their types.
        """
        numbers = [
            n
            for n, row in enumerate(self._records.rows)
            if row[0] == pcr or (row[1] == _SEPARATOR and row[0] < separators_below)
        ]
        if self._events is not None:
            return tuple(self._events[n] for n in numbers)
        return self._make_events(numbers)

    def pcr_and_separator_records(
        self, pcr: int, separators_below: int, bank: int
    ) -> tuple[tuple[Event, ...], list[SeparatorRecord]]:
        """Every event of ``pcr``, and the EV_SEPARATOR records of PCRs below ``separators_below``.

        What a verifier's facts read, found in one pass: the separators (eight,
        one per PCR, in a normal log) come as light records with their ``bank``
        digest, since a verifier compares only their data and that digest; the
        events of ``pcr`` (PCR 7, its separator among them) are full events.

        Raises:
            VerificationError: the log has no bank ``bank``.
        """
        buf, _layout, rows, starts, _irregular = self._records
        at = self._digest_position(bank)
        numbers: list[int] = []
        separators: list[SeparatorRecord] = []
        add_number, add_separator, new = numbers.append, separators.append, tuple.__new__
        for number, row in enumerate(rows):
            row_pcr = row[0]
            if row_pcr == pcr:
                add_number(number)
            if row[1] == _SEPARATOR and row_pcr < separators_below:
                data = buf[(start := starts[number]) : start + row[-1]]
                add_separator(new(SeparatorRecord, (number, row_pcr, data, row[at])))
        if self._events is not None:
            return tuple(self._events[n] for n in numbers), separators
        return self._make_events(numbers), separators

    def _numbers_in(self, pcrs: Iterable[int]) -> list[int]:
        """Numbers of the records of ``pcrs``, in log order, found in the PCR index.

        The index holds each record's PCR as one byte (every PCR is below 24),
        made once per log: by the regular walk, which checks the PCR bound on
        it, or here on first use. Each PCR's records are then a few C searches
        instead of a Python pass over every record.
        """
        index = self._pcr_index
        if index is None:  # the careful walk (or a SHA-1 log): made now, every PCR below 24
            index = self._pcr_index = bytes(map(_PCR_OF, self._records.rows))
        found: list[int] = []
        for pcr in set(pcrs):
            if 0 <= pcr < PCR_COUNT:
                at = index.find(pcr)
                while at >= 0:
                    found.append(at)
                    at = index.find(pcr, at + 1)
        found.sort()
        return found

    def _make_events(self, numbers: Iterable[int]) -> tuple[Event, ...]:
        buf, layout, rows, starts, irregular = self._records
        head, digests_of, new = layout.head.size, layout.digests, tuple.__new__
        out = []
        for number in numbers:
            row, start = rows[number], starts[number]
            odd = irregular.get(number)
            offset, digests = (start - head, digests_of(row)) if odd is None else odd
            data = buf[start : start + row[-1]]
            out.append(new(Event, (number, offset, row[0], row[1], digests, data)))
        return tuple(out)

    def _data(self, number: int) -> bytes:
        start = self._records.starts[number]
        return self._records.buf[start : start + self._records.rows[number][-1]]

    def measurements(self, bank: int, pcrs: Container[int], kind: type[_M]) -> list[_M]:
        """What each event of ``pcrs`` extended into ``bank``, in log order.

        EV_NO_ACTION events and events that carry no digest of ``bank`` are left
        out: they extend nothing there. The data is as logged (unchecked). Each is
        made as ``kind`` (:class:`Measurement` or a subclass that adds methods),
        so a caller's records cost one tuple per event: a verifier makes them for
        every event of every log it has not seen before.
        """
        buf, _layout, rows, starts, _irregular = self._records
        at = self._digest_position(bank)
        no_action, new = _NO_ACTION, tuple.__new__
        if _few(pcrs):  # e.g. the CI policy's PCR: its few records, found in the index
            return [
                new(kind, (n, row[0], row[1], digest, buf[starts[n] : starts[n] + row[-1]], None))
                for n in self._numbers_in(pcrs)
                if (row := rows[n])[1] != no_action and (digest := row[at]) is not None
            ]
        return [
            new(kind, (number, row[0], row[1], digest, buf[start : start + row[-1]], None))
            for number, (row, start) in enumerate(zip(rows, starts, strict=True))
            if row[1] != no_action and row[0] in pcrs and (digest := row[at]) is not None
        ]

    # ------------------------------------------------------------------ banks and replay

    @property
    def banks(self) -> tuple[int, ...]:
        """Declared banks as TPM_ALG_IDs, in header order (SHA-1 alone for SHA-1 logs)."""
        return self._records.layout.algs

    @property
    def replayable_banks(self) -> tuple[int, ...]:
        """Declared banks this host has a hash implementation for."""
        return self._records.layout.replayable

    @property
    def uintn_size(self) -> int:
        """Bytes in a UEFI UINTN, from the header (8, x86-64, for SHA-1 logs)."""
        return self.spec_id.uintn_size if self.spec_id is not None else 8

    def initial_pcrs(self, bank: int) -> tuple[bytes, ...]:
        """Values the PCRs of ``bank`` held before this log's first extend, by index."""
        size = self._records.layout.sizes[bank] if self.spec_id else 20
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

    def _digest_position(self, bank: int) -> int:
        at = self._records.layout.digest_at.get(bank)
        if at is None:
            raise VerificationError(f"the event log has no bank {alg_name(bank)}")
        return at

    def _replay_bank(self, bank: int) -> dict[int, bytes]:
        """Extend one bank through the log; the hot loop of every verification."""
        initial = self.initial_pcrs(bank)
        values = list(initial)
        at = self._digest_position(bank)
        no_action = _NO_ACTION
        # Each extend hashes in a copy of one fresh context: OpenSSL 3 copies a
        # context for less than it initialises one (~235 against ~260 ns an
        # extend, most of a replay's cost).
        fresh = cast(_Copyable, HASHERS[bank]())
        new_context = fresh.copy
        for row in self._records.rows:
            if row[1] != no_action and (digest := row[at]) is not None:
                pcr = row[0]
                context = new_context()
                context.update(values[pcr] + digest)
                values[pcr] = context.digest()
        # A PCR differs from its reset value exactly when something extended it
        # (a hash output equal to the reset value is a preimage, not a risk).
        return {
            pcr: value
            for pcr, value in enumerate(values)
            if value != initial[pcr] or (pcr == 0 and self.startup_locality)
        }

    def _pcr0_locality(self) -> int:
        """PCR 0's start value (the startup locality), from the events before it is extended.

        A StartupLocality EV_NO_ACTION event (PFP) says TPM2_Startup ran at
        locality 3, so PCR 0 starts at ``00..03``; an EV_EFI_HCRTM_EVENT first in
        PCR 0 means an H-CRTM started it at ``00..04`` (TPM 2.0 Part 1, 34.3). One
        logged after PCR 0 was first extended cannot change the start and is ignored.
        """
        locality: int | None = None
        for number, row in enumerate(self._records.rows):
            if row[0] != 0:
                continue
            if row[1] == _HCRTM:
                return 4
            if row[1] != _NO_ACTION:
                break
            data = self._data(number)
            if not data.startswith(_STARTUP_LOCALITY):
                continue
            offset = self._make_events((number,))[0].offset
            if len(data) != 17 or data[16] not in _STARTUP_LOCALITIES:
                raise _malformed(number, offset, "StartupLocality event is not valid")
            if locality is not None:
                raise _malformed(number, offset, "a second StartupLocality event")
            locality = data[16]
        return locality or 0

    # ------------------------------------------------------------------ checks and views

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
    return EventLog(LogFormat.SHA1, None, _sha1_records(buf))


def _first_type(buf: bytes) -> int:
    event_type: int = _SHA1_EVENT.unpack_from(buf)[1]
    return event_type


#: Where the Spec ID header's bank count and (after the banks) vendor info size are.
_SPEC_ID_COUNT_AT = 24
_SPEC_ID_BANKS_AT = 28


def _spec_id_bytes(buf: bytes, head: int) -> bytes:
    """The Spec ID header's own bytes (as far as its counts say), at most MAX_SPEC_ID_BYTES."""
    end = head + MAX_SPEC_ID_BYTES
    count_at = head + _SPEC_ID_COUNT_AT
    count = int.from_bytes(buf[count_at : count_at + 4], "little")
    vendor_at = head + _SPEC_ID_BANKS_AT + 4 * count
    if count <= MAX_BANKS and vendor_at < len(buf):
        end = min(end, vendor_at + 1 + buf[vendor_at])
    return buf[head:end]


class _AgileHeader(NamedTuple):
    """What a Spec ID header alone decides: its fields, the record layout, the header's row."""

    spec: SpecIdEvent
    layout: _Layout
    row: _Row


@functools.lru_cache(maxsize=64)
def _agile_header(header: bytes) -> _AgileHeader:
    """Parse a Spec ID header, once per distinct header (a platform's logs share one).

    A failure raises and is not kept; the parse checks every field as before.
    The layout and the header record's row follow from the header alone, so
    they are kept with it (the row is a tuple: logs can share it).
    """
    spec = parse_spec_id(header, exact=False)
    layout = _agile_layout(spec.digest_sizes)
    return _AgileHeader(spec, layout, _row_of(0, _NO_ACTION, {}, spec.size, layout.algs))


def _agile_log(buf: bytes) -> EventLog:
    """Parse a crypto-agile log: the Spec ID header record, then TCG_PCR_EVENT2 records."""
    pcr, event_type, digest, declared = _SHA1_EVENT.unpack_from(buf)
    if event_type != _NO_ACTION or pcr != 0 or any(digest):
        raise _malformed(0, 0, "the Spec ID header must be EV_NO_ACTION in PCR 0, digest zero")
    head = _SHA1_EVENT.size
    try:
        spec, layout, header = _agile_header(_spec_id_bytes(buf, head))
    except FormatError as exc:
        raise _malformed(0, 0, str(exc)) from exc
    notes: tuple[str, ...] = ()
    if spec.size != declared:
        notes = (
            f"the Spec ID header record says {declared} bytes but its fields take {spec.size}; "
            "the next event is read after the fields, as tpm2-tools does",
        )
    records = _Records(buf, layout, [header], [head], {0: (0, {_SHA1: digest})})
    index = _agile_walk(buf, head + spec.size, spec, records)
    return EventLog(LogFormat.CRYPTO_AGILE, spec, records, notes=notes, pcr_index=index)
