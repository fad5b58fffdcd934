"""Health certificates: issue/verify, and every way a forged or stale one is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable

import pytest
from joserfc.jwk import ECKey

from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode, canonical_json
from guardfab.formats.health_certificate import (
    HEALTH_CERT_TYPE,
    ExpiredCertificateError,
    HealthCertificate,
    HealthCertificateError,
    UntrustedSignerError,
    issue_health_certificate,
    verify_health_certificate,
)

NOW = 1_800_000_000
SIGNER = ECKey.generate_key("P-256")
OTHER_SIGNER = ECKey.generate_key("P-256")
HOST_KEY = jose.public_jwk(ECKey.generate_key("P-384"))
ATTACKER_KEY = jose.public_jwk(ECKey.generate_key("P-384"))
TRUSTED = {jose.thumbprint(SIGNER): SIGNER}


def _cert(**changes: object) -> HealthCertificate:
    fields: dict[str, object] = {
        "issuer": "hgs.example",
        "host_id": "host-a",
        "mode": "tpm",
        "host_key": HOST_KEY,
        "issued_at": NOW,
        "expires_at": NOW + 8 * 3600,
        "policies": ("Hgs_SecureBootEnabled",),
    }
    fields.update(changes)
    return HealthCertificate(**fields)  # type: ignore[arg-type]


def _token(**changes: object) -> str:
    return issue_health_certificate(_cert(**changes), SIGNER)


def _verify(token: str, **kwargs: object) -> HealthCertificate:
    kwargs.setdefault("now", NOW + 10)
    return verify_health_certificate(token, TRUSTED, **kwargs)  # type: ignore[arg-type]


def test_round_trip_carries_cnf_and_claims() -> None:
    cert = _verify(_token())
    assert cert.host_id == "host-a"
    assert cert.host_key == HOST_KEY
    assert cert.policies == ("Hgs_SecureBootEnabled",)
    assert cert.signer == jose.thumbprint(SIGNER)
    assert cert.expires_at - cert.issued_at == 8 * 3600


def _resigned(edit: Callable[[dict[str, object]], None], key: jose.AsymmetricKey = SIGNER) -> str:
    claims = _cert().claims()
    edit(claims)
    return jose.sign_compact(canonical_json(claims), key, typ=HEALTH_CERT_TYPE)


def _swap_cnf_keep_signature() -> str:
    header, _payload, signature = _token().split(".")
    claims = _cert(host_key=ATTACKER_KEY).claims()
    return f"{header}.{b64url_encode(canonical_json(claims))}.{signature}"


def _alg_none() -> str:
    header = {"alg": "none", "typ": HEALTH_CERT_TYPE, "kid": jose.thumbprint(SIGNER)}
    payload = canonical_json(_cert().claims())
    return f"{b64url_encode(canonical_json(header))}.{b64url_encode(payload)}."


def _hmac_with_public_key() -> str:
    """The classic confusion: HS256 keyed with the verifier's public key bytes."""
    header = {"alg": "HS256", "typ": HEALTH_CERT_TYPE, "kid": jose.thumbprint(SIGNER)}
    signing_input = (
        f"{b64url_encode(canonical_json(header))}.{b64url_encode(canonical_json(_cert().claims()))}"
    )
    mac = hmac.new(SIGNER.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def _wrong_type() -> str:
    return jose.sign_compact(canonical_json(_cert().claims()), SIGNER, typ="JWT")


ATTACKS: dict[str, tuple[Callable[[], str], type[Exception]]] = {
    "expired": (
        lambda: _token(issued_at=NOW - 9 * 3600, expires_at=NOW - 3600),
        ExpiredCertificateError,
    ),
    "not yet valid": (
        lambda: _token(issued_at=NOW + 3600, expires_at=NOW + 7200),
        ExpiredCertificateError,
    ),
    "untrusted signer": (
        lambda: issue_health_certificate(_cert(), OTHER_SIGNER),
        UntrustedSignerError,
    ),
    "signer kid forged": (
        lambda: _resigned(lambda c: None, OTHER_SIGNER).replace(
            _resigned(lambda c: None, OTHER_SIGNER).split(".")[0],
            b64url_encode(
                canonical_json(
                    {"alg": "ES256", "typ": HEALTH_CERT_TYPE, "kid": jose.thumbprint(SIGNER)}
                )
            ),
        ),
        HealthCertificateError,
    ),
    "cnf key swapped": (_swap_cnf_keep_signature, HealthCertificateError),
    "alg none": (_alg_none, VerificationError),
    "hmac with public key": (_hmac_with_public_key, VerificationError),
    "wrong typ": (_wrong_type, VerificationError),
    "not affirming": (
        lambda: _resigned(
            lambda c: c["submods"]["guardfab-host"].update({"ear.status": "contraindicated"})
        ),  # type: ignore[index]
        HealthCertificateError,
    ),
    "missing cnf": (lambda: _resigned(lambda c: c.pop("cnf")), HealthCertificateError),
    "nbf differs": (
        lambda: _resigned(lambda c: c.update({"nbf": NOW - 100000})),
        HealthCertificateError,
    ),
    "garbage": (lambda: "not.a.token", FormatError),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused(name: str) -> None:
    make, error = ATTACKS[name]
    with pytest.raises(error):
        _verify(make())


def test_deny_before_refuses_older_certificates() -> None:
    token = _token()
    _verify(token, deny_before=NOW)  # issued exactly at the deny date: accepted
    with pytest.raises(ExpiredCertificateError, match="deny-before"):
        _verify(token, deny_before=NOW + 1)


def test_expiry_boundary_with_leeway() -> None:
    token = _token(expires_at=NOW + 100)
    _verify(token, now=NOW + 100 + 59)
    with pytest.raises(ExpiredCertificateError):
        _verify(token, now=NOW + 100 + 60)


def test_issue_refuses_inverted_lifetime_and_bad_host_key() -> None:
    with pytest.raises(FormatError):
        _token(expires_at=NOW)
    with pytest.raises(FormatError):
        _token(host_key={"kty": "oct", "k": base64.urlsafe_b64encode(b"k").decode()})


def test_flipped_signature_byte_is_refused() -> None:
    token = _token()
    head, payload, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    with pytest.raises(HealthCertificateError):
        _verify(f"{head}.{payload}.{flipped}")


def test_claims_are_ear_shaped() -> None:
    payload = json.loads(base64.urlsafe_b64decode(_token().split(".")[1] + "=="))
    assert payload["eat_profile"] == "tag:github.com,2023:veraison/ear"
    assert payload["submods"]["guardfab-host"]["ear.status"] == "affirming"
    assert payload["cnf"]["jwk"] == HOST_KEY
