"""The verified-certificate cache: what it saves never lets a stale or forged certificate pass.

A KPS verifies one host's certificate on every key release, so the signature
check and claim parsing of the exact token under the exact signer key are
cached. These tests attack the cache: a certificate verified once must still be
refused when it expires, when a deny-before date is set, when its signer is no
longer trusted, and a token that differs in one byte, or a key that reuses the
signer's id, must be verified afresh.
"""

from __future__ import annotations

import pytest
from joserfc.jwk import ECKey

from guardfab.formats import health_certificate as hc
from guardfab.formats import jose
from guardfab.formats.health_certificate import (
    ExpiredCertificateError,
    HealthCertificate,
    HealthCertificateError,
    UntrustedSignerError,
    issue_health_certificate,
    verify_health_certificate,
)

NOW = 1_800_000_000
LIFETIME = 8 * 3600
SIGNER = ECKey.generate_key("P-256")
KID = jose.thumbprint(SIGNER)
TRUSTED = {KID: SIGNER}
HOST_KEY = jose.public_jwk(ECKey.generate_key("P-256"))


def _token(host_id: str = "host-a") -> str:
    cert = HealthCertificate("hgs", host_id, "host-key", HOST_KEY, NOW, NOW + LIFETIME)
    return issue_health_certificate(cert, SIGNER)


@pytest.fixture
def cached() -> str:
    """A token verified once, so that it now sits in the cache."""
    token = _token()
    verify_health_certificate(token, TRUSTED, now=NOW + 10)
    assert hc._VERIFIED.get((token, KID)) is not None
    return token


def test_a_cached_certificate_verifies_without_a_signature_check(
    cached: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_verify(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("verified again")

    monkeypatch.setattr(jose, "verify_compact", no_verify)
    cert = verify_health_certificate(cached, TRUSTED, now=NOW + 20)
    assert cert.host_id == "host-a"
    assert cert.signer == KID


def test_a_cached_certificate_still_expires(cached: str) -> None:
    with pytest.raises(ExpiredCertificateError, match="expired"):
        verify_health_certificate(cached, TRUSTED, now=NOW + LIFETIME + hc.DEFAULT_LEEWAY)


def test_a_cached_certificate_is_still_not_valid_before_it_was_issued(cached: str) -> None:
    with pytest.raises(ExpiredCertificateError, match="future"):
        verify_health_certificate(cached, TRUSTED, now=NOW - hc.DEFAULT_LEEWAY - 1)


def test_a_deny_before_date_set_after_caching_refuses_it(cached: str) -> None:
    with pytest.raises(ExpiredCertificateError, match="deny-before"):
        verify_health_certificate(cached, TRUSTED, now=NOW + 10, deny_before=NOW + 1)


def test_a_signer_removed_after_caching_is_refused(cached: str) -> None:
    with pytest.raises(UntrustedSignerError):
        verify_health_certificate(cached, {}, now=NOW + 10)


def test_another_key_under_the_signers_id_does_not_reuse_the_verification(cached: str) -> None:
    impostor = {KID: ECKey.generate_key("P-256")}  # a mapping that lies about the id
    with pytest.raises(HealthCertificateError, match="signature"):
        verify_health_certificate(cached, impostor, now=NOW + 10)


def test_a_token_differing_in_one_byte_is_verified_afresh(cached: str) -> None:
    header, payload, signature = cached.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(HealthCertificateError):
        verify_health_certificate(f"{header}.{payload}.{flipped}", TRUSTED, now=NOW + 10)


def test_a_caller_changing_its_copy_does_not_change_the_next_callers(cached: str) -> None:
    first = verify_health_certificate(cached, TRUSTED, now=NOW + 10)
    first.host_key["x"] = "attacker-chosen"
    second = verify_health_certificate(cached, TRUSTED, now=NOW + 10)
    assert second.host_key == HOST_KEY


def test_a_refused_token_is_not_cached() -> None:
    token = _token("host-b")
    header, payload, _signature = token.split(".")
    forged = f"{header}.{payload}.{_token('host-c').split('.')[2]}"
    for _ in range(2):
        with pytest.raises(HealthCertificateError):
            verify_health_certificate(forged, TRUSTED, now=NOW + 10)
    assert hc._VERIFIED.get((forged, KID)) is None
