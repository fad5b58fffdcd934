"""The log caches save work, never a check.

A host sends the same boot log on every attestation, so its decoding is kept by
its exact base64url text, and its parse, SHA-256 replay, facts and quoted
events with that decoding (the bytes are a pure function of the text). These
tests attack the caches: the quote must still match the cached replay, a log
seen before with a quote that does not match it is still refused, the trust's
required PCRs are still applied, a copy of loaded evidence with another log
(or evidence whose bytes are not the loader's) is judged on its own log, a
string or bytes subclass that claims to equal a cached log is not served from
the cache, and a refused log or text is never kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import MappingProxyType

import pytest

from guardfab.attestation import evidence as evidence_module
from guardfab.attestation import tpm_mode
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import TpmEvidence, evidence_from_dict
from guardfab.attestation.result import AttestationStatus
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_encode
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
    tpm_mode.forget_logs()
    yield
    tpm_mode.forget_logs()


def _loaded(evidence: TpmEvidence | None = None) -> TpmEvidence:
    """Evidence as the HGS gets it: loaded from JSON, with a new copy of the log text."""
    body = (evidence or HOST.evidence()).to_dict()
    loaded = evidence_from_dict({**body, "event_log": "".join(body["event_log"])})
    assert isinstance(loaded, TpmEvidence)
    return loaded


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
        result = verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW)
        assert result.status is S.PASSED, result.explain()
    assert len(calls) == 1


def test_evidence_built_without_the_loader_is_parsed_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing links hand-built evidence to a decoded text: its log is parsed, and passes."""
    calls = _parses(monkeypatch)
    trust = trust_for(HOST)
    for _ in range(2):
        assert verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW).passed
    assert len(calls) == 2


def test_a_cached_log_with_a_quote_it_does_not_replay_to_is_refused() -> None:
    trust = trust_for(HOST)
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).status is S.PASSED
    pcrs = {**HOST.boot.pcrs(), 7: b"\x07" * 32}  # the quote says something else booted
    attest = make_quote(quote_qualifying_data(NONCE, host_key_jwk()), pcrs)
    evidence = replace(
        HOST.evidence(), pcrs=pcrs, quote_attest=attest, quote_signature=soft_sign(HOST.ak, attest)
    )
    result = verify_tpm_evidence(_loaded(evidence), trust, nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE
    assert "PCR 7" in result.failures[0].reason


def test_another_hosts_cached_log_does_not_pass_for_this_quote() -> None:
    """A golden log cached from one host, sent by a host whose quote says secure boot is off."""
    golden = SoftHost("host-b", index=1)
    assert verify_tpm_evidence(
        _loaded(golden.evidence()), trust_for(golden), nonce=NONCE, now=NOW
    ).passed
    off = SoftHost(boot=Boot(secure_boot=b"\x00"))
    evidence = _loaded(replace(off.evidence(), event_log=Boot().log_bytes()))
    result = verify_tpm_evidence(evidence, trust_for(off), nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE


def test_a_log_that_does_not_parse_is_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _parses(monkeypatch)
    cut = replace(HOST.evidence(), event_log=HOST.boot.log_bytes()[:-7])
    for _ in range(2):
        evidence = _loaded(cut)
        result = verify_tpm_evidence(evidence, trust_for(HOST), nonce=NONCE, now=NOW)
        assert result.status is S.INVALID_EVIDENCE
        assert evidence.decoded is not None
        assert evidence.decoded.derived is None  # the text stays decoded, nothing parsed is kept
    assert len(calls) == 2


def test_the_cache_is_bounded_and_skips_large_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _parses(monkeypatch)
    one_log = functools.lru_cache(maxsize=1)(evidence_module._decoded_log.__wrapped__)
    monkeypatch.setattr(evidence_module, "_decoded_log", one_log)
    trust = trust_for(HOST)
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed
    other = SoftHost(boot=Boot(debug=True))
    verify_tpm_evidence(_loaded(other.evidence()), trust_for(other), nonce=NONCE, now=NOW)
    assert one_log.cache_info().currsize == 1
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed  # evicted: again
    assert len(calls) == 3
    monkeypatch.setattr(evidence_module, "LOG_TEXT_CACHE_MAX_CHARS", 10)
    one_log.cache_clear()
    for _ in range(2):
        assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed
    assert one_log.cache_info().currsize == 0
    assert len(calls) == 5


def test_bytes_that_are_not_the_loaders_are_parsed_for_what_they_are() -> None:
    """Loaded evidence whose log was swapped under its decoded entry is judged on its own log.

    (A frozen dataclass cannot be changed by honest code; the identity check is
    what ties the entry's parse to exactly the bytes being verified.)
    """
    trust = trust_for(HOST)
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed
    evidence = _loaded()
    assert evidence.decoded is not None
    assert evidence.decoded.derived is not None  # the golden log's parse is at hand
    object.__setattr__(evidence, "event_log", Boot(boot_order=b"\x02\x00").log_bytes())
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert [f.check for f in result.failures] == ["event-log-replay"]


def test_a_host_key_swapped_in_loaded_evidence_is_refused() -> None:
    """The loader's host-key digest (kept with the key's check) binds only its own key."""
    trust = trust_for(HOST)
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed
    copied = replace(_loaded(), host_key=host_key_jwk(9))
    swapped = _loaded()
    object.__setattr__(swapped, "host_key", MappingProxyType(host_key_jwk(9)))
    for evidence in (copied, swapped):
        result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
        assert [f.check for f in result.failures] == ["quote-nonce"]


def test_facts_handed_out_are_copies() -> None:
    trust = trust_for(HOST)
    first = verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW)
    second = verify_tpm_evidence(
        _loaded(HOST.evidence(restart_count=3)), trust, nonce=NONCE, now=NOW
    )
    assert first.summary is not None
    assert second.summary is not None
    assert first.summary.facts is not second.summary.facts
    assert first.summary.facts["resumed"].value is False
    assert second.summary.facts["resumed"].value is True
    assert "restartCount = 3" in second.summary.facts["resumed"].note
    # The CI digests are kept per log, but each result gets a list of its own.
    shown = first.summary.facts["ci_policy"].value
    assert shown == [e.digest.hex() for e in first.summary.events_in(9)] != []
    shown.append("00" * 32)
    third = verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW)
    assert third.summary is not None
    assert third.summary.facts["ci_policy"].value == shown[:-1]
    assert third.summary.facts["ci_policy"].events == first.summary.facts["ci_policy"].events


# ------------------------------------------------------- the decoded-text cache


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the event-log texts decoded from now on (the text cache starts empty)."""
    evidence_module.forget_decoded_logs()
    calls: list[str] = []
    original = evidence_module.b64url_decode

    def counting(text: str, *, what: str) -> bytes:
        if "event_log" in what:
            calls.append(text)
        return original(text, what=what)

    monkeypatch.setattr(evidence_module, "b64url_decode", counting)
    yield calls
    evidence_module.forget_decoded_logs()


def test_a_repeated_log_text_is_decoded_once_and_still_checked(decodes: list[str]) -> None:
    body = HOST.evidence().to_dict()
    trust = trust_for(HOST)
    logs = []
    for _ in range(3):
        evidence = evidence_from_dict({**body, "event_log": "".join(body["event_log"])})
        assert evidence.event_log == HOST.boot.log_bytes()
        assert verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW).passed
        logs.append(evidence.event_log)
    assert len(decodes) == 1
    assert logs[0] is logs[1] is logs[2]  # one bytes object: the parsed-log lookup is cheap
    # Another text (another boot) is decoded, and refused: it does not replay to the quote.
    other = {**body, "event_log": b64url_encode(Boot(boot_order=b"\x02\x00").log_bytes())}
    result = verify_tpm_evidence(evidence_from_dict(other), trust, nonce=NONCE, now=NOW)
    assert len(decodes) == 2
    assert [f.check for f in result.failures] == ["event-log-replay"]


def test_a_replaced_log_is_judged_on_its_own_bytes(decodes: list[str]) -> None:
    """A copy of loaded evidence with another log is parsed from that log, not the loaded one."""
    trust = trust_for(HOST)
    loaded = evidence_from_dict(HOST.evidence().to_dict())
    assert verify_tpm_evidence(loaded, trust, nonce=NONCE, now=NOW).passed
    swapped = replace(loaded, event_log=Boot(boot_order=b"\x02\x00").log_bytes())
    result = verify_tpm_evidence(swapped, trust, nonce=NONCE, now=NOW)
    assert [f.check for f in result.failures] == ["event-log-replay"]


class _ClaimsEqualBytes(bytes):
    """Bytes that say they equal any log and hash like the golden one."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(HOST.boot.log_bytes())


class _ClaimsEqualText(str):
    """A text that says it equals any text and hashes like the golden log's."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(b64url_encode(HOST.boot.log_bytes()))


def test_bytes_claiming_to_be_a_cached_log_are_parsed_for_what_they_are() -> None:
    trust = trust_for(HOST)
    assert verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW).passed
    edited = _ClaimsEqualBytes(Boot(boot_order=b"\x02\x00").log_bytes())
    copied = replace(_loaded(), event_log=edited)
    assert copied.decoded is None  # a copy does not carry the loaded log's entry
    result = verify_tpm_evidence(copied, trust, nonce=NONCE, now=NOW)
    assert [f.check for f in result.failures] == ["event-log-replay"]
    swapped = _loaded()
    object.__setattr__(swapped, "event_log", edited)  # under the golden log's entry
    result = verify_tpm_evidence(swapped, trust, nonce=NONCE, now=NOW)
    assert [f.check for f in result.failures] == ["event-log-replay"]


def test_text_claiming_to_be_a_cached_log_is_decoded_for_what_it_is(decodes: list[str]) -> None:
    body = HOST.evidence().to_dict()
    trust = trust_for(HOST)
    assert verify_tpm_evidence(evidence_from_dict(body), trust, nonce=NONCE, now=NOW).passed
    edited = _ClaimsEqualText(b64url_encode(Boot(boot_order=b"\x02\x00").log_bytes()))
    evidence = evidence_from_dict({**body, "event_log": edited})
    assert evidence.event_log == Boot(boot_order=b"\x02\x00").log_bytes()
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert [f.check for f in result.failures] == ["event-log-replay"]
    assert len(decodes) == 2


def _cut(text: str) -> str:
    return text[: 4 * (len(text) // 4 - 1) + 1]


@pytest.mark.parametrize(
    "spoil",
    [lambda t: t + "=", lambda t: "+" + t[1:], lambda t: t[:-4] + "é" + t[-3:], _cut],
    ids=["padding", "standard alphabet", "non-ASCII", "cut to a length no base64 has"],
)
def test_a_bad_log_text_is_refused_every_time_and_never_kept(
    decodes: list[str], spoil: Callable[[str], str]
) -> None:
    body = HOST.evidence().to_dict()
    body["event_log"] = spoil(body["event_log"])
    for _ in range(2):
        with pytest.raises(FormatError, match="event_log"):
            evidence_from_dict(body)
    assert evidence_module._decoded_log.cache_info().currsize == 0


def test_quoted_events_follow_each_quotes_selection() -> None:
    """The cached log keeps events per selection: a narrower quote gets only its PCRs."""
    trust = trust_for(HOST)
    wide = verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW)
    narrow = verify_tpm_evidence(
        _loaded(HOST.evidence(quoted=range(8))), trust, nonce=NONCE, now=NOW
    )
    assert wide.summary is not None
    assert narrow.summary is not None
    assert {e.pcr for e in wide.summary.events} == {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
    assert {e.pcr for e in narrow.summary.events} == set(range(8))
    assert narrow.summary.events_in(9) == ()
    assert narrow.summary.facts["ci_policy"].value is None
    assert "Hgs_CiPolicy" in narrow.failed_policies
    assert wide.passed


def test_a_narrow_quote_first_does_not_empty_a_wide_ones_ci_fact() -> None:
    """The CI fact's digests are kept per log and PCR: a quote that leaves PCR 9 out,
    checked first, must not leave an empty list for the next quote that covers it."""
    trust = trust_for(HOST)
    narrow = verify_tpm_evidence(
        _loaded(HOST.evidence(quoted=range(8))), trust, nonce=NONCE, now=NOW
    )
    wide = verify_tpm_evidence(_loaded(), trust, nonce=NONCE, now=NOW)
    assert narrow.summary is not None
    assert wide.summary is not None
    assert narrow.summary.facts["ci_policy"].value is None
    digests = [e.digest.hex() for e in wide.summary.events_in(9)]
    assert wide.summary.facts["ci_policy"].value == digests != []
    assert wide.passed
    # The same, asked of the parsed log directly: nothing is kept for a PCR left out.
    loaded = _loaded()
    verify_tpm_evidence(loaded, trust, nonce=NONCE, now=NOW)
    assert loaded.decoded is not None
    parsed = loaded.decoded.derived
    assert isinstance(parsed, tpm_mode._ParsedLog)
    parsed._measured.clear()
    assert parsed.measured_in(parsed.quoted(range(8)), 9) == ((), ())
    assert parsed.measured_in(parsed.quoted(range(10)), 9)[0] == tuple(digests)


def test_forget_logs_makes_the_next_check_decode_and_parse_again(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parses = _parses(monkeypatch)
    body, trust = HOST.evidence().to_dict(), trust_for(HOST)
    for _ in range(2):
        assert verify_tpm_evidence(evidence_from_dict(body), trust, nonce=NONCE, now=NOW).passed
        tpm_mode.forget_logs()
    assert (len(decodes), len(parses)) == (2, 2)
