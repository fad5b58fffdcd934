"""The attack table against a real HGS over HTTPS.

Every row is refused with its own clear 4xx, leaves one audit record (kind
``key-release``, outcome ``refused``, the row's reason), and changes nothing
else in the store. Each row is built so that exactly one check stands in its
way: the certificates are genuine except for the one flaw (minted with the
HGS's real attestation key when the flaw is a time), the KPs are genuine except
for the one edit (re-signed by the real owner), so removing the check grants
the row. The pure suite (test_keyprotection_release.py) holds the same rows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from guardfab.attestation.trust import AttestationMode
from guardfab.errors import VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm, sign_guardian_document
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.key_protector import KP_JWS_TYPE, load_key_protector
from guardfab.hgs import registry as reg
from guardfab.keyprotection import unwrap_release
from guardfab.tenant.guardians import new_guardian_keys
from hgs_harness import RunningHgs, start_hgs
from test_kps_fixtures import (
    Host,
    Tenant,
    admin,
    attested_host,
    enable_modes,
    kps_document,
    minted_certificate,
    post_release,
    register,
    releases,
    snapshot,
)

pytestmark = pytest.mark.slow


@dataclass
class Fabric:
    """A running HGS with an attested host, a revoked host and a tenant."""

    hgs: RunningHgs
    host: Host
    cert: str
    revoked: Host
    tenant: Tenant

    def kp(self) -> bytes:
        return self.tenant.kp(kps_document(self.hgs))


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    hgs = start_hgs(tmp_path_factory.mktemp("kps-attacks") / "hgs")
    try:
        enable_modes(hgs, AttestationMode.HOST_KEY)
        host, cert = attested_host(hgs, "host-a")
        revoked, _ = attested_host(hgs, "host-revoked")
        register(
            hgs, [(reg.REVOKED + "host-revoked", {"host_id": "host-revoked", "revoked_at": 0})]
        )
        yield Fabric(hgs, host, cert, revoked, Tenant())
    finally:
        hgs.stop()


# --- how each row is made ---------------------------------------------------------------


def _claims(token: str) -> str:
    return token.split(".")[1]


def _alg_none(f: Fabric) -> str:
    header = b64url_encode(json.dumps({"alg": "none", "typ": "guardfab-health+jwt"}).encode())
    return f"{header}.{_claims(f.cert)}."


def _hmac_with_public_key(f: Fabric) -> str:
    signer = ECKey.import_key(admin(f.hgs, "GET", "/attestation/v1/signers")["keys"][0])
    header = {"alg": "HS256", "typ": "guardfab-health+jwt", "kid": jose.thumbprint(signer)}
    signing_input = f"{b64url_encode(canonical_json(header))}.{_claims(f.cert)}"
    mac = hmac.new(signer.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _forged(f: Fabric) -> str:
    """The genuine claims, signed by a stranger under the HGS signer's kid."""
    kid = json.loads(b64url_decode(f.cert.split(".")[0], what="header"))["kid"]
    header = {"alg": "ES256", "typ": "guardfab-health+jwt", "kid": kid}
    payload = b64url_decode(_claims(f.cert), what="claims")
    return jws.serialize_compact(header, payload, ECKey.generate_key("P-256"), algorithms=["ES256"])


def _untrusted_signer(f: Fabric) -> str:
    cert = HealthCertificate(
        issuer="rogue-hgs",
        host_id="host-a",
        mode="host-key",
        host_key=f.host.public_key(),
        issued_at=int(time.time()) - 60,
        expires_at=int(time.time()) + 3600,
    )
    return issue_health_certificate(cert, ECKey.generate_key("P-256"))


def _cnf_swapped(f: Fabric) -> str:
    header, payload, signature = f.cert.split(".")
    claims = json.loads(b64url_decode(payload, what="claims"))
    claims["cnf"]["jwk"] = Host("mallory").public_key()
    return ".".join((header, b64url_encode(canonical_json(claims)), signature))


def _resigned(f: Fabric, edit: Callable[[dict[str, object]], None]) -> bytes:
    kp = f.kp()
    payload = json.loads(b64url_decode(kp.decode().strip().split(".")[1], what="kp"))
    edit(payload)
    token = jose.sign_compact(canonical_json(payload), f.tenant.owner.signing_key, typ=KP_JWS_TYPE)
    return token.encode() + b"\n"


def _flip(text: str) -> str:
    raw = bytearray(b64url_decode(text, what="part"))
    raw[-1] ^= 1
    return b64url_encode(bytes(raw))


def _broken_guardian_set(f: Fabric) -> bytes:
    def edit(payload: dict[str, object]) -> None:
        head, body, signature = str(payload["guardian_set"]).split(".")
        payload["guardian_set"] = f"{head}.{body}.{_flip(signature)}"

    return _resigned(f, edit)


def _tampered_wrapping(f: Fabric) -> bytes:
    def edit(payload: dict[str, object]) -> None:
        wrapping = payload["wrapping"]
        assert isinstance(wrapping, dict)
        wrapping["tag"] = _flip(wrapping["tag"])

    return _resigned(f, edit)


def _another_fabric(f: Fabric) -> bytes:
    other = new_guardian_keys("other-hgs", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    return f.tenant.kp(sign_guardian_document(other.guardian, other.signing_key))


def _replayed(f: Fabric) -> bytes:
    """A KP released once already: presenting it again is a replay."""
    kp = f.kp()
    assert post_release(f.hgs, f.cert, kp).status_code == 200
    return kp


@dataclass(frozen=True)
class Attack:
    name: str
    status: int
    reason: str
    cert: Callable[[Fabric], str] = lambda f: f.cert
    kp: Callable[[Fabric], bytes] = Fabric.kp


ATTACKS = [
    Attack("expired", 401, "certificate-expired",
           cert=lambda f: minted_certificate(f.hgs, f.host, issued=time.time() - 9 * 3600)),
    Attack("not-yet-valid", 401, "certificate-expired",
           cert=lambda f: minted_certificate(f.hgs, f.host, issued=time.time() + 3600)),
    Attack("forged", 401, "certificate-invalid", cert=_forged),
    Attack("no-certificate", 401, "certificate-invalid", cert=lambda f: ""),
    Attack("untrusted-signer", 401, "untrusted-signer", cert=_untrusted_signer),
    Attack("alg-none", 401, "certificate-invalid", cert=_alg_none),
    Attack("hmac-with-public-key", 401, "certificate-invalid", cert=_hmac_with_public_key),
    Attack("revoked-host", 403, "host-revoked",
           cert=lambda f: minted_certificate(f.hgs, f.revoked)),
    Attack("cnf-swapped", 401, "certificate-invalid", cert=_cnf_swapped),
    Attack("kp-for-another-fabric", 404, "kp-for-another-fabric", kp=_another_fabric),
    Attack("broken-guardian-set", 422, "kp-invalid", kp=_broken_guardian_set),
    Attack("tampered-wrapping", 422, "kp-unwrap-failed", kp=_tampered_wrapping),
    Attack("replayed-request", 409, "rollback", kp=_replayed),
]  # fmt: skip


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused_audited_and_changes_nothing(fabric: Fabric, attack: Attack) -> None:
    cert, kp = attack.cert(fabric), attack.kp(fabric)
    before, audited = snapshot(fabric.hgs), len(releases(fabric.hgs))

    response = post_release(fabric.hgs, cert, kp)

    assert response.status_code == attack.status, response.text
    error = response.json()["error"]
    assert error["reason"] == attack.reason
    assert error["message"]
    assert error["hint"]
    _no_key_material(response.text, fabric)
    assert snapshot(fabric.hgs) == before, "a refused release changed the store"
    (record,) = releases(fabric.hgs)[audited:]
    assert (record.outcome, record.details["reason"]) == ("refused", attack.reason)


def test_issued_before_the_deny_date_is_refused(fabric: Fabric) -> None:
    """Certificates issued before the deny-before date are refused; later ones are not."""
    issued = time.time() - 600
    old = minted_certificate(fabric.hgs, fabric.host, issued=issued)
    kp = fabric.kp()
    admin(fabric.hgs, "PUT", "/admin/v1/kps/deny-before", json={"deny_before": int(issued) + 60})
    try:
        before, audited = snapshot(fabric.hgs), len(releases(fabric.hgs))
        response = post_release(fabric.hgs, old, kp)
        assert response.status_code == 401
        assert response.json()["error"]["reason"] == "issued-before-deny-date"
        assert snapshot(fabric.hgs) == before
        (record,) = releases(fabric.hgs)[audited:]
        assert (record.actor, record.outcome) == ("host-a", "refused")
        fresh = fabric.host.attest(fabric.hgs)
        assert post_release(fabric.hgs, fresh, kp).status_code == 200
    finally:
        admin(fabric.hgs, "DELETE", "/admin/v1/kps/deny-before")


def test_untrusted_signer_becomes_trusted_when_added_and_refused_when_removed(
    fabric: Fabric,
) -> None:
    rogue = ECKey.generate_key("P-256")
    cert = HealthCertificate(
        issuer="second-hgs",
        host_id="host-a",
        mode="host-key",
        host_key=fabric.host.public_key(),
        issued_at=int(time.time()) - 60,
        expires_at=int(time.time()) + 3600,
    )
    token = issue_health_certificate(cert, rogue)
    jwks = {"keys": [{**jose.public_jwk(rogue), "kid": jose.thumbprint(rogue), "use": "sig"}]}
    admin(fabric.hgs, "POST", "/admin/v1/kps/signers", json={"jwks": jwks})
    try:
        assert post_release(fabric.hgs, token, fabric.kp()).status_code == 200
    finally:
        admin(fabric.hgs, "DELETE", f"/admin/v1/kps/signers/{jose.thumbprint(rogue)}")
    assert post_release(fabric.hgs, token, fabric.kp()).status_code == 401


def test_a_certificate_of_host_a_presented_by_host_b_gives_keys_only_a_opens(
    fabric: Fabric,
) -> None:
    kp = fabric.kp()
    response = post_release(fabric.hgs, fabric.cert, kp)  # host B replays A's certificate
    assert response.status_code == 200
    host_b = Host("host-b")
    with pytest.raises(VerificationError, match="no wrapping for key"):
        unwrap_release(response.json(), host_b.encryption, ingress=load_key_protector(kp))
    keys = unwrap_release(response.json(), fabric.host.encryption, ingress=load_key_protector(kp))
    assert keys.current == load_key_protector(kp).unwrap(fabric.tenant.owner)


def test_malformed_requests_are_refused_without_echo(fabric: Fabric) -> None:
    with fabric.hgs.client() as client:
        missing = client.post("/keyprotection/v1/release", json={"health_certificate": "x"})
        extra = client.post(
            "/keyprotection/v1/release",
            json={"health_certificate": "x", "key_protector": "AA", "debug": True},
        )
        not_b64 = client.post(
            "/keyprotection/v1/release",
            json={"health_certificate": fabric.cert, "key_protector": "***"},
        )
    assert (missing.status_code, extra.status_code) == (422, 422)
    assert not_b64.status_code == 422
    assert not_b64.json()["error"]["reason"] == "kp-invalid"


def _no_key_material(text: str, fabric: Fabric) -> None:
    for marker in ("PRIVATE KEY", '"d":', "BEGIN"):
        assert marker not in text
    assert len(text) < 2048, "an error body describes; it does not carry"


def test_the_error_bodies_never_carry_the_kps_private_key(fabric: Fabric) -> None:
    keys_dir = Path(fabric.hgs.directory) / "keys" / "kps"
    private = [p.read_text() for p in keys_dir.glob("*/*-key.pem")]
    response = post_release(fabric.hgs, fabric.cert, _tampered_wrapping(fabric))
    assert response.status_code == 422
    for pem in private:
        body = "".join(pem.splitlines()[1:-1])
        assert body[:40] not in response.text
