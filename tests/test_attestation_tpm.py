"""TPM-mode attestation: the attack table, first contact, EK certificates, real logs.

Each row of the attack tables changes one thing about honest evidence (or the
trust state) and names the check or policy that must refuse it. The honest
evidence passes (test_attestation_fixtures), so a row fails the moment its
check is removed or weakened: the status or the named check would change.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import pytest

from guardfab.attestation.activation import (
    ActivationError,
    activation_challenge,
    binding_for,
    check_activation_response,
)
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import TpmEvidence
from guardfab.attestation.policies import POLICIES
from guardfab.attestation.result import AttestationResult, AttestationStatus, VerdictState
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.attestation.trust import (
    AkBinding,
    AttestationMode,
    PolicyState,
    TrustState,
)
from guardfab.tpm.constants import TpmaObject
from guardfab.tpm.quote import AttestationKeyError
from guardfab.tpm.structures import marshal_public2b
from test_attestation_fixtures import (
    NONCE,
    NOW,
    Boot,
    SoftHost,
    ek_certificate,
    host_key_jwk,
    make_ca,
    make_quote,
    trust_for,
)
from test_eventlog_builder import EFI_GLOBAL, variable
from test_tpm_credential import ActivationFailed, activate_credential
from test_tpm_quote import AK_ATTRIBUTES, soft_ak, soft_sign

S = AttestationStatus
HOST = SoftHost()
OTHER = SoftHost("host-b", index=1)


@dataclass(frozen=True)
class Case:
    """What the verifier is given: evidence, trust state and the nonce it issued."""

    evidence: TpmEvidence
    trust: TrustState
    nonce: bytes = NONCE

    def run(self) -> AttestationResult:
        return verify_tpm_evidence(self.evidence, self.trust, nonce=self.nonce, now=NOW)


def honest(**trust_changes: object) -> Case:
    return Case(HOST.evidence(), trust_for(HOST, **trust_changes))


def _flip(data: bytes, needle: bytes) -> bytes:
    """Flip one bit in the first occurrence of ``needle`` (which must be there)."""
    at = data.index(needle) + len(needle) // 2
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def _unrestricted_ak_case() -> Case:
    """A host signs a made-up quote with an ordinary key it calls its AK."""
    forger = soft_ak("ecc", attributes=AK_ATTRIBUTES & ~TpmaObject.RESTRICTED, index=7)
    evidence = HOST.evidence(signer=forger)
    evidence = replace(evidence, ak_public=marshal_public2b(forger.public))
    return Case(evidence, trust_for(HOST))


def _other_tpm_with_this_ek() -> Case:
    """Another TPM quotes with its own (activated) AK and claims this host's EK."""
    evidence = OTHER.evidence()
    evidence = replace(evidence, ek_public=marshal_public2b(HOST.ek.public))
    return Case(evidence, trust_for(HOST, ak_bindings=(HOST.binding(), OTHER.binding())))


def _edited_log_digest() -> Case:
    """One event digest (the shim image) rewritten in the log after the quote."""
    shim = hashlib.sha256(b"PE image of shimx64.efi 15.8").digest()
    evidence = HOST.evidence()
    return Case(replace(evidence, event_log=_flip(evidence.event_log, shim)), trust_for(HOST))


def _truncated_log() -> Case:
    """The last event (the initrd measurement) cut off after the quote."""
    evidence = HOST.evidence()
    cut = evidence.event_log.rindex(b"/boot/initrd.img-6.12\0")
    record_start = evidence.event_log.rindex(b"\x09\x00\x00\x00\x0d\x00\x00\x00", 0, cut)
    return Case(replace(evidence, event_log=evidence.event_log[:record_start]), trust_for(HOST))


def _untrusted_vendor() -> Case:
    """An unregistered TPM whose EK certificate a rogue CA issued."""
    cert = ek_certificate(HOST, make_ca("Rogue TPM CA"))
    trust = trust_for(
        HOST,
        tpm_hosts=(),
        admit_certified_eks=True,
        ek_roots=(make_ca("Infineon TPM Root").cert,),
    )
    return Case(HOST.evidence(ek_certificate=cert), trust)


def _pcr_changed(evidence: TpmEvidence, pcr: int) -> TpmEvidence:
    return replace(evidence, pcrs={**evidence.pcrs, pcr: bytes(32)})


#: A JWK the loader refuses (not EC or RSA): only ``require_mode`` stops it in evidence
#: built otherwise.
_OCT_KEY = {"kty": "oct", "k": "AAAA"}


def _loaded(evidence: TpmEvidence) -> TpmEvidence:
    loaded = TpmEvidence.from_dict(evidence.to_dict())
    assert loaded.key_checked()
    return loaded


def _quote_for(evidence: TpmEvidence) -> dict[str, Any]:
    """The host key and the quote bound to it (what an attacker swaps in together)."""
    return {
        "host_key": evidence.host_key,
        "quote_attest": evidence.quote_attest,
        "quote_signature": evidence.quote_signature,
    }


def _loaded_with_key_of(evidence: TpmEvidence) -> TpmEvidence:
    """Honest loaded evidence whose host key and quote were then set to ``evidence``'s.

    The loader checked the key it loaded, not this one: the verifier must check
    this one again (the quote, bound to it, would pass the nonce check).
    """
    loaded = _loaded(HOST.evidence())
    for name, value in _quote_for(evidence).items():
        object.__setattr__(
            loaded, name, MappingProxyType(dict(value)) if name == "host_key" else value
        )
    assert not loaded.key_checked()
    return loaded


Attack = tuple[str, Callable[[], Case], AttestationStatus, str]

ATTACKS: list[Attack] = [
    (
        "replayed quote (bound to an earlier nonce)",
        lambda: Case(HOST.evidence(b"an earlier nonce"), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "quote-nonce",
    ),
    (
        "host key swapped after the quote",
        lambda: Case(replace(HOST.evidence(), host_key=host_key_jwk(9)), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "quote-nonce",
    ),
    (
        "quote signed by another TPM's AK",
        lambda: Case(HOST.evidence(signer=OTHER.ak), trust_for(HOST)),
        S.TPM_ERROR,
        "quote-signature",
    ),
    (
        "another TPM presents this host's EK with its own AK",
        _other_tpm_with_this_ek,
        S.UNAUTHORIZED_HOST,
        "ak-binding",
    ),
    (
        "AK bound to another EK",
        lambda: honest(ak_bindings=(AkBinding(HOST.ak_name, OTHER.ek_digest, "host-b"),)),
        S.UNAUTHORIZED_HOST,
        "ak-binding",
    ),
    ("AK never activated", lambda: honest(ak_bindings=()), S.ACTIVATION_REQUIRED, "activation"),
    ("AK is not a restricted key", _unrestricted_ak_case, S.TPM_ERROR, "ak-attributes"),
    ("EK not registered", lambda: honest(tpm_hosts=()), S.UNAUTHORIZED_HOST, "identity"),
    (
        "EK certificate from an untrusted CA",
        _untrusted_vendor,
        S.UNAUTHORIZED_HOST,
        "ek-certificate",
    ),
    (
        "EK certificate for another key",
        lambda: Case(
            HOST.evidence(ek_certificate=ek_certificate(OTHER, make_ca("Infineon TPM Root"))),
            trust_for(HOST),
        ),
        S.INVALID_EVIDENCE,
        "ek-certificate",
    ),
    (
        "revoked host",
        lambda: honest(revoked_hosts=frozenset({"host-a"})),
        S.UNAUTHORIZED_HOST,
        "revocation",
    ),
    (
        "reported PCRs differ from the quoted digest",
        lambda: Case(_pcr_changed(HOST.evidence(), 4), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "quote-pcr-digest",
    ),
    (
        "quote omits a required PCR",
        lambda: Case(HOST.evidence(quoted=range(7)), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "quote-pcr-selection",
    ),
    (
        "PCRs do not match the log (log of another boot)",
        lambda: Case(
            replace(HOST.evidence(), event_log=Boot(db=b"db: other").log_bytes()), trust_for(HOST)
        ),
        S.INVALID_EVIDENCE,
        "event-log-replay",
    ),
    (
        "log digest edited after the quote",
        _edited_log_digest,
        S.INVALID_EVIDENCE,
        "event-log-replay",
    ),
    ("log truncated after the quote", _truncated_log, S.INVALID_EVIDENCE, "event-log-replay"),
    (
        "log is not a TCG log",
        lambda: Case(replace(HOST.evidence(), event_log=b"\x01" * 40), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "event-log-format",
    ),
    (
        "host key not a usable public key (evidence built without the loader)",
        lambda: Case(
            replace(HOST.evidence(), host_key={"kty": "oct", "k": "AAAA"}), trust_for(HOST)
        ),
        S.INVALID_EVIDENCE,
        "host-encryption-key",
    ),
    (
        "unusable host key set into loaded evidence, quote bound to it",
        lambda: Case(_loaded_with_key_of(HOST.evidence(host_key=_OCT_KEY)), trust_for(HOST)),
        S.INVALID_EVIDENCE,
        "host-encryption-key",
    ),
    (
        "copy of loaded evidence with an unusable host key, quote bound to it",
        lambda: Case(
            replace(_loaded(HOST.evidence()), **_quote_for(HOST.evidence(host_key=_OCT_KEY))),
            trust_for(HOST),
        ),
        S.INVALID_EVIDENCE,
        "host-encryption-key",
    ),
    (
        "TPM mode not active",
        lambda: honest(modes=frozenset({AttestationMode.HOST_KEY})),
        S.MODE_NOT_ACTIVE,
        "mode",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "check"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_is_refused_by_its_check(
    make: Callable[[], Case], status: AttestationStatus, check: str
) -> None:
    result = make().run()
    assert result.status is status, result.explain()
    assert [f.check for f in result.failures] == [check]
    assert not result.passed
    # Every policy still has a verdict, and none was evaluated from unverified evidence.
    assert [v.policy for v in result.verdicts] == [p.name for p in POLICIES]
    assert all(
        v.state in (VerdictState.NOT_EVALUABLE, VerdictState.DISABLED) for v in result.verdicts
    )
    assert result.summary is None
    assert result.to_dict()["facts"] == {}
    assert check in result.explain()


# ------------------------------------------------------------------ policy attacks


def _edited_secure_boot_data() -> Case:
    """SecureBoot=0 measured; the host rewrites the variable's data to 1 (digest kept)."""
    host = SoftHost(boot=Boot(secure_boot=b"\x00"))
    evidence = host.evidence()
    off = variable(EFI_GLOBAL, "SecureBoot", b"\x00")
    on = variable(EFI_GLOBAL, "SecureBoot", b"\x01")
    assert evidence.event_log.count(off) == 1
    return Case(replace(evidence, event_log=evidence.event_log.replace(off, on)), trust_for(host))


def _booted(boot: Boot, **trust_changes: object) -> Callable[[], Case]:
    host = SoftHost(boot=boot)
    return lambda: Case(host.evidence(), trust_for(host, **trust_changes))


PolicyAttack = tuple[str, Callable[[], Case], str, VerdictState]

POLICY_ATTACKS: list[PolicyAttack] = [
    (
        "secure boot off",
        _booted(Boot(secure_boot=b"\x00")),
        "Hgs_SecureBootEnabled",
        VerdictState.FAILED,
    ),
    (
        "secure boot variable data rewritten to 'on'",
        _edited_secure_boot_data,
        "Hgs_SecureBootEnabled",
        VerdictState.NOT_EVALUABLE,
    ),
    ("UEFI debug mode on", _booted(Boot(debug=True)), "Hgs_UefiDebugDisabled", VerdictState.FAILED),
    (
        "unregistered CI policy",
        _booted(Boot(ci_policy=b"measure func=BPRM_CHECK\n")),
        "Hgs_CiPolicy",
        VerdictState.FAILED,
    ),
    ("no CI policy loaded", _booted(Boot(ci_policy=None)), "Hgs_CiPolicy", VerdictState.FAILED),
    (
        "CI policy PCR not measured at all",
        _booted(Boot(), ci_policy_pcr=11),
        "Hgs_CiPolicy",
        VerdictState.NOT_EVALUABLE,
    ),
    (
        "db changed",
        _booted(Boot(db=b"db: other CA")),
        "Hgs_SecureBootSettings",
        VerdictState.FAILED,
    ),
    (
        "an unknown boot application",
        _booted(Boot(extra_app=b"bootkit.efi")),
        "Hgs_PcrBaseline",
        VerdictState.FAILED,
    ),
    (
        "resumed (restartCount 1)",
        lambda: Case(HOST.evidence(restart_count=1), trust_for(HOST)),
        "Hgs_FullBoot",
        VerdictState.FAILED,
    ),
    (
        "DMA protection disabled, Hgs_IommuEnabled enabled",
        _booted(Boot(dma_disabled=True), policy_states={"Hgs_IommuEnabled": PolicyState.ENABLED}),
        "Hgs_IommuEnabled",
        VerdictState.FAILED,
    ),
    (
        "Hgs_DumpsDisabled enabled: Linux cannot show it (fail closed)",
        _booted(Boot(), policy_states={"Hgs_DumpsDisabled": PolicyState.ENABLED}),
        "Hgs_DumpsDisabled",
        VerdictState.NOT_EVALUABLE,
    ),
]


@pytest.mark.parametrize(
    ("make", "policy", "verdict"),
    [a[1:] for a in POLICY_ATTACKS],
    ids=[a[0] for a in POLICY_ATTACKS],
)
def test_policy_attack_fails_its_policy(
    make: Callable[[], Case], policy: str, verdict: VerdictState
) -> None:
    result = make().run()
    assert result.status is S.INSECURE_HOST_CONFIGURATION, result.explain()
    assert policy in result.failed_policies
    by_name = {v.policy: v for v in result.verdicts}
    assert by_name[policy].state is verdict
    assert by_name[policy].blocking
    assert len(result.verdicts) == len(POLICIES)
    assert not result.failures
    assert result.summary is not None  # the evidence verified; only policies refused
    assert policy in result.explain()


def test_a_refusal_lists_every_failed_policy_not_just_the_first() -> None:
    boot = Boot(secure_boot=b"\x00", debug=True, ci_policy=None, extra_app=b"x.efi")
    result = _booted(boot)().run()
    assert set(result.failed_policies) == {
        "Hgs_SecureBootEnabled",
        "Hgs_UefiDebugDisabled",
        "Hgs_CiPolicy",
        "Hgs_PcrBaseline",
    }
    passed = {v.policy for v in result.verdicts if v.state is VerdictState.PASSED}
    assert passed == {"Hgs_SecureBootSettings", "Hgs_FullBoot"}


def test_the_engine_never_reads_facts_from_a_log_that_did_not_replay() -> None:
    """A secure-boot-off host sends a golden log: it does not replay, nothing is read."""
    off = SoftHost(boot=Boot(secure_boot=b"\x00"))
    evidence = replace(off.evidence(), event_log=Boot().log_bytes())
    result = verify_tpm_evidence(evidence, trust_for(off), nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE
    assert "Hgs_SecureBootEnabled" not in {
        v.policy for v in result.verdicts if v.state is VerdictState.PASSED
    }


def test_a_quoted_pcr_the_log_does_not_touch_is_allowed() -> None:
    """PCR 10 (IMA) is quoted, non-zero, and not in the firmware log: not a replay failure."""
    pcrs = {**HOST.boot.pcrs(), 10: b"\x10" * 32}
    attest = make_quote(quote_qualifying_data(NONCE, host_key_jwk()), pcrs)
    evidence = replace(
        HOST.evidence(), pcrs=pcrs, quote_attest=attest, quote_signature=soft_sign(HOST.ak, attest)
    )
    result = verify_tpm_evidence(evidence, trust_for(HOST), nonce=NONCE, now=NOW)
    assert result.status is S.PASSED, result.explain()
    assert result.summary is not None
    assert result.summary.pcrs[10] == b"\x10" * 32


def _quoting(pcrs: dict[int, bytes]) -> TpmEvidence:
    attest = make_quote(quote_qualifying_data(NONCE, host_key_jwk()), pcrs)
    return replace(
        HOST.evidence(), pcrs=pcrs, quote_attest=attest, quote_signature=soft_sign(HOST.ak, attest)
    )


@pytest.mark.parametrize(
    ("case", "change", "refused"),
    [
        ("every PCR as replayed", {}, None),
        ("two PCRs swapped", {4: "5", 5: "4"}, "PCR 4"),
        ("the last quoted PCR off", {9: b"\x09" * 32}, "PCR 9"),
        ("a PCR the log does not touch", {10: b"\x10" * 32}, None),
        ("that one plus a wrong one", {10: b"\x10" * 32, 0: bytes(32)}, "PCR 0"),
    ],
)
def test_the_log_is_compared_with_every_quoted_pcr(
    case: str, change: dict[int, Any], refused: str | None
) -> None:
    """Every quoted PCR the log extends must equal its replay (a swap of two is caught);
    one the log does not touch is not compared, but does not hide a wrong one."""
    pcrs = dict(HOST.boot.pcrs())
    pcrs.update({pcr: pcrs[int(v)] if isinstance(v, str) else v for pcr, v in change.items()})
    result = verify_tpm_evidence(_quoting(pcrs), trust_for(HOST), nonce=NONCE, now=NOW)
    if refused is None:
        assert result.status is S.PASSED, result.explain()
    else:
        assert [f.check for f in result.failures] == ["event-log-replay"], case
        assert refused in result.failures[0].reason


def test_an_untouched_required_pcr_must_hold_its_reset_value() -> None:
    """A required PCR extended without any logged event means the log is incomplete."""
    host = SoftHost(boot=Boot())
    evidence = host.evidence()
    log = host.boot.log()
    log.events = [e for e in log.events if e.pcr != 5 or e.type != 0x4]
    missing_pcr5 = log.build()
    # The log now has no PCR 5 separator: PCR 5 replays to zero, the quote says otherwise.
    result = verify_tpm_evidence(
        replace(evidence, event_log=missing_pcr5), trust_for(host), nonce=NONCE, now=NOW
    )
    assert result.status is S.INVALID_EVIDENCE
    assert "PCR 5" in result.failures[0].reason


# ------------------------------------------------------------------ first contact


def test_first_contact_activation_then_pass() -> None:
    trust = trust_for(HOST, ak_bindings=())
    first = verify_tpm_evidence(HOST.evidence(), trust, nonce=NONCE, now=NOW)
    assert first.status is S.ACTIVATION_REQUIRED
    request = first.activation
    assert request is not None
    assert request.ak_name == HOST.ak_name
    assert request.ek_digest == HOST.ek_digest
    assert first.to_dict()["activation"]["ak_name"] == HOST.ak_name.hex()

    secret = b"s" * 32
    challenge = activation_challenge(request.ek_public, request.ak_public, secret)
    answer = activate_credential(
        HOST.ek, challenge.ak_name, challenge.credential_blob, challenge.encrypted_secret
    )
    check_activation_response(secret, answer)
    bound = replace(trust, ak_bindings=(binding_for(request),))
    second = verify_tpm_evidence(HOST.evidence(b"next nonce"), bound, nonce=b"next nonce", now=NOW)
    assert second.status is S.PASSED, second.explain()


def test_the_time_must_carry_a_zone() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_tpm_evidence(
            HOST.evidence(), trust_for(HOST), nonce=NONCE, now=NOW.replace(tzinfo=None)
        )


def test_a_wrong_activation_answer_is_refused() -> None:
    with pytest.raises(ActivationError):
        check_activation_response(b"s" * 32, b"t" * 32)
    with pytest.raises(ActivationError):
        check_activation_response(b"", b"")


def test_activation_refuses_a_key_that_is_not_an_ak() -> None:
    forger = soft_ak("ecc", attributes=AK_ATTRIBUTES & ~TpmaObject.RESTRICTED, index=7)
    with pytest.raises(AttestationKeyError):
        activation_challenge(HOST.ek.public, forger.public, b"s" * 32)


def test_another_tpm_cannot_answer_the_challenge() -> None:
    challenge = activation_challenge(HOST.ek.public, HOST.ak.public, b"s" * 32)
    with pytest.raises(ActivationFailed):
        activate_credential(
            OTHER.ek, challenge.ak_name, challenge.credential_blob, challenge.encrypted_secret
        )


# ------------------------------------------------------------------ EK certificates


def test_an_unregistered_tpm_with_a_vendor_certified_ek_is_admitted() -> None:
    vendor = make_ca("Infineon TPM Root")
    trust = trust_for(HOST, tpm_hosts=(), admit_certified_eks=True, ek_roots=(vendor.cert,))
    evidence = HOST.evidence(ek_certificate=ek_certificate(HOST, vendor))
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.status is S.PASSED, result.explain()
    assert result.host_id == "ek-" + HOST.ek_digest.hex()[:16]


def test_an_expired_ek_certificate_is_not_trusted() -> None:
    vendor = make_ca("Infineon TPM Root")
    trust = trust_for(HOST, tpm_hosts=(), admit_certified_eks=True, ek_roots=(vendor.cert,))
    expired = ek_certificate(HOST, vendor, not_after=NOW - datetime.timedelta(days=1))
    result = verify_tpm_evidence(HOST.evidence(ek_certificate=expired), trust, nonce=NONCE, now=NOW)
    assert result.status is S.UNAUTHORIZED_HOST
    assert "not valid at validation time" in result.failures[0].reason


def test_a_certificate_does_not_replace_registration_unless_configured() -> None:
    vendor = make_ca("Infineon TPM Root")
    trust = trust_for(HOST, tpm_hosts=(), ek_roots=(vendor.cert,))
    evidence = HOST.evidence(ek_certificate=ek_certificate(HOST, vendor))
    result = verify_tpm_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.status is S.UNAUTHORIZED_HOST
    assert "not accepted instead" in result.failures[0].reason


def test_an_ek_that_is_not_a_storage_key_is_refused() -> None:
    ek = replace(
        HOST.ek.public, object_attributes=HOST.ek.public.object_attributes & ~TpmaObject.RESTRICTED
    )
    evidence = replace(HOST.evidence(), ek_public=marshal_public2b(ek))
    result = verify_tpm_evidence(evidence, trust_for(HOST), nonce=NONCE, now=NOW)
    assert result.status is S.INVALID_EVIDENCE
    assert result.failures[0].check == "ek-public"


def test_result_json_names_everything_the_api_returns() -> None:
    result = honest().run()
    body = result.to_dict()
    assert body["status"] == "Passed"
    assert body["host_key"] == host_key_jwk()
    assert body["facts"]["secure_boot"] is True
    assert body["facts"]["evidence"]["secure_boot"]["events"] == [2]
    assert body["baseline"]["matched"] is True
    assert len(body["verdicts"]) == len(POLICIES)
    assert re.search(r"Hgs_PcrBaseline\s+passed", result.explain())
