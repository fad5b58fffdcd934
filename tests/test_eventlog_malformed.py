"""Bad logs: truncated, oversized or malformed input gives one FormatError naming where.

A log has no length or count field, so a log cut exactly between two records
is a valid, shorter log (its replay no longer matches the quote, which is how a
verifier notices). Every cut inside a record, and every structural fault, must
be a FormatError that names the event number and byte offset.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from guardfab.errors import FormatError, VerificationError
from guardfab.tpm import eventlog
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import LogFormat, Measurement, parse_event_log
from test_eventlog_builder import (
    EFI_GLOBAL,
    EV_EFI_HCRTM_EVENT,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_NO_ACTION,
    EV_POST_CODE,
    EV_SEPARATOR,
    SHA1,
    SHA256,
    VECTOR_NAMES,
    AgileLog,
    Ev,
    event2_record,
    sha1_log,
    sha1_record,
    spec_id,
    variable,
    vectors_fixture,  # noqa: F401 (the vectors fixture)
)


def _cuts_inside(start: int, end: int) -> set[int]:
    """Cut points strictly inside a record: each edge, the head and the middle."""
    points = {start + 1, start + 4, start + 12, start + 31, start + 33, (start + end) // 2, end - 1}
    return {p for p in points if start < p < end}


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_cut_inside_any_record_names_that_event_and_offset(
    vectors: Path,
    name: str,
) -> None:
    data = (vectors / name).read_bytes()
    log = parse_event_log(data)
    bounds = [e.offset for e in log.events] + [len(data)]
    checked = 0
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        for cut in _cuts_inside(start, end):
            with pytest.raises(FormatError) as caught:
                parse_event_log(data[:cut])
            assert f"event {number} (offset {start})" in str(caught.value)
            checked += 1
    assert checked >= len(log.events)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_cut_between_records_is_a_shorter_log_with_a_different_replay(
    vectors: Path,
    name: str,
) -> None:
    data = (vectors / name).read_bytes()
    full = parse_event_log(data)
    for kept, event in enumerate(full.events[1:], start=1):
        shorter = parse_event_log(data[: event.offset])
        assert len(shorter.events) == kept
        assert shorter.events == full.events[:kept]


def test_empty_log() -> None:
    with pytest.raises(FormatError, match="empty"):
        parse_event_log(b"")


def test_oversized_log_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="larger than"):
        parse_event_log(bytes(eventlog.MAX_LOG_BYTES + 1))


def test_too_many_events() -> None:
    one = sha1_record(1, EV_POST_CODE, bytes(20), b"")
    assert len(parse_event_log(one * eventlog.MAX_EVENTS).events) == eventlog.MAX_EVENTS
    with pytest.raises(FormatError, match=f"more than {eventlog.MAX_EVENTS} events"):
        parse_event_log(one * (eventlog.MAX_EVENTS + 1))


def test_too_many_events_crypto_agile() -> None:
    log = AgileLog(events=[Ev(1, EV_POST_CODE, b"")] * eventlog.MAX_EVENTS)
    with pytest.raises(FormatError, match="more than"):
        parse_event_log(log.build())


def test_event_data_over_the_limit_is_refused_even_if_present() -> None:
    big = eventlog.MAX_EVENT_DATA + 1
    with pytest.raises(FormatError, match=f"{big}-byte event data exceeds"):
        parse_event_log(sha1_record(0, EV_POST_CODE, bytes(20), bytes(big)))
    with pytest.raises(FormatError, match="exceeds"):
        parse_event_log(AgileLog(events=[Ev(0, EV_POST_CODE, bytes(big))]).build())


def _agile_with(record: bytes) -> bytes:
    return AgileLog().header() + record


_GOOD_DIGESTS = [(SHA1, bytes(20)), (SHA256, bytes(32))]

MALFORMED = {
    "pcr index 24": (
        _agile_with(event2_record(24, EV_POST_CODE, _GOOD_DIGESTS, b"")),
        "PCR index 24",
    ),
    # Above a byte: the regular walk's PCR index cannot hold it (the careful walk names it).
    "pcr index 256": (
        _agile_with(event2_record(256, EV_POST_CODE, _GOOD_DIGESTS, b"")),
        "PCR index 256",
    ),
    "pcr index 2**32-1": (
        _agile_with(event2_record(2**32 - 1, EV_POST_CODE, _GOOD_DIGESTS, b"")),
        "PCR index 4294967295",
    ),
    "sha1 log pcr index": (sha1_record(99, EV_POST_CODE, bytes(20), b""), "PCR index 99"),
    "undeclared bank": (
        _agile_with(event2_record(0, EV_POST_CODE, [(0x000D, bytes(64))], b"")),
        "not declared",
    ),
    "repeated bank": (
        _agile_with(event2_record(0, EV_POST_CODE, [(SHA1, bytes(20)), (SHA1, bytes(20))], b"")),
        "repeats",
    ),
    "more digests than banks": (
        _agile_with(struct.pack("<III", 0, EV_POST_CODE, 3)),
        "3 digests but the header declares 2",
    ),
    "digest count huge": (
        _agile_with(struct.pack("<III", 0, EV_POST_CODE, 0xFFFFFFFF)),
        "digests but the header",
    ),
    "spec id not in pcr 0": (
        sha1_record(1, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 32)])),
        "EV_NO_ACTION in PCR 0",
    ),
    "spec id nonzero digest": (
        sha1_record(0, EV_NO_ACTION, b"\x01" * 20, spec_id([(SHA256, 32)])),
        "digest zero",
    ),
    "spec id no banks": (sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([])), "0 banks"),
    "spec id 17 banks": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(0x100 + i, 32) for i in range(17)])),
        "17 banks",
    ),
    "spec id bad uintn": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 32)], uintn=3)),
        "uintnSize 3",
    ),
    "spec id wrong sha256 size": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 20)])),
        "20-byte digest, not 32",
    ),
    "spec id repeated bank": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 32), (SHA256, 32)])),
        "twice",
    ),
    "spec id unknown bank of size 0": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(0x7777, 0)])),
        "impossible size 0",
    ),
    "spec id unknown bank of size 65": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(0x7777, 65)])),
        "impossible size 65",
    ),
    "spec id bank list cut": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 32)], count=2)),
        "bank list",
    ),
    "spec id vendor info overruns the log": (
        sha1_record(0, EV_NO_ACTION, bytes(20), spec_id([(SHA256, 32)])[:-1] + b"\x09"),
        "vendorInfoSize",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_logs(case: str) -> None:
    data, message = MALFORMED[case]
    with pytest.raises(FormatError, match=message) as caught:
        parse_event_log(data)
    assert "event" in str(caught.value) or "Spec ID" in str(caught.value)


def test_each_log_gets_its_own_spec_id_header() -> None:
    """Headers are parsed once per exact header bytes: never one log's for another's.

    Same first event after the header, headers differing only in the vendor info
    (which moves the first event) or in the banks.
    """
    events = [Ev(0, EV_POST_CODE, b"same")]
    plain = parse_event_log(AgileLog(events=events).build())
    vendor = parse_event_log(AgileLog(events=events, vendor=b"v" * 9).build())
    one_bank = parse_event_log(AgileLog(banks=[(SHA256, 32)], events=events).build())
    assert plain.spec_id is not None
    assert vendor.spec_id is not None
    assert (plain.spec_id.vendor_info, vendor.spec_id.vendor_info) == (b"", b"v" * 9)
    assert plain.banks == (SHA1, SHA256)
    assert one_bank.banks == (SHA256,)
    for log in (plain, vendor, one_bank):
        assert [e.data for e in log.events[1:]] == [b"same"]
    again = parse_event_log(AgileLog(events=events).build())
    assert again.spec_id == plain.spec_id


def test_errors_name_the_event_and_offset() -> None:
    log = AgileLog(events=[Ev(0, EV_POST_CODE, b"a"), Ev(0, EV_POST_CODE, b"b")])
    data = log.build() + event2_record(0, EV_POST_CODE, [(0x0012, bytes(32))], b"")
    with pytest.raises(FormatError, match=rf"event 3 \(offset {len(log.build())}\)"):
        parse_event_log(data)


# --------------------------------------------------------------------------- PCR 0 start value


def _locality_event(locality: int) -> Ev:
    return Ev(0, EV_NO_ACTION, b"StartupLocality\0" + bytes([locality]))


def test_startup_locality_3_starts_pcr0_at_3() -> None:
    blob = Ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, bytes(16))
    log = parse_event_log(AgileLog(events=[_locality_event(3), blob]).build())
    assert log.startup_locality == 3
    assert log.initial_pcrs(SHA256)[0] == bytes(31) + b"\x03"
    zero_start = parse_event_log(AgileLog(events=[blob]).build())
    assert log.replay()[SHA256][0] != zero_start.replay()[SHA256][0]


def test_h_crtm_event_first_in_pcr0_starts_it_at_4() -> None:
    log = parse_event_log(AgileLog(events=[Ev(0, EV_EFI_HCRTM_EVENT, b"HCRTM")]).build())
    assert log.startup_locality == 4


def test_startup_locality_after_pcr0_was_extended_is_ignored() -> None:
    events = [Ev(0, EV_POST_CODE, b"x"), _locality_event(3)]
    assert parse_event_log(AgileLog(events=events).build()).startup_locality == 0


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([_locality_event(2)], "StartupLocality event is not valid"),
        ([Ev(0, EV_NO_ACTION, b"StartupLocality\0\x03\x00")], "not valid"),
        ([_locality_event(3), _locality_event(3)], "a second StartupLocality"),
    ],
)
def test_bad_startup_locality(events: list[Ev], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_event_log(AgileLog(events=events).build())


# --------------------------------------------------------------------------- banks


def test_unknown_bank_declared_in_the_header_is_parsed_but_not_replayed() -> None:
    banks = [(SHA256, 32), (0x7777, 40)]
    log = parse_event_log(AgileLog(banks, [Ev(4, EV_SEPARATOR, bytes(4))]).build())
    assert log.banks == (SHA256, 0x7777)
    assert log.replayable_banks == (SHA256,)
    assert len(log.events[1].digests[0x7777]) == 40
    assert set(log.replay()) == {SHA256}
    with pytest.raises(VerificationError, match="0x7777"):
        log.replay([0x7777])


def test_replaying_a_bank_the_log_lacks_is_refused() -> None:
    log = parse_event_log(AgileLog([(SHA256, 32)], []).build())
    with pytest.raises(VerificationError, match="sha1"):
        log.replay([TpmAlg.SHA1])


def test_event_missing_a_declared_bank_is_not_extended_in_that_bank() -> None:
    events = [Ev(3, EV_SEPARATOR, bytes(4)), Ev(3, EV_SEPARATOR, bytes(4), banks=(SHA256,))]
    log = parse_event_log(AgileLog(events=events).build())
    assert SHA1 not in log.events[2].digests
    only_first = parse_event_log(AgileLog(events=events[:1]).build())
    assert log.replay()[SHA1][3] == only_first.replay()[SHA1][3]
    assert log.replay()[SHA256][3] != only_first.replay()[SHA256][3]


def test_banks_in_another_order_take_the_slow_path_and_parse_the_same() -> None:
    events = [Ev(7, EV_SEPARATOR, bytes(4), banks=(SHA256, SHA1))]
    log = parse_event_log(AgileLog(events=events).build())
    assert list(log.events[1].digests) == [SHA256, SHA1]
    assert (
        log.replay()
        == parse_event_log(AgileLog(events=[Ev(7, EV_SEPARATOR, bytes(4))]).build()).replay()
    )


def test_sha1_log_starting_with_a_legacy_header_is_a_sha1_log() -> None:
    header = Ev(0, EV_NO_ACTION, b"Spec ID Event00\0" + bytes(8))
    data = sha1_log([header, Ev(7, EV_SEPARATOR, bytes(4))])
    log = parse_event_log(data)
    assert log.format is eventlog.LogFormat.SHA1
    assert log.events[0].decode().fields["signature"] == "Spec ID Event00"
    assert list(log.replay()[SHA1]) == [7]


def test_variable_event_with_lengths_that_do_not_add_up_is_shown_as_hex() -> None:
    bad = variable(EFI_GLOBAL, "SecureBoot", b"\x01") + b"extra"
    log = parse_event_log(AgileLog(events=[Ev(7, 0x80000001, bad)]).build())
    decoded = log.events[1].decode()
    assert decoded.fields["hex"] == bad.hex()
    assert "do not add up" in decoded.fields["note"]


def test_spec_id_text_in_another_event_type_is_a_sha1_log() -> None:
    """Only an EV_NO_ACTION first event makes a log crypto-agile (TCG PFP 10.4.5.1)."""
    data = spec_id([(SHA256, 32)])
    log = parse_event_log(sha1_record(0, EV_POST_CODE, bytes(20), data))
    assert log.format is LogFormat.SHA1
    assert [(e.event_type, e.data) for e in log.events] == [(EV_POST_CODE, data)]


def test_the_last_pcr_is_accepted_and_found() -> None:
    """PCR 23 is the highest a PC Client TPM has: parsed, and found through the PCR index."""
    data = _agile_with(event2_record(23, EV_POST_CODE, _GOOD_DIGESTS, b"x"))
    log = parse_event_log(data)
    assert [m.pcr for m in log.measurements(SHA256, {23}, Measurement)] == [23]
    assert log.measurements(SHA256, {22}, Measurement) == []
