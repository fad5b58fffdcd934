"""The pure shielding data opening (KPS side) and the host's verification of the answer.

The KPS opens a VM's PDK for a host with a valid health certificate and seals
the secrets to that host's key; the host accepts only an answer signed by a KPS
guardian the PDK's owner named, bound to its PDK and its certificate. Each
attack row has exactly one flaw (pdk_forgeries.py); the HTTPS suite
(test_kps_shielding.py) replays them against a real HGS.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from joserfc.jwk import ECKey

from guardfab.errors import FormatError, UsageError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import sign_guardian_document
from guardfab.formats.shielding_data import load_shielding_data
from guardfab.keyprotection import (
    CertificateDeniedError,
    CertificateExpiredError,
    ForeignShieldingDataError,
    HostRevokedError,
    KeyReleaseError,
    OpeningResult,
    UntrustedCertificateSignerError,
    open_shielding_answer,
    open_shielding_data,
)
from guardfab.keyprotection.shielding import OPENING_JWS_TYPE, secrets_aad
from guardfab.keyprotection.shielding_host import certificate_id_of
from guardfab.tenant.guardians import GuardianKeys
from pdk_forgeries import PDK_ATTACKS, SECRET_MARKERS, SECRETS, PdkAttack, make_pdk
from test_keyprotection_release import NOW, World, world
from test_keyprotection_rotation import rotated

__all__ = ["world"]  # the fixture, imported for pytest


def _doc(keys: GuardianKeys) -> bytes:
    return sign_guardian_document(keys.guardian, keys.signing_key)


def _open(world: World, pdk: bytes, cert: str | None = None, **kwargs: object) -> OpeningResult:
    return open_shielding_data(
        cert or world.cert(),
        pdk,
        kps_keys=[world.kps, world.kps_old],
        trusted_signers=world.signers(),
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def pdk(world: World) -> bytes:
    return make_pdk(world.owner, _doc(world.kps))


# --------------------------------------------------------------------------- granted


def test_an_attested_host_gets_exactly_the_secrets_the_tenant_sealed(
    world: World, pdk: bytes
) -> None:
    cert = world.cert()
    result = _open(world, pdk, cert)
    answer = result.to_response()
    assert set(answer) == {"opening", "pdk_id", "kps_guardian"}
    secrets = open_shielding_answer(
        answer, world.host_a, pdk=pdk, certificate_id=certificate_id_of(cert)
    )
    assert secrets == SECRETS
    header = load_shielding_data(pdk).header
    assert (result.pdk_id, result.host_id, result.kps_guardian) == (
        header.pdk_id,
        "host-a",
        world.kps.guardian.id,
    )
    assert result.audit_details()["owner"] == world.owner.guardian.id


def test_the_answer_and_the_result_carry_no_secret_in_clear(world: World, pdk: bytes) -> None:
    result = _open(world, pdk)
    text = json.dumps(result.to_response()).encode() + repr(result).encode()
    text += json.dumps(result.audit_details()).encode()
    assert not any(marker in text for marker in SECRET_MARKERS)
    assert "hidden" in repr(SECRETS)
    assert SECRETS.admin.password not in repr(SECRETS)


def test_the_answer_for_host_a_does_not_open_with_host_b_key(world: World, pdk: bytes) -> None:
    answer = _open(world, pdk).to_response()  # a certificate of host A
    with pytest.raises(VerificationError, match="no wrapping for key"):
        open_shielding_answer(answer, world.host_b, pdk=pdk)


def test_a_pdk_named_by_a_second_kps_guardian_of_ours_opens_with_it(world: World) -> None:
    pdk = make_pdk(world.owner, _doc(world.kps_old))
    result = _open(world, pdk)
    assert result.kps_guardian == world.kps_old.guardian.id
    assert open_shielding_answer(result.to_response(), world.host_a, pdk=pdk) == SECRETS


def test_a_pdk_made_before_a_kps_key_rotation_still_opens(world: World, pdk: bytes) -> None:
    keys = rotated(world.kps)  # generation 1 is current, generation 0 still held
    result = open_shielding_data(
        world.cert(), pdk, kps_keys=[keys], trusted_signers=world.signers(), now=NOW
    )
    assert result.key_generation == 0
    assert open_shielding_answer(result.to_response(), world.host_a, pdk=pdk) == SECRETS


def test_a_pdk_sealed_to_a_key_generation_this_kps_does_not_hold_is_refused(
    world: World,
) -> None:
    keys = rotated(world.kps)
    newer = make_pdk(world.owner, keys.document)  # sealed to generation 1
    only_old = type(keys)(
        world.kps.guardian,
        _doc(world.kps),
        world.kps.signing_key,
        {world.kps.guardian.encryption_kid: world.kps.encryption_key},
    )
    with pytest.raises(ForeignShieldingDataError, match="does not hold") as refused:
        open_shielding_data(
            world.cert(), newer, kps_keys=[only_old], trusted_signers=world.signers(), now=NOW
        )
    assert refused.value.pdk_id == load_shielding_data(newer).header.pdk_id


def test_no_kps_key_is_a_usage_error(world: World, pdk: bytes) -> None:
    with pytest.raises(UsageError):
        open_shielding_data(world.cert(), pdk, kps_keys=[], trusted_signers={}, now=NOW)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("attack", PDK_ATTACKS, ids=[a.name for a in PDK_ATTACKS])
def test_a_forged_pdk_is_refused_with_its_reason(
    world: World, pdk: bytes, attack: PdkAttack
) -> None:
    forged = attack.forge(pdk, world.owner)
    with pytest.raises(KeyReleaseError) as refused:
        _open(world, forged)
    assert refused.value.reason == attack.reason
    assert refused.value.host_id == "host-a", "the certificate was verified first"
    assert not any(marker in str(refused.value).encode() for marker in SECRET_MARKERS)


CERTIFICATE_ROWS = [
    ("expired", lambda w: w.cert(issued=NOW - 9 * 3600), {}, CertificateExpiredError),
    ("not-yet-valid", lambda w: w.cert(issued=NOW + 3600), {}, CertificateExpiredError),
    (
        "untrusted-signer",
        lambda w: w.cert(key=ECKey.generate_key("P-256")),
        {},
        UntrustedCertificateSignerError,
    ),
    ("deny-before", lambda w: w.cert(), {"deny_before": NOW}, CertificateDeniedError),
    ("revoked", lambda w: w.cert(), {"revoked_hosts": frozenset({"host-a"})}, HostRevokedError),
]


@pytest.mark.parametrize(
    ("cert", "options", "error"),
    [row[1:] for row in CERTIFICATE_ROWS],
    ids=[row[0] for row in CERTIFICATE_ROWS],
)
def test_the_certificate_is_checked_as_for_a_release(
    world: World, pdk: bytes, cert: object, options: dict[str, object], error: type
) -> None:
    with pytest.raises(error):
        _open(world, pdk, cert(world), **options)  # type: ignore[operator]


# --------------------------------------------------------------------------- host side


def test_the_host_refuses_an_answer_for_another_pdk(world: World, pdk: bytes) -> None:
    other = make_pdk(world.owner, _doc(world.kps))
    answer = _open(world, other).to_response()
    with pytest.raises(VerificationError, match="another shielding data file"):
        open_shielding_answer(answer, world.host_a, pdk=pdk)


def test_the_host_refuses_an_answer_for_another_certificate(world: World, pdk: bytes) -> None:
    answer = _open(world, pdk, world.cert()).to_response()
    later = world.cert(issued=NOW - 30)
    with pytest.raises(VerificationError, match="another health certificate"):
        open_shielding_answer(
            answer, world.host_a, pdk=pdk, certificate_id=certificate_id_of(later)
        )


def _substitute(world: World, pdk: bytes, signer: ECKey, kid_guardian: str) -> dict[str, object]:
    """An answer with attacker-chosen secrets, encrypted to host A, signed by ``signer``."""
    evil = copy.deepcopy(SECRETS.to_dict())
    evil["admin"]["password"] = "attacker-knows-this"
    header = load_shielding_data(pdk).header
    cert = world.cert()
    binding = {
        "pdk_id": header.pdk_id,
        "pdk_sha256": hashlib.sha256(pdk).hexdigest(),
        "host_id": "host-a",
        "certificate_id": certificate_id_of(cert),
    }
    host_key = jose.import_public_jwk(jose.public_jwk(world.host_a), what="host")
    sealed = jose.encrypt_to_recipients(
        canonical_json(evil), [(jose.thumbprint(host_key), host_key)], aad=secrets_aad(**binding)
    )
    payload = {
        "type": "guardfab.shielding-opening",
        "version": 1,
        **binding,
        "kps_guardian": kid_guardian,
        "secrets": sealed,
    }
    token = jose.sign_compact(canonical_json(payload), signer, typ=OPENING_JWS_TYPE)
    return {"opening": token, "pdk_id": header.pdk_id, "kps_guardian": kid_guardian}


def test_the_host_refuses_secrets_substituted_by_someone_who_is_not_the_kps(
    world: World, pdk: bytes
) -> None:
    """Anyone can encrypt to the host's public key: the KPS guardian's signature decides."""
    mallory = ECKey.generate_key("P-256")
    forged = _substitute(world, pdk, mallory, world.kps.guardian.id)
    with pytest.raises(VerificationError, match="signature does not verify"):
        open_shielding_answer(forged, world.host_a, pdk=pdk)
    as_owner = _substitute(world, pdk, world.owner.signing_key, world.owner.guardian.id)
    with pytest.raises(VerificationError, match="not a KPS guardian"):
        open_shielding_answer(as_owner, world.host_a, pdk=pdk)


def test_the_host_refuses_a_tampered_answer(world: World, pdk: bytes) -> None:
    answer = _open(world, pdk).to_response()
    head, payload, signature = str(answer["opening"]).split(".")
    body = json.loads(b64url_decode(payload, what="test"))
    body["host_id"] = "host-b"
    edited = {**answer, "opening": f"{head}.{b64url_encode(canonical_json(body))}.{signature}"}
    with pytest.raises(VerificationError):
        open_shielding_answer(edited, world.host_a, pdk=pdk)
    with pytest.raises(FormatError):
        open_shielding_answer({"opening": 5}, world.host_a, pdk=pdk)


def test_certificate_id_of_reads_the_jti_and_rejects_non_tokens(world: World) -> None:
    cert = world.cert()
    claims = json.loads(b64url_decode(cert.split(".")[1], what="test"))
    assert certificate_id_of(cert) == claims["jti"]
    for bad in ("", "a.b", "x" * 20000):
        with pytest.raises(FormatError):
            certificate_id_of(bad)
