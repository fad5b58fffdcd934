"""hosts/last/<host>: the spliced encoding decodes to exactly what the readers expect.

The record's events member (the verified boot log) is JSON kept per events
source (one per distinct boot log and quote selection) and spliced into each
new record; these tests show the bytes decode to ``{"result":
result.to_dict(), "summary": summary.to_dict()}``, that what changes per
attestation (time, PCRs, facts, the host) is never served stale, and that
another boot's events never stand in for this one's.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import replace

from fastapi.responses import JSONResponse

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.summary import HostSummary, _describe
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.formats.encoding import b64url_decode
from guardfab.hgs.attest import AttestOutcome
from guardfab.hgs.last_record import encode_last_record, json_text
from test_attestation_fixtures import NONCE, NOW, Boot, SoftHost, trust_for


def _expected(result: AttestationResult) -> dict[str, object]:
    summary = None if result.summary is None else result.summary.to_dict()
    return {"result": result.to_dict(), "summary": summary}


def _attest(host: SoftHost, now: datetime.datetime = NOW) -> AttestationResult:
    return verify_tpm_evidence(host.evidence(), trust_for(host), nonce=NONCE, now=now)


def test_a_tpm_record_decodes_to_the_result_and_summary() -> None:
    result = _attest(SoftHost())
    assert result.summary is not None
    for _ in range(2):  # the second time, the events come from the cache
        record = json.loads(encode_last_record(result))
        assert record == _expected(result)
        assert HostSummary.from_dict(record["summary"]) == result.summary


def test_a_record_without_summary_has_null() -> None:
    result = replace(_attest(SoftHost()), summary=None)
    assert json.loads(encode_last_record(result)) == _expected(result)


def test_per_attestation_fields_are_encoded_afresh() -> None:
    host = SoftHost()
    first = _attest(host)
    later = _attest(host, NOW + datetime.timedelta(hours=1))
    assert later.summary is not None
    other_host = replace(later, summary=later.summary.replace(host_id="host-z"))
    for result in (first, later, other_host):
        assert json.loads(encode_last_record(result)) == _expected(result)
    assert (
        json.loads(encode_last_record(later))["summary"]["verified_at"]
        != json.loads(encode_last_record(first))["summary"]["verified_at"]
    )


def test_another_boots_events_never_stand_in() -> None:
    golden = _attest(SoftHost())
    changed = _attest(SoftHost(boot=Boot(shim=b"shimx64.efi 15.9", grub_commands=3)))
    assert golden.summary is not None
    assert changed.summary is not None
    assert golden.summary.events != changed.summary.events
    for result in (golden, changed, golden):
        assert json.loads(encode_last_record(result)) == _expected(result)


def test_descriptions_with_quotes_and_non_ascii_stay_valid_json() -> None:
    """A summary stored as records (loaded from an older record) is encoded too."""
    result = _attest(SoftHost())
    assert result.summary is not None
    odd = tuple(
        e._replace(data=b"", text='a "quoted" \\ path \u00e9\u2603 }null}')
        for e in result.summary.events
    )
    tricky = replace(result, summary=result.summary.replace(events=odd))
    assert json.loads(encode_last_record(tricky)) == _expected(tricky)
    assert "event_log" not in json.loads(encode_last_record(tricky))["summary"]


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
    record = json.loads(encode_last_record(result))
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
