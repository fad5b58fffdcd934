"""The parsed-log cache saves work, never a check.

A host sends the same boot log on every attestation, so its parse, SHA-256
replay and facts are kept by the log's SHA-256. These tests attack the cache:
the quote must still match the cached replay, a log seen before with a quote
that does not match it is still refused, the trust's required PCRs are still
applied, and a refused log is never kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from guardfab.attestation import tpm_mode
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from test_attestation_fixtures import (
    NONCE,
    NOW,
    Boot,
    SoftHost,
    host_key_jwk,
    make_quote,
    trust_for,
)
from test_tpm_quote import soft_sign

S = AttestationStatus
HOST = SoftHost()


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    tpm_mode._PARSED.clear()
    yield
    tpm_mode._PARSED.clear()


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the logs parsed from now on."""
    calls: list[int] = []
    original = tpm_mode.parse_event_log

    def counting(data: bytes) -> object:
        calls.append(len(data))
        return original(data)

    monkeypatch.setattr(tpm_mode, "parse_event_log", counting)
    return calls


def test_a_repeated_log_is_parsed_once_and_still_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _parses(monkeypatch)
    trust = trust_for(HOST)
    for _ in range(3):
        result = verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW)
        assert result.status is S.PASSED, result.explain()
    assert len(calls) == 1


def test_a_cached_log_with_a_quote_it_does_not_replay_to_is_refused() -> None:
    trust = trust_for(HOST)
    assert verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW).status is S.PASSED
    pcrs = {**HOST.boot.pcrs(), 7: b"\x07" * 32}  # the quote says something else booted
    attest = make_quote(quote_qualifying_data(NONCE, host_key_jwk()), pcrs)
    evidence = replace(
        HOST.evidence(), pcrs=pcrs, quote_attest=attest, quote_signature=soft_sign(HOST.ak, attest)
    )
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE
    assert "PCR 7" in result.failures[0].reason


def test_another_hosts_cached_log_does_not_pass_for_this_quote() -> None:
    """A golden log cached from one host, sent by a host whose quote says secure boot is off."""
    golden = SoftHost("host-b", index=1)
    assert verify_tpm_evidence(golden.evidence(), trust_for(golden), nonce=NONCE, now=NOW).passed
    off = SoftHost(boot=Boot(secure_boot=b"\x00"))
    evidence = replace(off.evidence(), event_log=Boot().log_bytes())
    result = verify_tpm_evidence(evidence, trust_for(off), nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE


def test_a_log_that_does_not_parse_is_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _parses(monkeypatch)
    evidence = replace(HOST.evidence(), event_log=HOST.boot.log_bytes()[:-7])
    for _ in range(2):
        result = verify_tpm_evidence(evidence, trust_for(HOST), nonce=NONCE, now=NOW)
        assert result.status is S.INVALID_EVIDENCE
    assert len(calls) == 2
    assert not tpm_mode._PARSED._items


def test_the_cache_is_bounded_and_skips_large_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tpm_mode, "_PARSED", tpm_mode.VerifiedCache(1))
    trust = trust_for(HOST)
    verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW)
    other = SoftHost(boot=Boot(debug=True))
    verify_tpm_evidence(other.evidence(), trust_for(other), nonce=NONCE, now=NOW)
    assert len(tpm_mode._PARSED._items) == 1
    monkeypatch.setattr(tpm_mode, "LOG_CACHE_MAX_BYTES", 10)
    tpm_mode._PARSED.clear()
    assert verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW).passed
    assert not tpm_mode._PARSED._items


def test_facts_handed_out_are_copies() -> None:
    trust = trust_for(HOST)
    first = verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW)
    second = verify_tpm_evidence(HOST.evidence(restart_count=3), trust, nonce=NONCE, now=NOW)
    assert first.summary is not None
    assert second.summary is not None
    assert first.summary.facts is not second.summary.facts
    assert first.summary.facts["resumed"].value is False
    assert second.summary.facts["resumed"].value is True
