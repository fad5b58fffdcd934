"""The pure key release decision and the host's unwrap, with the attack table in-process.

Each attack row is built so that exactly one check stands between it and a
release: remove that check and the row is granted (the HTTPS suite in
test_kps_attacks.py replays the same rows against a real HGS).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError, UsageError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm, sign_guardian_document
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.key_protector import (
    KP_JWS_TYPE,
    TransportKey,
    create_key_protector,
    grant,
    load_key_protector,
)
from guardfab.keyprotection import (
    CertificateDeniedError,
    CertificateExpiredError,
    CertificateRejectedError,
    ForeignKeyProtectorError,
    HostRevokedError,
    KeyProtectorRejectedError,
    KeyProtectorTamperedError,
    KeyReleaseError,
    RollbackError,
    UntrustedCertificateSignerError,
    load_signer_keys,
    public_signer_jwk,
    release,
    unwrap_release,
)
from guardfab.keyprotection.release import HighestGeneration, ReleaseResult
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

NOW = 1_800_000_000.0


@dataclass
class World:
    """One fabric: its attestation signer and KPS keys, a tenant and two hosts."""

    owner: GuardianKeys
    kps: GuardianKeys
    kps_old: GuardianKeys
    other_kps: GuardianKeys
    attestation: ECKey
    host_a: ECKey
    host_b: ECKey

    def signers(self) -> dict[str, jose.AsymmetricKey]:
        return {jose.thumbprint(self.attestation): self.attestation}

    def cert(
        self,
        host: ECKey | None = None,
        *,
        host_id: str = "host-a",
        issued: float = NOW - 60,
        lifetime: int = 8 * 3600,
        key: jose.AsymmetricKey | None = None,
    ) -> str:
        claims = HealthCertificate(
            issuer="test-hgs",
            host_id=host_id,
            mode="host-key",
            host_key=jose.public_jwk(host or self.host_a),
            issued_at=int(issued),
            expires_at=int(issued) + lifetime,
        )
        return issue_health_certificate(claims, key or self.attestation)

    def kp(self, *guardians: GuardianKeys) -> bytes:
        documents = [sign_guardian_document(g.guardian, g.signing_key) for g in guardians]
        data, _ = create_key_protector(self.owner, documents or [self._doc(self.kps)])
        return data

    @staticmethod
    def _doc(keys: GuardianKeys) -> bytes:
        return sign_guardian_document(keys.guardian, keys.signing_key)

    def release(
        self,
        cert: str,
        kp: bytes,
        *,
        deny_before: float | None = None,
        revoked_hosts: frozenset[str] = frozenset(),
        highest_generation_seen: HighestGeneration | None = None,
    ) -> ReleaseResult:
        return release(
            cert,
            kp,
            kps_keys=[self.kps, self.kps_old],
            trusted_signers=self.signers(),
            now=NOW,
            deny_before=deny_before,
            revoked_hosts=revoked_hosts,
            highest_generation_seen=highest_generation_seen,
        )


@pytest.fixture(scope="module")
def world() -> World:
    return World(
        owner=new_guardian_keys("owner", KeyAlgorithm.EC_P256),
        kps=new_guardian_keys("kps-new", KeyAlgorithm.EC_P256, GuardianKind.KPS),
        kps_old=new_guardian_keys("kps-old", KeyAlgorithm.EC_P256, GuardianKind.KPS),
        other_kps=new_guardian_keys("other-fabric", KeyAlgorithm.EC_P256, GuardianKind.KPS),
        attestation=ECKey.generate_key("P-256"),
        host_a=ECKey.generate_key("P-384"),
        host_b=ECKey.generate_key("P-384"),
    )


def test_release_rekeys_and_only_the_certificate_host_can_unwrap(world: World) -> None:
    ingress = world.kp()
    transport = _owner_key(world, ingress)
    result = release(
        world.cert(),
        ingress,
        kps_keys=[world.kps],
        trusted_signers=world.signers(),
        now=NOW,
    )
    assert (result.generation, result.egress_generation, result.primary) == (0, 1, True)
    keys = unwrap_release(result.to_response(), world.host_a, ingress=load_key_protector(ingress))
    assert keys.current == transport
    assert keys.new != transport
    egress = load_key_protector(keys.egress_kp, expected_owner=world.owner.guardian.id)
    assert (egress.generation, egress.signer) == (1, world.kps.guardian.id)
    assert egress.unwrap(world.kps) == keys.new
    assert egress.unwrap(world.owner) == keys.new, "the owner can still recover the VM"
    with pytest.raises(VerificationError, match="no wrapping for key"):
        unwrap_release(result.to_response(), world.host_b)
    assert "release_token" not in repr(result)
    assert "egress_kp=" not in repr(result)


def test_each_release_is_encrypted_to_its_own_certificate_host_key(world: World) -> None:
    """Host keys are kept with their ids between releases: alternating hosts, and a
    second certificate for one host, each get exactly their certificate's key."""
    for host, other in ((world.host_a, world.host_b), (world.host_b, world.host_a)) * 2:
        result = world.release(world.cert(host), world.kp())
        payload = json.loads(b64url_decode(result.release_token.split(".")[1], what="t"))
        [recipient] = payload["keys"]["recipients"]
        assert recipient["header"]["kid"] == jose.thumbprint(host)
        assert unwrap_release(result.to_response(), host).egress_generation == 1
        with pytest.raises(VerificationError, match="no wrapping for key"):
            unwrap_release(result.to_response(), other)


def test_rsa_host_key_gets_rsa_oaep(world: World) -> None:
    host = RSAKey.generate_key(2048)
    result = release(
        world.cert(host),  # type: ignore[arg-type]
        world.kp(),
        kps_keys=[world.kps],
        trusted_signers=world.signers(),
        now=NOW,
    )
    payload = json.loads(b64url_decode(result.release_token.split(".")[1], what="t"))
    assert payload["keys"]["recipients"][0]["header"]["alg"] == "RSA-OAEP-256"
    assert unwrap_release(result.to_response(), host).egress_generation == 1


def test_old_key_unwraps_and_signs_the_egress_of_the_kps_it_names(world: World) -> None:
    ingress = world.kp(world.kps_old)
    result = world.release(world.cert(), ingress)
    assert result.kps_guardian == world.kps_old.guardian.id
    assert result.primary is False
    both = world.kp(world.kps_old, world.kps)
    assert world.release(world.cert(), both).primary is True


def test_the_egress_is_released_next_and_the_ingress_is_refused_after(world: World) -> None:
    seen: dict[str, int] = {}
    ingress = world.kp()
    first = world.release(world.cert(), ingress, highest_generation_seen=seen)
    seen[first.counter] = first.egress_generation
    egress = unwrap_release(first.to_response(), world.host_a).egress_kp
    second = world.release(world.cert(), egress, highest_generation_seen=seen.get)
    assert second.egress_generation == 2
    with pytest.raises(RollbackError, match="generation 0 is older than generation 1") as info:
        world.release(world.cert(), ingress, highest_generation_seen=seen)
    assert (info.value.host_id, info.value.kp_id, info.value.generation) == (
        "host-a",
        first.kp_id,
        0,
    )


def test_no_kps_key_is_a_usage_error(world: World) -> None:
    with pytest.raises(UsageError):
        release(world.cert(), world.kp(), kps_keys=[], trusted_signers=world.signers(), now=NOW)


# --- the attack table ------------------------------------------------------------------


def _alg_none(world: World) -> str:
    header = b64url_encode(json.dumps({"alg": "none", "typ": "guardfab-health+jwt"}).encode())
    claims = world.cert().split(".")[1]
    return f"{header}.{claims}."


def _hmac_with_public_key(world: World) -> str:
    """HS256 keyed with the signer's public key: the classic algorithm confusion."""
    kid = jose.thumbprint(world.attestation)
    header = {"alg": "HS256", "typ": "guardfab-health+jwt", "kid": kid}
    signing_input = f"{b64url_encode(canonical_json(header))}.{world.cert().split('.')[1]}"
    key = world.attestation.as_pem(private=False)
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _forged(world: World) -> str:
    """Claims signed by a stranger's key but naming the trusted signer's kid."""
    stranger = ECKey.generate_key("P-256")
    kid = jose.thumbprint(world.attestation)
    payload = b64url_decode(world.cert().split(".")[1], what="claims")
    header = {"alg": "ES256", "typ": "guardfab-health+jwt", "kid": kid}
    return jws.serialize_compact(header, payload, stranger, algorithms=["ES256"])


def _cnf_swapped(world: World) -> str:
    """Host B edits the cnf key of host A's genuine certificate to its own."""
    header, payload, signature = world.cert().split(".")
    claims = json.loads(b64url_decode(payload, what="claims"))
    claims["cnf"]["jwk"] = jose.public_jwk(world.host_b)
    return ".".join((header, b64url_encode(canonical_json(claims)), signature))


def _resigned(world: World, kp: bytes, edit: Callable[[dict[str, object]], None]) -> bytes:
    """Edit a KP payload and re-sign it with the owner's key, so only the inner check fails."""
    payload = json.loads(b64url_decode(kp.decode().strip().split(".")[1], what="kp"))
    edit(payload)
    token = jose.sign_compact(canonical_json(payload), world.owner.signing_key, typ=KP_JWS_TYPE)
    return token.encode() + b"\n"


def _flip(text: str) -> str:
    raw = bytearray(b64url_decode(text, what="part"))
    raw[0] ^= 1
    return b64url_encode(bytes(raw))


def _broken_guardian_set(world: World) -> bytes:
    def edit(payload: dict[str, object]) -> None:
        head, body, signature = str(payload["guardian_set"]).split(".")
        payload["guardian_set"] = f"{head}.{body}.{_flip(signature)}"

    return _resigned(world, world.kp(), edit)


def _tampered_wrapping(world: World) -> bytes:
    def edit(payload: dict[str, object]) -> None:
        wrapping = payload["wrapping"]
        assert isinstance(wrapping, dict)
        wrapping["ciphertext"] = _flip(wrapping["ciphertext"])

    return _resigned(world, world.kp(), edit)


@dataclass(frozen=True)
class Attack:
    name: str
    error: type[KeyReleaseError]
    cert: Callable[[World], str] = lambda w: w.cert()
    kp: Callable[[World], bytes] = lambda w: w.kp()
    options: Callable[[World], dict[str, Any]] = lambda w: {}


ATTACKS = [
    Attack("expired", CertificateExpiredError, cert=lambda w: w.cert(issued=NOW - 9 * 3600)),
    Attack("not-yet-valid", CertificateExpiredError, cert=lambda w: w.cert(issued=NOW + 3600)),
    Attack("forged", CertificateRejectedError, cert=_forged),
    Attack(
        "untrusted-signer",
        UntrustedCertificateSignerError,
        cert=lambda w: w.cert(key=ECKey.generate_key("P-256")),
    ),
    Attack("alg-none", CertificateRejectedError, cert=_alg_none),
    Attack("hmac-public-key", CertificateRejectedError, cert=_hmac_with_public_key),
    Attack(
        "issued-before-deny-date",
        CertificateDeniedError,
        options=lambda w: {"deny_before": NOW - 30},
    ),
    Attack(
        "revoked-host", HostRevokedError, options=lambda w: {"revoked_hosts": frozenset({"host-a"})}
    ),
    Attack("cnf-swapped", CertificateRejectedError, cert=_cnf_swapped),
    Attack("another-fabric", ForeignKeyProtectorError, kp=lambda w: w.kp(w.other_kps)),
    Attack("broken-guardian-set", KeyProtectorRejectedError, kp=_broken_guardian_set),
    Attack("tampered-wrapping", KeyProtectorTamperedError, kp=_tampered_wrapping),
    Attack("not-a-kp", KeyProtectorRejectedError, kp=lambda w: b"not a key protector"),
    Attack("no-certificate", CertificateRejectedError, cert=lambda w: ""),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused_with_its_own_error(world: World, attack: Attack) -> None:
    with pytest.raises(attack.error) as info:
        world.release(attack.cert(world), attack.kp(world), **attack.options(world))
    assert type(info.value) is attack.error
    assert info.value.reason
    assert "BEGIN" not in str(info.value)


def test_each_attack_is_granted_without_its_trick(world: World) -> None:
    """The controls: the same fixtures with the trick undone are released."""
    assert world.release(world.cert(), world.kp())
    assert world.release(world.cert(), world.kp(), deny_before=NOW - 3600)
    assert world.release(world.cert(), world.kp(), revoked_hosts=frozenset({"host-b"}))


def test_cnf_of_host_a_presented_by_host_b_gives_keys_only_a_opens(world: World) -> None:
    result = world.release(world.cert(world.host_a), world.kp())
    with pytest.raises(VerificationError):
        unwrap_release(result.to_response(), world.host_b)
    assert unwrap_release(result.to_response(), world.host_a)


# --- the host refuses answers that do not belong together ---------------------------------


def test_host_refuses_an_answer_with_another_egress_kp(world: World) -> None:
    ingress = world.kp()
    one = world.release(world.cert(), ingress).to_response()
    two = world.release(world.cert(), ingress).to_response()
    mixed = {**one, "egress_key_protector": two["egress_key_protector"]}
    with pytest.raises(VerificationError, match="not released with this egress KP"):
        unwrap_release(mixed, world.host_a)


def test_host_refuses_an_egress_that_is_not_the_successor(world: World) -> None:
    ingress = world.kp()
    answer = world.release(world.cert(), ingress).to_response()
    with pytest.raises(VerificationError, match="not a re-key of the KP sent"):
        unwrap_release(answer, world.host_a, ingress=load_key_protector(world.kp()))


def test_host_refuses_keys_encrypted_by_someone_else(world: World) -> None:
    """Anyone can encrypt to the host key; only the KPS can sign the release."""
    answer = world.release(world.cert(), world.kp()).to_response()
    head, payload, signature = answer["release"].split(".")
    body = json.loads(b64url_decode(payload, what="release"))
    body["keys"] = jose.encrypt_to_recipients(
        bytes(64), [(jose.thumbprint(world.host_a), world.host_a)], aad=b"x"
    )
    forged = f"{head}.{b64url_encode(canonical_json(body))}.{signature}"
    with pytest.raises(VerificationError, match="signature"):
        unwrap_release({**answer, "release": forged}, world.host_a)


@pytest.mark.parametrize("answer", [None, [], {}, {"egress_key_protector": "!"}])
def test_host_refuses_malformed_answers(world: World, answer: object) -> None:
    with pytest.raises(FormatError):
        unwrap_release(answer, world.host_a)


# --- trusted signers ----------------------------------------------------------------------


def test_signers_load_from_a_jwk_or_the_signers_jwks(world: World) -> None:
    jwk = public_signer_jwk(world.attestation)
    assert set(load_signer_keys(jwk)) == {jwk["kid"]}
    assert set(load_signer_keys({"keys": [jwk]})) == {jwk["kid"]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda j: {**j, "kid": "another"}, "thumbprint"),
        (lambda j: {**j, "use": "enc"}, "not a signature key"),
        (lambda j: {**j, "d": "AAAA"}, "private parts"),
        (lambda j: {"keys": []}, "1 to 16"),
        (lambda j: "text", "JWK object"),
    ],
)
def test_bad_signer_keys_are_refused(
    world: World, edit: Callable[[dict[str, object]], object], message: str
) -> None:
    with pytest.raises(FormatError, match=message):
        load_signer_keys(edit(public_signer_jwk(world.attestation)))


def _owner_key(world: World, kp: bytes) -> TransportKey:
    return load_key_protector(kp).unwrap(world.owner)


def test_release_cost_is_reported(world: World) -> None:
    """Not a benchmark: a sanity bound so a pathological slowdown shows up."""
    cert, kp = world.cert(), world.kp()
    start = time.perf_counter()
    for _ in range(5):
        world.release(cert, kp)
    assert (time.perf_counter() - start) / 5 < 0.5


def test_refusals_after_the_certificate_verified_name_the_host(world: World) -> None:
    with pytest.raises(HostRevokedError) as revoked:
        world.release(world.cert(), world.kp(), revoked_hosts=frozenset({"host-a"}))
    with pytest.raises(CertificateDeniedError) as denied:
        world.release(world.cert(), world.kp(), deny_before=NOW)
    with pytest.raises(CertificateRejectedError) as forged:
        world.release(_forged(world), world.kp())
    assert (revoked.value.host_id, denied.value.host_id, forged.value.host_id) == (
        "host-a",
        "host-a",
        None,
    )


def test_the_owner_recovers_a_kp_whose_egress_was_lost(world: World) -> None:
    """The host lost the answer: the ingress is refused, the owner's next generation is not."""
    ingress = world.kp()
    first = world.release(world.cert(), ingress)
    seen = {first.counter: first.egress_generation}
    with pytest.raises(RollbackError):
        world.release(world.cert(), ingress, highest_generation_seen=seen)
    recovery = new_guardian_keys("recovery", KeyAlgorithm.EC_P256)
    document = sign_guardian_document(recovery.guardian, recovery.signing_key)
    regranted = grant(load_key_protector(ingress), world.owner, document)
    result = world.release(world.cert(), regranted, highest_generation_seen=seen)
    keys = unwrap_release(result.to_response(), world.host_a)
    assert keys.current == _owner_key(world, ingress), "the vault key of the lost release"
