"""Baselines: made from reference logs, matched by PCR values, explained event by event,
and filed as candidates that an administrator approves with one transition."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest
import yaml

from guardfab.attestation.baseline import (
    BaselineSet,
    CandidateBaseline,
    CandidateState,
    DiffKind,
    TpmBaseline,
    baseline_from_log,
    baseline_from_summary,
    diff_events,
    file_candidate,
)
from guardfab.attestation.result import AttestationResult, AttestationStatus
from guardfab.attestation.summary import EventRecord, HostSummary
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.errors import FormatError, PolicyError, UsageError
from test_attestation_fixtures import (
    NONCE,
    NOW,
    Boot,
    SoftHost,
    golden_baseline,
    trust_for,
    vectors_dir,
)
from test_eventlog_builder import EV_NO_ACTION, AgileLog, Ev

EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001


def attest(boot: Boot, *baselines: TpmBaseline) -> AttestationResult:
    host = SoftHost(boot=boot)
    trust = trust_for(host, baselines=baselines or (golden_baseline(),))
    return verify_tpm_evidence(host.evidence(), trust, nonce=NONCE, now=NOW)


def summary_of(boot: Boot) -> HostSummary:
    result = attest(boot)
    assert result.summary is not None, result.explain()
    return result.summary


# ------------------------------------------------------------------ from logs


@pytest.mark.parametrize(
    "name",
    ["event-arch-linux.bin", "event-gce-ubuntu-2104-log.bin", "event-sd-boot-fedora37.bin"],
)
def test_a_baseline_from_a_real_log_has_the_pcrs_tpm2_tools_printed(name: str) -> None:
    folder = vectors_dir() / "eventlogs"
    baseline = baseline_from_log("ref", (folder / name).read_bytes())
    printed = yaml.safe_load((folder / f"{name}.yaml").read_text())["pcrs"]["sha256"]
    for pcr in range(8):
        expected = int(printed[pcr]).to_bytes(32, "big") if pcr in printed else bytes(32)
        assert baseline.pcrs[pcr] == expected
    assert baseline.secure_boot_variables is not None
    assert all(event.pcr < 8 and event.text for event in baseline.events)
    assert TpmBaseline.from_dict(baseline.to_dict()) == baseline


def test_a_sha1_only_log_cannot_make_a_baseline() -> None:
    log = (vectors_dir() / "eventlogs" / "event-uefi-sha1-log.bin").read_bytes()
    with pytest.raises(FormatError, match="SHA-256"):
        baseline_from_log("ref", log)


@pytest.mark.parametrize("pcrs", [(), (24,), (-1,)])
def test_a_baseline_needs_valid_pcrs(pcrs: tuple[int, ...]) -> None:
    with pytest.raises(UsageError):
        baseline_from_log("ref", Boot().log_bytes(), pcrs=pcrs)


@pytest.mark.parametrize("name", ["", "x" * 129, "tab\there"])
def test_a_baseline_needs_a_printable_name(name: str) -> None:
    with pytest.raises(UsageError):
        baseline_from_log(name, Boot().log_bytes())


def test_two_baselines_cannot_share_a_name() -> None:
    with pytest.raises(UsageError, match="named"):
        BaselineSet([golden_baseline(), golden_baseline()])


# ------------------------------------------------------------------ the diff


def test_the_diff_names_each_differing_event() -> None:
    """db changed, an extra boot application, BootOrder changed: three events, exactly."""
    boot = Boot(db=b"db: 2027 CA", extra_app=b"bootkit.efi", boot_order=b"\x02\x00\x01\x00")
    result = attest(boot)
    match = result.baseline
    assert match is not None
    assert not match.matched
    assert match.baseline.name == "golden-2026"
    assert match.pcr_mismatches == (1, 4, 7)
    found = [(d.kind, d.pcr, d.event_type) for d in match.differences]
    assert found == [
        (DiffKind.CHANGED, 1, EV_EFI_VARIABLE_BOOT),
        (DiffKind.EXTRA, 4, EV_EFI_BOOT_SERVICES_APPLICATION),
        (DiffKind.CHANGED, 7, EV_EFI_VARIABLE_DRIVER_CONFIG),
    ]
    extra = match.differences[1]
    assert extra.host_event is not None
    assert extra.host_event.digest == hashlib.sha256(b"PE image of bootkit.efi").digest()
    db = match.differences[2]
    assert db.baseline_event is not None
    assert db.host_event is not None
    assert db.baseline_event.number == db.host_event.number == 5
    assert "db" in db.host_event.describe()
    # The refusal carries the same diff, and explain() prints one line per event.
    assert result.to_dict()["baseline"]["differences"][1]["kind"] == "extra"
    text = result.explain()
    assert "PCR 4 extra EV_EFI_BOOT_SERVICES_APPLICATION" in text
    assert "PCR 7 changed EV_EFI_VARIABLE_DRIVER_CONFIG" in text
    pcr_baseline = {v.policy: v for v in result.verdicts}["Hgs_PcrBaseline"]
    assert set(pcr_baseline.events) == {
        d.host_event.number for d in match.differences if d.host_event
    }


def test_a_missing_event_is_named() -> None:
    golden = golden_baseline()
    reference = [e for e in golden.events if e.pcr == 4]  # separator, shim, grub
    diff = diff_events(4, reference, reference[:1] + reference[2:])
    assert [(d.kind, d.baseline_event.number if d.baseline_event else None) for d in diff] == [
        (DiffKind.MISSING, reference[1].number)
    ]


def test_a_replaced_run_of_another_type_is_missing_plus_extra() -> None:
    a = EventRecord(3, 4, EV_EFI_BOOT_SERVICES_APPLICATION, b"a" * 32, text="a")
    b = EventRecord(3, 4, EV_EFI_VARIABLE_BOOT, b"b" * 32, text="b")
    kinds = [d.kind for d in diff_events(4, [a], [b])]
    assert kinds == [DiffKind.MISSING, DiffKind.EXTRA]


def _with_locality(boot: Boot) -> AgileLog:
    log = boot.log()
    log.events.insert(0, Ev(0, EV_NO_ACTION, b"StartupLocality\0\x03"))
    return log


def test_a_start_value_difference_is_explained_without_inventing_events() -> None:
    """Same events, but TPM2_Startup ran at locality 3: PCR 0 differs, no event does."""
    golden = golden_baseline()
    located = baseline_from_log("locality-3", _with_locality(Boot()).build())
    assert located.pcrs[0] != golden.pcrs[0]
    summary = summary_of(Boot())
    match = BaselineSet([located]).match(summary)
    assert match is not None
    assert not match.matched
    assert match.differences == ()
    assert match.pcr_mismatches == (0,)
    assert any("start value" in line for line in match.lines())


def test_the_closest_baseline_is_picked() -> None:
    near = baseline_from_log("near", Boot(db=b"db: new", shim=b"shim 16").log_bytes())
    far = baseline_from_log(
        "far", Boot(db=b"db: new", shim=b"shim 16", boot_order=b"\x03\x00").log_bytes()
    )
    summary = summary_of(Boot(db=b"db: new"))
    match = BaselineSet([far, golden_baseline(), near]).match(summary)
    assert match is not None
    # near: shim differs (1 event); golden: db (1 event); far: shim + BootOrder (2).
    assert match.baseline.name in {"near", "golden-2026"}
    assert len(match.differences) == 1
    summary = summary_of(Boot(db=b"db: new", shim=b"shim 16", boot_order=b"\x04\x00"))
    match = BaselineSet([golden_baseline(), far, near]).match(summary)
    assert match is not None
    assert match.baseline.name in {"near", "far"}
    assert len(match.differences) == 1


def test_an_exact_match_needs_no_diff() -> None:
    result = attest(Boot())
    assert result.baseline is not None
    assert result.baseline.matched
    assert result.baseline.differences == ()


def test_a_baseline_over_unquoted_pcrs_is_not_evaluable() -> None:
    wide = baseline_from_log("wide", Boot().log_bytes(), pcrs=range(12))
    host = SoftHost()
    trust = trust_for(host, baselines=(wide,))
    result = verify_tpm_evidence(host.evidence(), trust, nonce=NONCE, now=NOW)
    verdict = {v.policy: v for v in result.verdicts}["Hgs_PcrBaseline"]
    assert "does not cover PCR(s) [10, 11]" in verdict.reason
    assert verdict.blocking


# ------------------------------------------------------------------ candidates


def test_file_approve_and_pass_after_a_firmware_update() -> None:
    updated = Boot(db=b"db: 2027 CA", dbx=b"dbx: 2027 revocations")
    before = attest(updated)
    assert before.status is AttestationStatus.INSECURE_HOST_CONFIGURATION
    assert before.summary is not None
    candidate = file_candidate(
        "fw-2027", before.summary, now=NOW, reason="secure boot database update"
    )
    assert candidate.state is CandidateState.PENDING
    assert candidate.host_id == "host-a"
    stored = CandidateBaseline.from_dict(candidate.to_dict())
    assert stored == candidate
    approved = stored.approve(now=NOW, existing={"golden-2026"})
    assert approved.state is CandidateState.APPROVED
    assert approved.decided_at == NOW
    after = attest(updated, golden_baseline(), approved.baseline)
    assert after.status is AttestationStatus.PASSED, after.explain()
    assert after.baseline is not None
    assert after.baseline.baseline.name == "fw-2027"


def test_a_candidate_is_decided_once() -> None:
    candidate = file_candidate("fw-2027", summary_of(Boot()), now=NOW)
    approved = candidate.approve(now=NOW, existing=())
    with pytest.raises(PolicyError, match="already approved"):
        approved.approve(now=NOW, existing=())
    with pytest.raises(PolicyError, match="already approved"):
        approved.reject(now=NOW, reason="late")
    rejected = candidate.reject(now=NOW, reason="unexpected bootloader")
    assert rejected.state is CandidateState.REJECTED
    assert rejected.reason == "unexpected bootloader"
    assert CandidateBaseline.from_dict(rejected.to_dict()) == rejected


def test_a_candidate_cannot_take_an_existing_name() -> None:
    candidate = file_candidate("golden-2026", summary_of(Boot()), now=NOW)
    with pytest.raises(PolicyError, match="already exists"):
        candidate.approve(now=NOW, existing={"golden-2026"})


def test_a_candidate_needs_every_baseline_pcr_quoted() -> None:
    with pytest.raises(UsageError, match="does not cover"):
        baseline_from_summary("wide", summary_of(Boot()), pcrs=range(12))


# ------------------------------------------------------------------ stored forms


def _mutations(good: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {**good, "extra": 1},
        {**good, "name": ""},
        {**good, "pcrs": {"sha1": good["pcrs"]["sha256"]}},
        {**good, "pcrs": {"sha256": {"0": "AB" * 32}}},
        {**good, "pcrs": {"sha256": {"00": "ab" * 32}}},
        {**good, "events": [{"number": 1}]},
        {**good, "secure_boot_variables": {"PK": "00" * 32}},
        {**good, "uintn_size": -1},
    ]


def test_stored_baselines_are_loaded_strictly() -> None:
    good = golden_baseline().to_dict()
    for bad in _mutations(good):
        with pytest.raises(FormatError):
            TpmBaseline.from_dict(bad)


def test_summary_round_trips_through_its_stored_log() -> None:
    summary = summary_of(Boot())
    stored = summary.to_dict()
    assert set(stored) == {"host_id", "verified_at", "pcrs", "facts", "uintn_size", "event_log"}
    loaded = HostSummary.from_dict(stored)
    assert loaded.to_dict() == stored
    assert loaded == summary
    assert loaded.pcrs == summary.pcrs
    assert loaded.events == summary.events
    assert {e.pcr for e in loaded.events} == set(summary.pcrs)
    assert loaded.events_in(9)[1].describe() == summary.events_in(9)[1].describe()
    with pytest.raises(FormatError):
        HostSummary.from_dict({**stored, "verified_at": "2026-06-01T12:00:00"})
    with pytest.raises(FormatError):
        HostSummary.from_dict(replace_key(stored, "facts", {"secure_boot": {"value": True}}))


def test_summary_stored_as_records_still_loads_and_round_trips() -> None:
    """Records written before the log was stored: one record per event, no raw data."""
    summary = summary_of(Boot())
    records = tuple(e._replace(text=e.describe(), data=b"") for e in summary.events)
    stored = summary.replace(events=records).to_dict()
    assert "event_log" not in stored
    assert len(stored["events"]) == len(summary.events)
    loaded = HostSummary.from_dict(stored)
    assert loaded.to_dict() == stored
    assert [e.digest for e in loaded.events] == [e.digest for e in summary.events]
    assert all(e.data == b"" and e.text for e in loaded.events)
    assert loaded.events_in(9)[1].describe() == summary.events_in(9)[1].describe()


def test_a_stored_log_that_does_not_replay_to_the_stored_pcrs_is_refused() -> None:
    """An edited record: another boot's log under these PCRs, a cut log, both forms at once."""
    stored = summary_of(Boot()).to_dict()
    other = summary_of(Boot(shim=b"shimx64.efi 15.9")).to_dict()
    swapped = {**stored, "event_log": other["event_log"]}
    with pytest.raises(FormatError, match="does not replay to PCR"):
        HostSummary.from_dict(swapped)
    with pytest.raises(FormatError, match="event log is unusable"):
        HostSummary.from_dict({**stored, "event_log": stored["event_log"][:-40]})
    with pytest.raises(FormatError, match="unknown field"):
        HostSummary.from_dict({**stored, "events": []})
    with pytest.raises(FormatError):
        HostSummary.from_dict({**stored, "event_log": "not base64url!"})


def replace_key(obj: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**obj, key: value}


def test_a_baseline_made_from_a_summary_equals_one_from_the_log() -> None:
    from_summary = baseline_from_summary("golden-2026", summary_of(Boot()))
    from_log = golden_baseline()
    assert from_summary.pcrs == from_log.pcrs
    assert from_summary.secure_boot_variables == from_log.secure_boot_variables
    assert [e.digest for e in from_summary.events] == [e.digest for e in from_log.events]
    assert replace(from_summary, events=from_log.events) == from_log
