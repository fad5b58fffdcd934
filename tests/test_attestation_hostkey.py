"""Host-key and (deprecated) admin-group attestation: identity only, attacks refused."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from guardfab.attestation.admin_group_mode import (
    DEPRECATION_WARNING,
    verify_admin_group_evidence,
)
from guardfab.attestation.evidence import AdminGroupEvidence, HostKeyEvidence
from guardfab.attestation.hostkey_mode import verify_host_key_evidence
from guardfab.attestation.policies import POLICIES
from guardfab.attestation.result import AttestationResult, AttestationStatus, VerdictState
from guardfab.attestation.signing import (
    ADMIN_GROUP_TYP,
    HOST_KEY_TYP,
    admin_group_evidence,
    binding_payload,
    host_key_evidence,
    sign_binding,
)
from guardfab.attestation.trust import AttestationMode, HostKey, TrustState
from guardfab.errors import UsageError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode
from test_attestation_fixtures import NONCE, NOW, Ca, host_key_jwk, make_ca

S = AttestationStatus


@functools.cache
def signing_key(kind: str = "ec", index: int = 0) -> jose.AsymmetricKey:
    """A host's registered signing key (cached: RSA generation is slow)."""
    if kind == "rsa":
        return RSAKey.import_key(rsa.generate_private_key(65537, 2048))
    curve = ec.SECP384R1() if kind == "p384" else ec.SECP256R1()
    return ECKey.import_key(ec.generate_private_key(curve))


def registered(key: jose.AsymmetricKey, host_id: str = "kh-1", **kwargs: Any) -> HostKey:
    return HostKey(jose.thumbprint(key), host_id, jose.public_jwk(key), **kwargs)


def hk_trust(*keys: HostKey, **changes: Any) -> TrustState:
    base = TrustState(modes=frozenset({AttestationMode.HOST_KEY}), host_keys=keys)
    return replace(base, **changes)


def signed(key: jose.AsymmetricKey | None = None, **kwargs: Any) -> HostKeyEvidence:
    kwargs.setdefault("nonce", NONCE)
    kwargs.setdefault("host_key", host_key_jwk())
    return host_key_evidence(key or signing_key(), **kwargs)


@dataclass(frozen=True)
class HkCase:
    evidence: HostKeyEvidence
    trust: TrustState
    nonce: bytes = NONCE

    def run(self) -> AttestationResult:
        return verify_host_key_evidence(self.evidence, self.trust, nonce=self.nonce, now=NOW)


@pytest.mark.parametrize("kind", ["ec", "p384", "rsa"])
def test_a_registered_key_attests(kind: str) -> None:
    key = signing_key(kind)
    evidence = signed(key, claims={"os": "debian 13", "agent": "guardfab 0.1"})
    result = HkCase(evidence, hk_trust(registered(key))).run()
    assert result.status is S.PASSED, result.explain()
    assert result.mode is AttestationMode.HOST_KEY
    assert result.host_id == "kh-1"
    assert result.host_key == host_key_jwk()
    assert [v.policy for v in result.verdicts] == [p.name for p in POLICIES]
    assert not any(v.blocking for v in result.verdicts)
    assert all(
        v.state in (VerdictState.NOT_EVALUABLE, VerdictState.DISABLED) for v in result.verdicts
    )
    assert "TPM mode only" in result.verdicts[0].reason


def _resigned(header: dict[str, Any], key: jose.AsymmetricKey | None = None) -> HostKeyEvidence:
    """A signature over the right binding but with a chosen header."""
    key = key or signing_key()
    evidence = signed()
    payload = binding_payload(NONCE, evidence.host_key, evidence.claims_bytes())
    token = jws.serialize_compact(header, payload, key, algorithms=["ES256", "ES384", "PS256"])
    return replace(evidence, signature=jws.detach_content(token))


def _hand_signed(header: dict[str, Any]) -> HostKeyEvidence:
    """ES256 by hand (RFC 7515 section 5.1), for headers joserfc refuses to produce."""
    evidence = signed()
    payload = binding_payload(NONCE, evidence.host_key, evidence.claims_bytes())
    protected = b64url_encode(json.dumps(header).encode())
    signing_input = f"{protected}.{b64url_encode(payload)}".encode()
    private = signing_key().private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return replace(evidence, signature=f"{protected}..{b64url_encode(raw)}")


def _kid() -> str:
    return jose.thumbprint(signing_key())


HkAttack = tuple[str, Callable[[], HkCase], AttestationStatus, str]
HK_ATTACKS: list[HkAttack] = [
    (
        "unknown host key",
        lambda: HkCase(signed(), hk_trust(registered(signing_key("ec", 1)))),
        S.UNAUTHORIZED_HOST,
        "host-key",
    ),
    (
        "revoked host key",
        lambda: HkCase(signed(), hk_trust(registered(signing_key(), revoked=True))),
        S.UNAUTHORIZED_HOST,
        "host-key",
    ),
    (
        "revoked host",
        lambda: HkCase(
            signed(), hk_trust(registered(signing_key()), revoked_hosts=frozenset({"kh-1"}))
        ),
        S.UNAUTHORIZED_HOST,
        "revocation",
    ),
    (
        "signature for an earlier nonce",
        lambda: HkCase(signed(nonce=b"an earlier nonce"), hk_trust(registered(signing_key()))),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "host key swapped after signing",
        lambda: HkCase(
            replace(signed(), host_key=host_key_jwk(9)), hk_trust(registered(signing_key()))
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "claims changed after signing",
        lambda: HkCase(
            replace(signed(claims={"os": "a"}), claims={"os": "b"}),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "signed by another key under this key's id",
        lambda: HkCase(
            replace(signed(signing_key("ec", 1)), host_key_id=_kid()),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "an admin-group signature replayed as host-key evidence",
        lambda: HkCase(
            _resigned({"alg": "ES256", "typ": ADMIN_GROUP_TYP, "kid": _kid()}),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "a header naming another key",
        lambda: HkCase(
            _resigned({"alg": "ES256", "typ": HOST_KEY_TYP, "kid": "x" * 43}),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "a critical header",
        lambda: HkCase(
            _hand_signed(
                {"alg": "ES256", "typ": HOST_KEY_TYP, "kid": _kid(), "crit": ["exp"], "exp": 1}
            ),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "alg none",
        lambda: HkCase(
            replace(signed(), signature="eyJhbGciOiJub25lIn0..AAAA"),
            hk_trust(registered(signing_key())),
        ),
        S.INVALID_EVIDENCE,
        "host-key-signature",
    ),
    (
        "host-key mode not active",
        lambda: HkCase(signed(), hk_trust(registered(signing_key()), modes=frozenset())),
        S.MODE_NOT_ACTIVE,
        "mode",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "check"), [a[1:] for a in HK_ATTACKS], ids=[a[0] for a in HK_ATTACKS]
)
def test_host_key_attack_is_refused(
    make: Callable[[], HkCase], status: AttestationStatus, check: str
) -> None:
    result = make().run()
    assert result.status is status, result.explain()
    assert [f.check for f in result.failures] == [check]
    assert len(result.verdicts) == len(POLICIES)
    assert not result.passed


def test_a_host_key_record_must_carry_its_own_thumbprint() -> None:
    with pytest.raises(UsageError, match="thumbprint"):
        HostKey("x" * 43, "kh-1", jose.public_jwk(signing_key()))
    stored = registered(signing_key()).to_dict()
    assert HostKey.from_dict(stored) == registered(signing_key())


# ------------------------------------------------------------------ admin-group


@dataclass(frozen=True)
class Member:
    """A host with a client certificate issued by ``ca``."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def evidence(self, nonce: bytes = NONCE, **kwargs: Any) -> AdminGroupEvidence:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        kwargs.setdefault("host_key", host_key_jwk())
        return admin_group_evidence(ECKey.import_key(self.key), [der], nonce=nonce, **kwargs)


@functools.cache
def member(
    ca_name: str = "Contoso Host CA",
    group: str = "guarded-hosts",
    dns: str = "kvm-01.contoso.test",
    client_auth: bool = True,
    days: int = 365,
) -> Member:
    ca: Ca = make_ca(ca_name)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(dns)]
    if group:
        names.append(x509.UniformResourceIdentifier(f"urn:guardfab:group:{group}"))
    usages = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client_auth:
        usages = [x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]
    cert = ca.issue(
        key.public_key(),
        subject=x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, dns)]),
        extensions=[
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage(usages), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False),
        ],
        not_after=NOW + datetime.timedelta(days=days),
    )
    return Member(key, cert)


def ag_trust(**changes: Any) -> TrustState:
    base = TrustState(
        modes=frozenset({AttestationMode.ADMIN_GROUP}),
        host_groups=frozenset({"guarded-hosts"}),
        group_roots=(make_ca("Contoso Host CA").cert,),
    )
    return replace(base, **changes)


def test_a_group_member_attests_with_a_deprecation_warning() -> None:
    result = verify_admin_group_evidence(member().evidence(), ag_trust(), nonce=NONCE, now=NOW)
    assert result.status is S.PASSED, result.explain()
    assert result.host_id == "kvm-01.contoso.test"
    assert result.warnings == (DEPRECATION_WARNING,)
    assert "deprecated" in result.explain()
    assert result.to_dict()["warnings"] == [DEPRECATION_WARNING]


def _replayed_certificate() -> AdminGroupEvidence:
    """Someone else sends the member's (public) certificate with their own signature."""
    thief = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
    evidence = member().evidence()
    payload = binding_payload(NONCE, evidence.host_key, b'{"mode":"admin-group"}')
    return replace(evidence, signature=sign_binding(thief, payload, typ=ADMIN_GROUP_TYP))


AgAttack = tuple[str, Callable[[], tuple[AdminGroupEvidence, TrustState]], AttestationStatus, str]
AG_ATTACKS: list[AgAttack] = [
    (
        "group not registered",
        lambda: (member(group="lab-hosts").evidence(), ag_trust()),
        S.UNAUTHORIZED_HOST,
        "host-group",
    ),
    (
        "no group in the certificate",
        lambda: (member(group="").evidence(), ag_trust()),
        S.UNAUTHORIZED_HOST,
        "host-group",
    ),
    (
        "certificate from another CA",
        lambda: (member(ca_name="Rogue CA").evidence(), ag_trust()),
        S.UNAUTHORIZED_HOST,
        "certificate-chain",
    ),
    (
        "expired certificate",
        lambda: (member(days=-1).evidence(), ag_trust()),
        S.UNAUTHORIZED_HOST,
        "certificate-chain",
    ),
    (
        "certificate without clientAuth",
        lambda: (member(client_auth=False).evidence(), ag_trust()),
        S.UNAUTHORIZED_HOST,
        "certificate-chain",
    ),
    (
        "no host CA configured",
        lambda: (member().evidence(), ag_trust(group_roots=())),
        S.UNAUTHORIZED_HOST,
        "certificate-chain",
    ),
    (
        "certificate replayed by someone without its key",
        lambda: (_replayed_certificate(), ag_trust()),
        S.INVALID_EVIDENCE,
        "certificate-signature",
    ),
    (
        "signature for an earlier nonce",
        lambda: (member().evidence(b"an earlier nonce"), ag_trust()),
        S.INVALID_EVIDENCE,
        "certificate-signature",
    ),
    (
        "host key swapped after signing",
        lambda: (replace(member().evidence(), host_key=host_key_jwk(9)), ag_trust()),
        S.INVALID_EVIDENCE,
        "certificate-signature",
    ),
    (
        "revoked host",
        lambda: (member().evidence(), ag_trust(revoked_hosts=frozenset({"kvm-01.contoso.test"}))),
        S.UNAUTHORIZED_HOST,
        "revocation",
    ),
    (
        "not DER",
        lambda: (replace(member().evidence(), certificates=(b"\x30\x03junk",)), ag_trust()),
        S.INVALID_EVIDENCE,
        "certificate",
    ),
    (
        "admin-group mode not active",
        lambda: (member().evidence(), ag_trust(modes=frozenset({AttestationMode.TPM}))),
        S.MODE_NOT_ACTIVE,
        "mode",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "check"), [a[1:] for a in AG_ATTACKS], ids=[a[0] for a in AG_ATTACKS]
)
def test_admin_group_attack_is_refused(
    make: Callable[[], tuple[AdminGroupEvidence, TrustState]], status: AttestationStatus, check: str
) -> None:
    evidence, trust = make()
    result = verify_admin_group_evidence(evidence, trust, nonce=NONCE, now=NOW)
    assert result.status is status, result.explain()
    assert [f.check for f in result.failures] == [check]
    assert result.warnings == (DEPRECATION_WARNING,)
