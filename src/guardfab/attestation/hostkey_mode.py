"""Host-key attestation: the host proves possession of a registered key.

As in the reference, this mode establishes identity only: the host key must be
registered and not revoked, the host must not be revoked, and the signature
over the binding of this challenge's nonce and the presented host encryption
key (plus the host's canonical claims) must verify with exactly that key. No
boot measurements exist, so the measured-boot policies report "TPM mode only"
and do not block.
"""

from __future__ import annotations

import datetime

from guardfab.attestation.evaluation import (
    refused_result,
    require_mode,
    revoked_failure,
    unmeasured_result,
)
from guardfab.attestation.evidence import HostKeyEvidence
from guardfab.attestation.policies import DEFAULT_POLICY_SET, PolicySet
from guardfab.attestation.result import AttestationResult, AttestationStatus, Refusal
from guardfab.attestation.signing import (
    HOST_KEY_TYP,
    BindingSignatureError,
    binding_payload,
    verify_binding,
)
from guardfab.attestation.trust import AttestationMode, HostKey, TrustState
from guardfab.errors import FormatError

_UNAUTHORIZED = AttestationStatus.UNAUTHORIZED_HOST


def _identify(evidence: HostKeyEvidence, trust: TrustState) -> HostKey:
    """The registered, unrevoked host key, of an unrevoked host."""
    key = trust.host_key(evidence.host_key_id)
    if key is None:
        raise Refusal.of(
            "host-key",
            _UNAUTHORIZED,
            f"host key {evidence.host_key_id} is not registered",
            hint="register the host's public key at the HGS (hgs host-key add)",
        )
    if key.revoked:
        raise Refusal.of("host-key", _UNAUTHORIZED, f"host key {key.key_id} is revoked")
    if trust.is_revoked(key.host_id):
        raise Refusal(revoked_failure(key.host_id))
    return key


def verify_host_key_evidence(
    evidence: HostKeyEvidence,
    trust: TrustState,
    *,
    nonce: bytes,
    now: datetime.datetime,
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """Verify host-key evidence; Passed if the registered key signed this binding."""
    host_id: str | None = None
    try:
        require_mode(trust, AttestationMode.HOST_KEY, evidence.host_key, now)
        registered = _identify(evidence, trust)
        host_id = registered.host_id
        payload = binding_payload(nonce, evidence.host_key, evidence.claims_bytes())
        try:
            verify_binding(
                evidence.signature,
                registered.key,
                payload,
                typ=HOST_KEY_TYP,
                kid=registered.key_id,
            )
        except (BindingSignatureError, FormatError) as exc:
            raise Refusal.of("host-key-signature", AttestationStatus.INVALID_EVIDENCE, exc) from exc
    except Refusal as refusal:
        return refused_result(
            AttestationMode.HOST_KEY,
            refusal,
            trust,
            host_id=host_id,
            host_key=evidence.host_key,
            now=now,
            policies=policies,
        )
    return unmeasured_result(
        AttestationMode.HOST_KEY,
        trust,
        host_id=host_id,
        host_key=evidence.host_key,
        now=now,
        policies=policies,
    )
