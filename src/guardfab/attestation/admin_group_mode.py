"""Admin-group attestation (DEPRECATED, as in the reference since Windows Server 2019).

The reference trusted a host because Active Directory put it in a security
group. guardfab's equivalent: the host presents a client certificate chain to
a configured host CA; the certificate names its group as a SAN URI
``urn:guardfab:group:<name>`` (a SAN, not a subject OU, because a URI has one
unambiguous spelling) and its host id as its first SAN DNS name. Since a
certificate is public, the host also signs the attestation binding (nonce and
host encryption key) with the certificate's key, so nobody else can replay it.

The mode establishes group membership only, not health: every result carries a
deprecation warning. Use TPM or host-key attestation instead.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from guardfab.attestation.certchain import (
    GROUP_URI_PREFIX,
    UntrustedCertificateError,
    groups_and_host,
    load_der_certificate,
    verify_client_chain,
)
from guardfab.attestation.evaluation import (
    refused_result,
    require_mode,
    revoked_failure,
    unmeasured_result,
)
from guardfab.attestation.evidence import AdminGroupEvidence
from guardfab.attestation.policies import DEFAULT_POLICY_SET, PolicySet
from guardfab.attestation.result import AttestationResult, AttestationStatus, Refusal
from guardfab.attestation.signing import (
    ADMIN_GROUP_TYP,
    BindingSignatureError,
    admin_group_claims,
    binding_payload,
    verify_binding,
)
from guardfab.attestation.trust import AttestationMode, TrustState
from guardfab.errors import FormatError
from guardfab.formats import jose

DEPRECATION_WARNING = (
    "admin-group attestation is deprecated: it proves group membership, not host health; "
    "move hosts to TPM or host-key attestation"
)
_UNAUTHORIZED = AttestationStatus.UNAUTHORIZED_HOST


def _chain(evidence: AdminGroupEvidence) -> list[x509.Certificate]:
    try:
        return [
            load_der_certificate(der, what=f"certificate {index}")
            for index, der in enumerate(evidence.certificates)
        ]
    except FormatError as exc:
        raise Refusal.of("certificate", AttestationStatus.INVALID_EVIDENCE, exc) from exc


def _identify(chain: list[x509.Certificate], trust: TrustState, now: datetime.datetime) -> str:
    """The host id of a certificate that chains to a host CA and names a registered group."""
    if trust.group_store is None:
        raise Refusal.of("certificate-chain", _UNAUTHORIZED, "no host CA is configured")
    try:
        names = verify_client_chain(chain, trust.group_store, now=now)
    except UntrustedCertificateError as exc:
        raise Refusal.of("certificate-chain", _UNAUTHORIZED, exc) from exc
    groups, host_id = groups_and_host(names)
    if host_id is None:
        raise Refusal.of("certificate", _UNAUTHORIZED, "the certificate names no host (SAN DNS)")
    if not any(group in trust.host_groups for group in groups):
        shown = ", ".join(groups) or f"none (expected a SAN URI {GROUP_URI_PREFIX}<name>)"
        raise Refusal.of(
            "host-group",
            _UNAUTHORIZED,
            f"the certificate's group(s) are not registered: {shown}",
            hint="register the group at the HGS, or issue the host a certificate naming one",
        )
    if trust.is_revoked(host_id):
        raise Refusal(revoked_failure(host_id))
    return host_id


def _leaf_key(cert: x509.Certificate) -> jose.AsymmetricKey:
    """The leaf certificate's key as a JOSE key (EC or RSA only)."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            return ECKey.import_key(key)
        if isinstance(key, rsa.RSAPublicKey):
            return RSAKey.import_key(key)
    except (JoseError, ValueError, TypeError) as exc:
        raise Refusal.of("certificate", AttestationStatus.INVALID_EVIDENCE, str(exc)) from exc
    raise Refusal.of(
        "certificate", AttestationStatus.INVALID_EVIDENCE, "the certificate key is not EC or RSA"
    )


def verify_admin_group_evidence(
    evidence: AdminGroupEvidence,
    trust: TrustState,
    *,
    nonce: bytes,
    now: datetime.datetime,
    policies: PolicySet = DEFAULT_POLICY_SET,
) -> AttestationResult:
    """Verify admin-group evidence (deprecated); the result always carries the warning."""
    host_id: str | None = None
    warnings = (DEPRECATION_WARNING,)
    try:
        require_mode(trust, AttestationMode.ADMIN_GROUP, evidence.host_key, now)
        chain = _chain(evidence)
        host_id = _identify(chain, trust, now)
        payload = binding_payload(nonce, evidence.host_key, admin_group_claims())
        try:
            verify_binding(evidence.signature, _leaf_key(chain[0]), payload, typ=ADMIN_GROUP_TYP)
        except (BindingSignatureError, FormatError) as exc:
            raise Refusal.of(
                "certificate-signature", AttestationStatus.INVALID_EVIDENCE, exc
            ) from exc
    except Refusal as refusal:
        return refused_result(
            AttestationMode.ADMIN_GROUP,
            refusal,
            trust,
            host_id=host_id,
            host_key=evidence.host_key,
            now=now,
            warnings=warnings,
            policies=policies,
        )
    return unmeasured_result(
        AttestationMode.ADMIN_GROUP,
        trust,
        host_id=host_id,
        host_key=evidence.host_key,
        now=now,
        warnings=warnings,
        policies=policies,
    )
