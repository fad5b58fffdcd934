"""hosts/last/<host> and hosts/boot/<host>: the encoding reads back as exactly what readers expect.

The record's events member (the verified boot log) is stored under
hosts/boot/<host>, made once per events source (one per distinct boot log and
quote selection), and the record names it by digest; these tests show the two
read back (:func:`read_last_record`) as ``{"result": result.to_dict(),
"summary": summary.to_dict()}``, that what changes per attestation (time, PCRs,
facts, the host) is never served stale, and that another boot's events never
stand in for this one's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest
from fastapi.responses import JSONResponse

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.summary import HostSummary, _describe
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_decode
from guardfab.hgs import registry as reg
from guardfab.hgs.attest import AttestOutcome
from guardfab.hgs.last_record import (
    UnresolvedBootError,
    encode_last_record,
    json_text,
    read_last_record,
)
from guardfab.store.base import Entry
from guardfab.store.memory import MemoryStore
from test_attestation_fixtures import NONCE, NOW, Boot, SoftHost, trust_for

#: A host after a secure boot db update: another boot of the same host.
UPDATED = Boot(db=b"db: vendor CA + 2026 update CA")


def _expected(result: AttestationResult) -> dict[str, object]:
    summary = None if result.summary is None else result.summary.to_dict()
    return {"result": result.to_dict(), "summary": summary}


def _read_back(result: AttestationResult) -> dict[str, Any]:
    """What a reader gets after ``result`` is stored as the attestation path stores it."""
    assert result.host_id is not None
    last, boot = encode_last_record(result)
    store = MemoryStore()
    store.put(reg.LAST + result.host_id, last)
    if boot is not None:
        store.put(reg.BOOT + result.host_id, boot.value)
    found = read_last_record(store, result.host_id)
    assert found is not None
    return found


def _attest(host: SoftHost, now: datetime.datetime = NOW) -> AttestationResult:
    return verify_tpm_evidence(host.evidence(), trust_for(host), nonce=NONCE, now=now)


def test_a_tpm_record_decodes_to_the_result_and_summary() -> None:
    result = _attest(SoftHost())
    assert result.summary is not None
    for _ in range(2):  # the second time, the events come from the cache
        record = _read_back(result)
        assert record == _expected(result)
        assert HostSummary.from_dict(record["summary"]) == result.summary


def test_a_record_without_summary_has_null() -> None:
    result = replace(_attest(SoftHost()), summary=None)
    assert _read_back(result) == _expected(result)


def test_per_attestation_fields_are_encoded_afresh() -> None:
    host = SoftHost()
    first = _attest(host)
    later = _attest(host, NOW + datetime.timedelta(hours=1))
    assert later.summary is not None
    other_host = replace(later, summary=later.summary.replace(host_id="host-z"))
    for result in (first, later, other_host):
        assert _read_back(result) == _expected(result)
    assert (
        _read_back(later)["summary"]["verified_at"] != _read_back(first)["summary"]["verified_at"]
    )


def test_another_boots_events_never_stand_in() -> None:
    golden = _attest(SoftHost())
    changed = _attest(SoftHost(boot=Boot(shim=b"shimx64.efi 15.9", grub_commands=3)))
    assert golden.summary is not None
    assert changed.summary is not None
    assert golden.summary.events != changed.summary.events
    for result in (golden, changed, golden):
        assert _read_back(result) == _expected(result)


def test_descriptions_with_quotes_and_non_ascii_stay_valid_json() -> None:
    """A summary stored as records (loaded from an older record) is encoded too."""
    result = _attest(SoftHost())
    assert result.summary is not None
    odd = tuple(
        e._replace(data=b"", text='a "quoted" \\ path \u00e9\u2603 }null}')
        for e in result.summary.events
    )
    tricky = replace(result, summary=result.summary.replace(events=odd))
    assert _read_back(tricky) == _expected(tricky)
    assert "event_log" not in _read_back(tricky)["summary"]


def test_the_attestation_path_describes_no_event() -> None:
    """The HGS stores the log: no event record is made or described to write a record.

    What a first attestation after a reboot costs the HGS: the verifier reads
    PCR 9's events (the CI policy), and the record carries the log's base64url.
    """
    host = SoftHost(boot=Boot(grub_commands=7))
    result = _attest(host)
    assert result.summary is not None
    summary = result.summary
    before = _describe.cache_info()
    record = _read_back(result)
    assert _describe.cache_info() == before
    assert summary.source is not None
    assert summary.source._events is None  # the records were never made
    assert b64url_decode(record["summary"]["event_log"], what="log") == host.evidence().event_log


def test_a_result_json_made_once_gives_the_same_record() -> None:
    result = _attest(SoftHost())
    made_once = json_text(result.to_dict())
    assert encode_last_record(result, made_once) == encode_last_record(result)


def _outcomes(result: AttestationResult) -> list[AttestOutcome]:
    text = json_text(result.to_dict())
    activation = {"activation_id": "a-1", "credential_blob": 'x\u00e9"}', "secret": "y"}
    return [
        AttestOutcome(result, text, "header.payload.signature", 1_800_000_000),
        AttestOutcome(result, text),
        AttestOutcome(result, text, activation=activation),
    ]


def test_the_answer_body_is_what_json_response_sends_for_the_outcome() -> None:
    """The HGS splices the result's JSON (made once) into its answer: same bytes as before."""
    passed, refused = _attest(SoftHost()), _attest(SoftHost(boot=Boot(secure_boot=b"\x00")))
    assert passed.passed
    assert not refused.passed
    for result in (passed, refused):
        for outcome in _outcomes(result):
            assert outcome.body() == JSONResponse(outcome.to_dict()).body
            assert json.loads(outcome.body()) == outcome.to_dict()


def test_the_answer_carries_the_result_it_was_made_with() -> None:
    """The body comes from ``result_json``: a stale text would show (the HGS passes its own)."""
    first = _attest(SoftHost())
    later = _attest(SoftHost(), NOW + datetime.timedelta(hours=1))
    stale = AttestOutcome(later, json_text(first.to_dict()))
    assert json.loads(stale.body())["verified_at"] == first.to_dict()["verified_at"]
    assert json.loads(stale.body())["verified_at"] != later.to_dict()["verified_at"]


# ------------------------------------------------------------- the split record


def test_the_record_names_its_boot_and_holds_none_of_it() -> None:
    host = SoftHost(boot=Boot(grub_commands=40))
    result = _attest(host)
    last, boot = encode_last_record(result)
    assert boot is not None
    summary = json.loads(last)["summary"]
    assert "event_log" not in summary
    assert "events" not in summary
    stored = json.loads(boot.value)
    assert summary["events_sha256"] == boot.events_sha256 == stored["events_sha256"]
    events_json = json_text(stored["events"]).encode()
    assert hashlib.sha256(events_json).hexdigest() == boot.events_sha256
    inline = json_text(_expected(result)).encode()
    assert stored["events"]["event_log"].encode() not in last
    assert len(inline) - len(events_json) < len(last) < len(inline) - len(events_json) + 100


def test_a_host_key_record_names_no_boot() -> None:
    result = replace(_attest(SoftHost()), summary=None)
    last, boot = encode_last_record(result)
    assert boot is None
    assert json.loads(last) == _expected(result)


def _store_with(result: AttestationResult, *, inline: bool = False) -> MemoryStore:
    assert result.host_id is not None
    store = MemoryStore()
    if inline:  # as the previous version wrote it: the events in the record
        store.put(reg.LAST + result.host_id, json_text(_expected(result)).encode())
    else:
        last, boot = encode_last_record(result)
        assert boot is not None
        store.put(reg.LAST + result.host_id, last)
        store.put(reg.BOOT + result.host_id, boot.value)
    return store


def test_a_record_written_before_the_split_is_read_as_it_is() -> None:
    result = _attest(SoftHost())
    found = read_last_record(_store_with(result, inline=True), "host-a")
    assert found == _expected(result)
    assert found is not None
    assert HostSummary.from_dict(found["summary"]) == result.summary


def test_a_record_whose_boot_is_missing_names_the_host() -> None:
    store = _store_with(_attest(SoftHost()))
    store.delete(reg.BOOT + "host-a")
    with pytest.raises(UnresolvedBootError, match=r"host 'host-a'.*absent"):
        read_last_record(store, "host-a")


def test_a_record_whose_boot_was_replaced_by_hand_is_refused() -> None:
    """Another boot under the key (an old backup's, or another host's) is never used."""
    store = _store_with(_attest(SoftHost()))
    _last, other = encode_last_record(_attest(SoftHost(boot=Boot(db=b"db: other CA"))))
    assert other is not None
    store.put(reg.BOOT + "host-a", other.value)
    with pytest.raises(UnresolvedBootError, match=r"host 'host-a'.*another boot"):
        read_last_record(store, "host-a")


@pytest.mark.parametrize(
    "edit",
    [
        lambda v: v.replace(b'"event_log":"', b'"event_log":"AAAA'),  # events changed, digest kept
        lambda v: v.replace(b'{"event_log"', b'{"pcrs":{},"event_log"'),  # a member smuggled in
        lambda v: v[:-1],  # not JSON
        lambda v: b'{"events_sha256":"00"}',  # no events
    ],
)
def test_a_tampered_boot_is_refused(edit: Any) -> None:
    store = _store_with(_attest(SoftHost()))
    boot = store.get(reg.BOOT + "host-a")
    assert boot is not None
    store.put(reg.BOOT + "host-a", edit(boot.value))
    with pytest.raises(UnresolvedBootError, match="host 'host-a'"):
        read_last_record(store, "host-a")


class _RebootBetweenReads(MemoryStore):
    """A store where the host attests a new boot right after a reader read its record."""

    def __init__(self, next_record: tuple[bytes, bytes]) -> None:
        super().__init__()
        self.next_record: tuple[bytes, bytes] | None = next_record

    def get(self, key: str) -> Entry | None:
        if key.startswith(reg.BOOT) and self.next_record is not None:
            last, boot = self.next_record
            self.next_record = None
            host = key.removeprefix(reg.BOOT)
            self.transaction(puts=[(reg.LAST + host, last, None), (key, boot, None)])
        return super().get(key)


def test_a_reader_racing_a_new_boot_reads_the_new_record_whole() -> None:
    first, rebooted = _attest(SoftHost()), _attest(SoftHost(boot=UPDATED))
    last, boot = encode_last_record(rebooted)
    assert boot is not None
    store = _RebootBetweenReads((last, boot.value))
    old_last, old_boot = encode_last_record(first)
    assert old_boot is not None
    store.put(reg.LAST + "host-a", old_last)
    store.put(reg.BOOT + "host-a", old_boot.value)
    assert read_last_record(store, "host-a") == _expected(rebooted)
    assert store.next_record is None  # the race did happen


def test_a_record_that_is_not_an_object_is_named() -> None:
    store = MemoryStore()
    store.put(reg.LAST + "host-a", b"[1, 2]")
    with pytest.raises(FormatError, match="hosts/last/host-a"):
        read_last_record(store, "host-a")
