"""The real logs in shared/vectors/eventlogs: same events and PCRs as tpm2-tools.

Each ``X.bin.yaml`` is what ``tpm2_eventlog`` printed for ``X.bin``. A parser is
right for these logs when it yields the same events (PCR, type, digests, size)
and replays to the same PCR values in every bank.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import EventLog, LogFormat, parse_event_log
from guardfab.tpm.events import DigestStatus, alg_name
from test_eventlog_builder import (
    VECTOR_NAMES,
    VECTORS,
    vectors_fixture,  # noqa: F401 (the vectors fixture)
)


def _yaml_events(text: str) -> list[dict[str, Any]]:
    """Events from tpm2-tools YAML; its SHA-1 output repeats keys in one mapping.

    For SHA-1 logs tpm2-tools prints all events as one mapping with repeated
    keys, which a normal load collapses into one event; walking the node tree
    and starting an event at each ``PCRIndex`` recovers every one.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    assert isinstance(root, yaml.MappingNode)
    events = next(value for key, value in root.value if key.value == "events")
    loader = yaml.SafeLoader("")
    if isinstance(events, yaml.SequenceNode):
        return [loader.construct_object(item, deep=True) for item in events.value]
    out: list[dict[str, Any]] = []
    for key, value in events.value:
        if key.value == "PCRIndex":
            out.append({})
        out[-1][key.value] = loader.construct_object(value, deep=True)
    return out


def _load(vectors: Path, name: str) -> tuple[EventLog, dict[str, Any], list[dict[str, Any]]]:
    text = (vectors / f"{name}.yaml").read_text()
    log = parse_event_log((vectors / name).read_bytes())
    return log, yaml.safe_load(text), _yaml_events(text)


def test_every_vector_in_the_directory_is_tested(vectors: Path) -> None:
    assert {p.name for p in vectors.glob("*.bin")} == set(VECTOR_NAMES)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_replays_to_the_pcrs_tpm2_tools_printed(vectors: Path, name: str) -> None:
    log, expected, _ = _load(vectors, name)
    want = {
        bank: {int(pcr): f"{value:0{2 * _size(bank)}x}" for pcr, value in values.items()}
        for bank, values in (expected.get("pcrs") or {}).items()
    }
    got = {
        alg_name(bank): {pcr: value.hex() for pcr, value in values.items()}
        for bank, values in log.replay().items()
        if values
    }
    assert got == want


def _size(bank_name: str) -> int:
    return {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}[bank_name]


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_yields_the_events_tpm2_tools_printed(vectors: Path, name: str) -> None:
    log, _, events = _load(vectors, name)
    assert len(log.events) == len(events)
    for event, want in zip(log.events, events, strict=True):
        assert event.pcr == want["PCRIndex"]
        assert event.type_name == want["EventType"]
        if "Digests" in want:
            digests = {d["AlgorithmId"]: d["Digest"] for d in want["Digests"]}
            assert {alg_name(a): d.hex() for a, d in event.digests.items()} == digests
            assert len(event.data) == want["EventSize"]


@pytest.mark.parametrize(
    ("name", "log_format", "banks"),
    [
        ("event-arch-linux.bin", LogFormat.CRYPTO_AGILE, (TpmAlg.SHA1, TpmAlg.SHA256)),
        ("event-gce-ubuntu-2104-log.bin", LogFormat.CRYPTO_AGILE, (4, 11, 12)),
        ("event-sd-boot-fedora37.bin", LogFormat.CRYPTO_AGILE, (TpmAlg.SHA256,)),
        ("event-uefi-sha1-log.bin", LogFormat.SHA1, (TpmAlg.SHA1,)),
        ("event.bin", LogFormat.CRYPTO_AGILE, (4, 11, 12, 13)),
        ("specid-vendordata.bin", LogFormat.CRYPTO_AGILE, (4, 11)),
    ],
)
def test_format_and_banks(
    vectors: Path,
    name: str,
    log_format: LogFormat,
    banks: tuple[int, ...],
) -> None:
    log = parse_event_log((vectors / name).read_bytes())
    assert log.format is log_format
    assert log.banks == banks


def test_spec_id_vendor_data_longer_than_its_record_is_read_as_tpm2_tools_does(
    vectors: Path,
) -> None:
    """The record says 37 bytes, the header's fields take 41: the fields win, with a note."""
    log = parse_event_log((vectors / "specid-vendordata.bin").read_bytes())
    assert log.spec_id is not None
    assert log.spec_id.vendor_info == bytes.fromhex("deadbeef")
    assert len(log.events) == 1
    assert "37 bytes" in log.notes[0]


@pytest.mark.parametrize(
    ("name", "secure_boot", "separators_ok", "debug_disabled"),
    [
        ("event-arch-linux.bin", False, True, True),
        ("event-gce-ubuntu-2104-log.bin", False, True, True),
        ("event-sd-boot-fedora37.bin", False, True, True),
        ("event-uefi-sha1-log.bin", False, True, True),
        ("event.bin", None, False, None),
    ],
)
def test_facts_of_the_real_logs(
    vectors: Path,
    name: str,
    secure_boot: bool | None,
    separators_ok: bool,
    debug_disabled: bool | None,
) -> None:
    facts = parse_event_log((vectors / name).read_bytes()).facts()
    assert facts.secure_boot.value is secure_boot
    assert facts.separators_ok.value is separators_ok
    assert facts.uefi_debug_disabled.value is debug_disabled
    assert facts.dma_protection.value is None
    for gap in ("resumed", "hibernation_disabled", "dumps_disabled", "ci_policy"):
        fact = getattr(facts, gap)
        assert fact.value is None
        assert fact.note


def test_secure_boot_variables_are_the_measured_digests(vectors: Path) -> None:
    log = parse_event_log((vectors / "event-sd-boot-fedora37.bin").read_bytes())
    fact = log.facts(TpmAlg.SHA256).secure_boot_variables
    assert fact.events == (5, 6, 7, 8)
    assert fact.value["PK"] == {
        "sha256": "dea7b80ab53a3daaa24d5cc46c64e1fa9ffd03739f90aadbd8c0867c4a5b4890"
    }
    assert set(fact.value) == {"PK", "KEK", "db", "dbx"}


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_strict_event_types_all_verify_in_real_logs(vectors: Path, name: str) -> None:
    """Untouched real logs never show a mismatch: the digest rules match real firmware."""
    log = parse_event_log((vectors / name).read_bytes())
    statuses = {log.digest_check(e).status for e in log.events}
    assert DigestStatus.MISMATCH not in statuses


@pytest.mark.parametrize(
    ("name", "variable_data_only"),
    [
        ("event-arch-linux.bin", False),
        ("event-gce-ubuntu-2104-log.bin", True),
        ("event-sd-boot-fedora37.bin", True),
    ],
)
def test_boot_variables_verify_in_either_firmware_form(
    vectors: Path, name: str, variable_data_only: bool
) -> None:
    """EDK2 (GCE, OVMF) hashes VariableData only, the laptop firmware the whole structure."""
    log = parse_event_log((vectors / name).read_bytes())
    boot = [e for e in log.events if e.event_type == 0x80000002]
    assert len(boot) >= 4
    for event in boot:
        assert log.digest_check(event).status is DigestStatus.VERIFIED
        whole = hashlib.sha256(event.data).digest() == event.digests[TpmAlg.SHA256]
        assert whole is not variable_data_only


def test_decoded_events_of_a_real_log(vectors: Path) -> None:
    log = parse_event_log((vectors / "event-arch-linux.bin").read_bytes())
    by_number = {e.number: e.decode(log.uintn_size) for e in log.events}
    assert by_number[0].fields["digest_sizes"] == {"sha1": 20, "sha256": 32}
    assert by_number[1].fields == {"guid": "546bfb1e-1d0c-4055-a4ad-4ef4bf17b83a"}
    assert by_number[3].fields["name"] == "SecureBoot"
    assert by_number[3].fields["enabled"] is False
    assert by_number[7].summary == "dbx: 77 sha256"
    assert by_number[8].fields == {"value": "00000000", "error": False}
    assert by_number[18].fields["boot_order"] == ["Boot0000", "Boot0003", "Boot0002"]
    assert by_number[19].fields["description"] == "Linux Boot Manager"
    assert by_number[19].fields["device_path"].endswith(r"\EFI\SYSTEMD\SYSTEMD-BOOTX64.EFI")
    assert by_number[23].fields["device_path"].endswith(r"\vmlinuz-linux-lts")
    assert by_number[24].fields["text"].startswith(r"initrd=\intel-ucode.img")
    assert by_number[24].fields["text"].endswith("l1tf=off")
    gpt = by_number[17].fields
    assert [p["name"] for p in gpt["partitions"]] == [
        "EFI System",
        "Linux RAID",
        "Linux filesystem",
    ]


def test_decoded_grub_and_shim_events(vectors: Path) -> None:
    log = parse_event_log((vectors / "event-gce-ubuntu-2104-log.bin").read_bytes())
    decoded = {e.number: e.decode(log.uintn_size).fields for e in log.events}
    assert decoded[1] == {"text": "GCE Virtual Firmware v1"}
    assert decoded[14] == {"text": "Calling EFI Application from Boot Option"}
    assert decoded[26]["name"] == "SbatLevel"
    assert decoded[26]["text"] == "sbat,1,2021030218\n"
    assert decoded[102]["text"].startswith("kernel_cmdline: /boot/vmlinuz-5.11.0-1008-gcp")
    assert log.digest_check(log.events[102]).status is DigestStatus.VERIFIED


def test_odd_image_event_is_decoded_with_its_trailing_bytes_noted(vectors: Path) -> None:
    log = parse_event_log((vectors / "event-uefi-sha1-log.bin").read_bytes())
    fields = log.events[16].decode().fields
    assert fields["device_path_length"] == 0
    assert fields["trailing_bytes"] == "00081100000c1100cc"


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_json_form_has_the_promised_shape(vectors: Path, name: str) -> None:
    log = parse_event_log((vectors / name).read_bytes())
    out = log.to_dict()
    assert set(out) == {"events", "pcrs", "facts"}
    assert set(out["pcrs"]) == {alg_name(b) for b in log.banks}
    for values in out["pcrs"].values():
        assert all(key.isdigit() and value == value.lower() for key, value in values.items())
    assert len(out["events"]) == len(log.events)
    assert {"pcr", "type", "digests", "data", "digest_verified"} <= set(out["events"][0])


def test_vectors_location_is_beside_the_repository() -> None:
    assert Path(__file__).resolve().parents[1].name != "shared"
    assert VECTORS.parts[-3:] == ("shared", "vectors", "eventlogs")
