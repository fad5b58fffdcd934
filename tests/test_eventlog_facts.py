"""Attacks on the facts: altered data, relabelled types, missing banks, absent evidence.

Only digests are bound by the quote. These tests change what a PCR does not
cover (event data, event type, other banks) and check that no fact follows the
change: a fact either keeps its true value or becomes unknown, never flips.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guardfab.tpm import uefi
from guardfab.tpm.eventlog import EventLog, parse_event_log
from guardfab.tpm.events import (
    DigestRule,
    DigestStatus,
    check_digests,
    digest_matches,
    measured_bytes,
)
from guardfab.tpm.logfacts import SECURE_BOOT_VARIABLES, Fact, _Reader, _separators
from test_eventlog_builder import (
    EFI_GLOBAL,
    EFI_SECURITY_DB,
    EV_EFI_ACTION,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_POST_CODE,
    EV_SEPARATOR,
    SHA1,
    SHA256,
    VECTOR_NAMES,
    AgileLog,
    Ev,
    digest,
    variable,
    vectors_fixture,  # noqa: F401 (the vectors fixture)
)

SEPARATOR = bytes(4)


def _secure_boot_log(value: bytes, *, extra: list[Ev] | None = None) -> AgileLog:
    """A minimal PFP-shaped boot: policy variables in PCR 7, then separators 0-7."""
    policy = [
        Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "SecureBoot", value)),
        Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "PK", b"pk")),
        Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "KEK", b"kek")),
        Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "db", b"db")),
        Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "dbx", b"dbx")),
    ]
    separators = [Ev(pcr, EV_SEPARATOR, SEPARATOR) for pcr in (7, 0, 1, 2, 3, 4, 5, 6)]
    return AgileLog(events=(extra or []) + policy + separators)


def _tamper(data: bytes, log: EventLog, number: int, position: int = -1) -> bytes:
    """Flip one byte of event ``number``'s data (its digests stay as they were)."""
    event = log.events[number]
    start = event.offset + (len(_record_head(data, log, number)))
    index = start + (position % len(event.data))
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _record_head(data: bytes, log: EventLog, number: int) -> bytes:
    event = log.events[number]
    end = log.events[number + 1].offset if number + 1 < len(log.events) else len(data)
    return data[event.offset : end - len(event.data)]


def test_secure_boot_enabled_is_read_from_the_verified_variable() -> None:
    log = parse_event_log(_secure_boot_log(b"\x01").build())
    facts = log.facts(SHA256)
    assert facts.secure_boot.value is True
    assert facts.secure_boot.events == (1,)
    assert facts.separators_ok.value is True
    assert facts.uefi_debug_disabled.value is True
    assert facts.secure_boot_variables.value["db"] == {
        "sha1": digest(SHA1, variable(EFI_SECURITY_DB, "db", b"db")).hex(),
        "sha256": digest(SHA256, variable(EFI_SECURITY_DB, "db", b"db")).hex(),
    }


def test_altered_secure_boot_data_makes_the_fact_unknown_not_false() -> None:
    """SecureBoot=0 measured, attacker writes 1 into the data: no 'enabled' follows."""
    data = _secure_boot_log(b"\x00").build()
    log = parse_event_log(data)
    assert log.facts().secure_boot.value is False
    tampered = parse_event_log(_tamper(data, log, 1))
    assert tampered.events[1].data.endswith(b"\x01")
    assert tampered.digest_check(tampered.events[1]).status is DigestStatus.MISMATCH
    assert tampered.replay() == log.replay()  # the PCRs cannot see it ...
    fact = tampered.facts().secure_boot
    assert fact.value is None  # ... but the fact is gone
    assert "does not verify" in fact.note
    assert tampered.facts().secure_boot_variables.value is not None


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_every_strict_verified_event_of_a_real_log_fails_when_one_byte_changes(
    vectors: Path,
    name: str,
) -> None:
    data = (vectors / name).read_bytes()
    log = parse_event_log(data)
    strict = [
        e
        for e in log.events
        if e.data
        and measured_bytes(e.event_type, e.data)[0] is DigestRule.STRICT
        and log.digest_check(e).status is DigestStatus.VERIFIED
    ]
    for event in strict:
        tampered = parse_event_log(_tamper(data, log, event.number, len(event.data) // 2))
        check = tampered.digest_check(tampered.events[event.number])
        assert check.status is DigestStatus.MISMATCH, event
        assert not any(check.banks.values())


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_the_verifiers_one_bank_check_agrees_with_the_full_check(vectors: Path, name: str) -> None:
    """digest_matches (the verifier's quoted bank) says True exactly where check_digests does.

    Every event of every real log, intact and with one byte of data changed.
    """
    data = (vectors / name).read_bytes()
    log = parse_event_log(data)
    compared = 0
    for event in log.events:
        variants = [event.data] + ([event.data[:-1] + b"\xff"] if event.data else [])
        for variant in variants:
            full = check_digests(event.event_type, variant, event.digests).banks
            for bank, value in event.digests.items():
                one = digest_matches(event.event_type, variant, bank, value)
                assert one is (full.get(bank) is True), (event.number, bank)
                compared += 1
    assert compared >= len(log.events) - 1


def test_tampered_secure_boot_variable_in_a_real_log_removes_the_fact(
    vectors: Path,
) -> None:
    data = (vectors / "event-arch-linux.bin").read_bytes()
    log = parse_event_log(data)
    assert log.facts().secure_boot.value is False
    tampered = parse_event_log(_tamper(data, log, 3, 0))  # the variable's GUID
    assert tampered.facts().secure_boot.value is None
    tampered_db = parse_event_log(_tamper(data, log, 6, 100))
    assert tampered_db.facts().secure_boot_variables.value is None
    assert "event 6 (db)" in tampered_db.facts().secure_boot_variables.note


def test_altered_separator_breaks_separators_ok() -> None:
    data = _secure_boot_log(b"\x01").build()
    log = parse_event_log(data)
    tampered = parse_event_log(_tamper(data, log, 6, 0))
    fact = tampered.facts().separators_ok
    assert fact.value is False
    assert "PCR 7 separator" in fact.note
    # PCR 7 unsealed: the absence of the debug measurement no longer means anything.
    assert tampered.facts().uefi_debug_disabled.value is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": 3}, "PCR 3 has 0 separators"),
        ({"add": Ev(3, EV_SEPARATOR, SEPARATOR)}, "PCR 3 has 2 separators"),
        ({"add": Ev(9, EV_SEPARATOR, SEPARATOR)}, None),
    ],
)
def test_separator_count_per_pcr(change: dict[str, object], message: str | None) -> None:
    log = _secure_boot_log(b"\x01")
    if "drop" in change:
        log.events = [
            e for e in log.events if not (e.type == EV_SEPARATOR and e.pcr == change["drop"])
        ]
    if "add" in change:
        log.events.append(change["add"])  # type: ignore[arg-type]
    fact = parse_event_log(log.build()).facts().separators_ok
    assert fact.value is (message is None)
    if message:
        assert message in fact.note


def test_error_separator_is_not_ok() -> None:
    log = _secure_boot_log(b"\x01")
    log.events[-1] = Ev(6, EV_SEPARATOR, b"\x01\x00\x00\x00")
    fact = parse_event_log(log.build()).facts().separators_ok
    assert fact.value is False
    assert "value 01000000" in fact.note


@pytest.mark.parametrize("text", [b"UEFI Debug Mode", b"UEFI Debug Mode\0"])
def test_uefi_debug_mode_is_found_by_its_digest(text: bytes) -> None:
    debug = Ev(7, EV_EFI_ACTION, text)
    log = parse_event_log(_secure_boot_log(b"\x01", extra=[debug]).build())
    fact = log.facts().uefi_debug_disabled
    assert fact.value is False
    assert fact.events == (1,)


def test_relabelled_and_rewritten_debug_event_is_still_found() -> None:
    """Type and data are not in the PCR: an attacker can change both, not the digest."""
    digests = {alg: digest(alg, b"UEFI Debug Mode") for alg in (SHA1, SHA256)}
    disguised = Ev(7, EV_POST_CODE, b"nothing to see here", digests)
    log = parse_event_log(_secure_boot_log(b"\x01", extra=[disguised]).build())
    assert log.facts().uefi_debug_disabled.value is False


def test_debug_mode_in_another_pcr_does_not_count() -> None:
    elsewhere = Ev(4, EV_EFI_ACTION, b"UEFI Debug Mode")
    log = parse_event_log(_secure_boot_log(b"\x01", extra=[elsewhere]).build())
    assert log.facts().uefi_debug_disabled.value is True


@pytest.mark.parametrize("text", [b"DMA Protection Disabled", b"DMA Protection Disabled\0"])
def test_dma_protection_disabled_is_reported(text: bytes) -> None:
    log = parse_event_log(_secure_boot_log(b"\x01", extra=[Ev(7, EV_EFI_ACTION, text)]).build())
    fact = log.facts().dma_protection
    assert fact.value is False
    assert fact.events == (1,)


def test_dma_protection_is_never_claimed_from_absence() -> None:
    fact = parse_event_log(_secure_boot_log(b"\x01").build()).facts().dma_protection
    assert fact.value is None
    assert "cannot be shown" in fact.note


def test_quoted_bank_missing_from_the_event_means_no_fact() -> None:
    """SecureBoot=1 measured in SHA-1 only: a SHA-256 quote does not cover it."""
    log = _secure_boot_log(b"\x01")
    log.events[0] = Ev(log.events[0].pcr, log.events[0].type, log.events[0].data, banks=(SHA1,))
    parsed = parse_event_log(log.build())
    assert parsed.facts(SHA1).secure_boot.value is True
    assert parsed.facts(SHA256).secure_boot.value is None
    assert parsed.facts().secure_boot.value is None  # default: every replayable bank


def test_a_wrong_digest_in_an_unquoted_bank_neither_makes_nor_removes_the_fact() -> None:
    """The quoted bank decides: a SHA-1 digest is attested by nothing in a SHA-256 quote.

    A person's view of the log (no quote, every bank) still refuses the data.
    """
    log = _secure_boot_log(b"\x01")
    first = log.events[0]
    log.events[0] = Ev(first.pcr, first.type, first.data, {SHA1: bytes(20)})
    parsed = parse_event_log(log.build())
    assert parsed.digest_check(parsed.events[1]).status is DigestStatus.MISMATCH
    assert parsed.facts(SHA256).secure_boot.value is True
    assert parsed.facts(SHA1).secure_boot.value is None
    assert parsed.facts().secure_boot.value is None


def _with_sha1_of_altered_data(value: bytes, altered: bytes) -> AgileLog:
    """SecureBoot logged as ``altered`` (SHA-1 digest to match), SHA-256 of ``value``."""
    log = _secure_boot_log(value)
    first = log.events[0]
    measured = variable(EFI_GLOBAL, "SecureBoot", value)
    shown = variable(EFI_GLOBAL, "SecureBoot", altered)
    log.events[0] = Ev(
        first.pcr, first.type, shown, {SHA1: digest(SHA1, shown), SHA256: digest(SHA256, measured)}
    )
    return log


def test_data_matching_only_an_unquoted_bank_gives_no_fact() -> None:
    """Attack: SecureBoot=0 measured, the data rewritten to 1 with a SHA-1 digest to match.

    The SHA-256 digest (what the quote binds) still measures 0, so the quoted
    bank's check fails and the verifier reads nothing, whatever SHA-1 says.
    """
    parsed = parse_event_log(_with_sha1_of_altered_data(b"\x00", b"\x01").build())
    assert parsed.facts(SHA256).secure_boot.value is None
    assert "does not verify" in parsed.facts(SHA256).secure_boot.note
    assert parsed.facts().secure_boot.value is None


def test_secure_boot_measured_twice_is_ambiguous() -> None:
    again = Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "SecureBoot", b"\x01"))
    log = parse_event_log(_secure_boot_log(b"\x01", extra=[again]).build())
    fact = log.facts().secure_boot
    assert fact.value is None
    assert "2 times" in fact.note


def test_secure_boot_variable_with_another_guid_is_not_secure_boot() -> None:
    log = _secure_boot_log(b"\x00")
    log.events[0] = Ev(
        7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "SecureBoot", b"\x01")
    )
    assert parse_event_log(log.build()).facts().secure_boot.value is None


def test_facts_to_dict_lists_values_and_evidence() -> None:
    out = parse_event_log(_secure_boot_log(b"\x01").build()).facts().to_dict()
    assert out["secure_boot"] is True
    assert out["hibernation_disabled"] is None
    assert out["evidence"]["secure_boot"] == {"events": [1], "note": "SecureBoot = 1 (enabled)"}
    assert "hibernation" in out["evidence"]["hibernation_disabled"]["note"]


_FACT_VARIABLES = ((EFI_GLOBAL, "SecureBoot"), *SECURE_BOOT_VARIABLES)


def _parsed_key(data: bytes) -> tuple[tuple[bytes, str], bytes] | None:
    """What the facts read from ``data`` through the full parse: a known key and contents."""
    try:
        var = uefi.parse_variable(data)
    except uefi.UndecodableError:
        return None
    key = (var.guid, var.name)
    return (key, var.data) if key in _FACT_VARIABLES else None


def _variable_variants(data: bytes) -> list[bytes]:
    """``data``, then with one byte changed in each header field, the name and the end."""
    variants = [data, data[:-1], data + b"\0"]
    for at in (0, 15, 16, 23, 24, 31, 32, 33, len(data) - 1):
        if 0 <= at < len(data):
            variants.append(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    return variants


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_the_facts_find_variables_exactly_where_the_full_parse_names_them(
    vectors: Path, name: str
) -> None:
    """The raw-byte match of the facts' five variables agrees with parse_variable.

    Every event of every real log, intact and with a byte changed in each field.
    """
    log = parse_event_log((vectors / name).read_bytes())
    known = uefi.KnownVariables(_FACT_VARIABLES)
    found = 0
    for event in log.events:
        for variant in _variable_variants(event.data):
            assert known.match(variant) == _parsed_key(variant), (event.number, variant.hex())
        found += known.match(event.data) is not None
    # The four UEFI logs measure all five; the short test logs none.
    assert found in (0, len(_FACT_VARIABLES))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([(EFI_GLOBAL, "")], "16-byte GUID and a name"),
        ([(EFI_GLOBAL[:15], "PK")], "16-byte GUID and a name"),
        ([(EFI_GLOBAL, "PK"), (EFI_GLOBAL, "XY")], "share a head"),
    ],
)
def test_known_variables_refuse_keys_they_cannot_tell_apart(
    keys: list[tuple[bytes, str]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        uefi.KnownVariables(keys)


def test_a_variable_named_with_a_trailing_nul_is_another_variable() -> None:
    """UEFI names are counted, not NUL-terminated: "SecureBoot\\0" is not SecureBoot."""
    log = _secure_boot_log(b"\x00")
    log.events[0] = Ev(
        7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "SecureBoot\0", b"\x01")
    )
    assert parse_event_log(log.build()).facts(SHA256).secure_boot.value is None


_ERROR_SEPARATOR = b"\x01\x00\x00\x00"


def _with_pcr3_separator(separator: Ev) -> bytes:
    log = _secure_boot_log(b"\x01")
    log.events = [separator if (e.type == EV_SEPARATOR and e.pcr == 3) else e for e in log.events]
    return log.build()


@pytest.mark.parametrize(
    ("separator", "quoted_ok", "every_bank_ok"),
    [
        (Ev(3, EV_SEPARATOR, SEPARATOR), True, True),
        # Attack: the data rewritten to 00000000 after an error separator was measured.
        (
            Ev(
                3, EV_SEPARATOR, SEPARATOR, {b: digest(b, _ERROR_SEPARATOR) for b in (SHA1, SHA256)}
            ),
            False,
            False,
        ),
        # Attack: an error separator relabelled with the digests of a normal one.
        (
            Ev(
                3, EV_SEPARATOR, _ERROR_SEPARATOR, {b: digest(b, SEPARATOR) for b in (SHA1, SHA256)}
            ),
            False,
            False,
        ),
        # Only the quoted bank measured the error: the unquoted SHA-1 digest proves nothing.
        (Ev(3, EV_SEPARATOR, SEPARATOR, {SHA256: digest(SHA256, _ERROR_SEPARATOR)}), False, False),
        # Only the unquoted bank is wrong: the quoted one decides (a person's view refuses).
        (Ev(3, EV_SEPARATOR, SEPARATOR, {SHA1: digest(SHA1, _ERROR_SEPARATOR)}), True, False),
        (Ev(3, EV_SEPARATOR, SEPARATOR, {SHA256: bytes(32)}), False, False),
        # The quoted bank missing from the record: nothing attests the data.
        (Ev(3, EV_SEPARATOR, SEPARATOR, banks=(SHA1,)), False, False),
    ],
)
def test_a_separator_counts_only_if_the_quoted_bank_measured_00000000(
    separator: Ev, quoted_ok: bool, every_bank_ok: bool
) -> None:
    log = parse_event_log(_with_pcr3_separator(separator))
    quoted = log.facts(SHA256).separators_ok
    assert quoted.value is quoted_ok
    assert _separators_both_ways(log, SHA256) == (quoted, quoted)
    assert log.facts().separators_ok.value is every_bank_ok
    if not quoted_ok:
        assert quoted.note.startswith("PCR 3 separator (event ")


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_the_normal_separator_shortcut_agrees_with_the_digest_check(
    vectors: Path, name: str
) -> None:
    """With a quoted bank, normal_separator says True exactly when trusted() and 00000000 do.

    Every event of every real log, as a separator with its own data, 00000000 and
    an error value, each with its own digests and with those of 00000000.
    """
    log = parse_event_log((vectors / name).read_bytes())
    for bank in (*log.banks, 0x7777):  # 0x7777: a bank nothing can hash
        reader = _Reader(log, bank)
        for event in log.events:
            normal = {alg: digest(alg, SEPARATOR)[: len(d)] for alg, d in event.digests.items()}
            for data in (event.data, SEPARATOR, _ERROR_SEPARATOR):
                for digests in (event.digests, normal):
                    variant = event._replace(event_type=EV_SEPARATOR, data=data, digests=digests)
                    expected = reader.trusted(variant) and data == SEPARATOR
                    assert reader.normal_separator(variant) is expected, (event.number, bank)


def _separators_both_ways(log: EventLog, bank: int) -> tuple[Fact, Fact]:
    """The separator fact from the separator records first, and from the events alone."""
    careful = _Reader(log, bank)
    careful.separator_records = None  # as a reader without records: the events decide
    return _separators(_Reader(log, bank)), _separators(careful)


@pytest.mark.parametrize(
    "separators",
    [
        [Ev(3, EV_SEPARATOR, SEPARATOR), Ev(3, EV_SEPARATOR, SEPARATOR, banks=(SHA1,))],
        [Ev(3, EV_SEPARATOR, SEPARATOR, banks=(SHA1,)), Ev(3, EV_SEPARATOR, SEPARATOR)],
        [Ev(9, EV_SEPARATOR, SEPARATOR)],  # outside PCRs 0-7: not read
        [Ev(7, EV_SEPARATOR, SEPARATOR)],
    ],
)
def test_separator_records_and_events_agree_on_extra_separators(separators: list[Ev]) -> None:
    """A second separator counts, with or without the quoted bank's digest, both ways."""
    log = _secure_boot_log(b"\x01")
    log.events = [e for e in log.events if not (e.type == EV_SEPARATOR and e.pcr == 3)]
    log.events += separators
    parsed = parse_event_log(log.build())
    fast, careful = _separators_both_ways(parsed, SHA256)
    assert fast == careful
    assert fast.value is (len([e for e in separators if e.pcr == 3]) == 1)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_separator_records_and_events_agree_on_every_vector(vectors: Path, name: str) -> None:
    """The verifier's separator fact is the same from the records as from the events.

    Every real log, in each of its banks, intact and with each separator's data
    changed (its digests kept); the intact UEFI logs are settled by the records.
    """
    data = (vectors / name).read_bytes()
    log = parse_event_log(data)
    separators = [e for e in log.events if e.event_type == EV_SEPARATOR and e.pcr < 8]
    for bank in log.banks:
        fast, careful = _separators_both_ways(log, bank)
        assert fast == careful, bank
        if fast.value:
            assert _Reader(log, bank).normal_separators() == fast.events
    for event in separators:
        tampered = parse_event_log(_tamper(data, log, event.number, 0))
        for bank in log.banks:
            fast, careful = _separators_both_ways(tampered, bank)
            assert fast == careful, (event.number, bank)
            assert fast.value is False
