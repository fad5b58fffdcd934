"""Health certificates: the HGS's signed statement that a host was found healthy.

A health certificate is an EAT Attestation Result (EAR, draft-ietf-rats-ear)
carried as a JWT (RFC 7519), explicitly typed (RFC 8725 section 3.11) so no
other guardfab JWS can be passed off as one, and bound to the host's encryption
key with a confirmation claim (``cnf.jwk``, RFC 7800). The Key Protection
Service wraps a VM's keys to exactly that key.

Pure: the caller passes the time in, and the trusted attestation signers.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    canonical_json,
    load_json_document,
    require_dict,
)
from guardfab.formats.guardian import VerifiedCache

HEALTH_CERT_TYPE = "guardfab-health+jwt"
EAR_PROFILE = "tag:github.com,2023:veraison/ear"
SUBMOD = "guardfab-host"
DEFAULT_LIFETIME = 8 * 3600
#: Clock skew tolerated between the HGS nodes and the KPS, in seconds.
DEFAULT_LEEWAY = 60
MAX_TOKEN_BYTES = 16 * 1024
#: Verified certificates kept (one per host: a host presents the same certificate
#: for every key release until it re-attests, every 8 h by default).
VERIFIED_CACHE_SIZE = 4096


class HealthCertificateError(VerificationError):
    """A health certificate that must not be honoured (and why)."""

    hint = "the host must attest again to obtain a fresh health certificate"


class UntrustedSignerError(HealthCertificateError):
    """The certificate is signed by a key that is not a trusted attestation signer."""

    hint = "add the HGS attestation signer to the trusted signers, or re-attest with a trusted HGS"


class ExpiredCertificateError(HealthCertificateError):
    """The certificate is expired, not yet valid, or issued before the deny-before date."""


def new_certificate_id() -> str:
    """A fresh random 128-bit identifier (base64url) for the ``jti`` claim."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class HealthCertificate:
    """The claims of a health certificate, after verification."""

    issuer: str
    host_id: str
    mode: str
    host_key: dict[str, Any]
    issued_at: int
    expires_at: int
    cert_id: str = field(default_factory=new_certificate_id)
    policies: tuple[str, ...] = ()
    signer: str = ""

    def claims(self) -> dict[str, Any]:
        """The JWT claims set (EAR with guardfab's submodule and cnf)."""
        return {
            "iss": self.issuer,
            "sub": self.host_id,
            "iat": self.issued_at,
            "nbf": self.issued_at,
            "exp": self.expires_at,
            "jti": self.cert_id,
            "eat_profile": EAR_PROFILE,
            "ear.verifier-id": {"developer": "guardfab", "build": "guardfab-hgs"},
            "cnf": {"jwk": self.host_key},
            "submods": {
                SUBMOD: {
                    "ear.status": "affirming",
                    "guardfab.mode": self.mode,
                    "guardfab.policies": list(self.policies),
                }
            },
        }


def issue_health_certificate(cert: HealthCertificate, signing_key: jose.AsymmetricKey) -> str:
    """Sign ``cert`` with the HGS attestation signing key; returns a compact JWT."""
    if cert.expires_at <= cert.issued_at:
        raise FormatError("a health certificate must expire after it is issued")
    jose.import_known_public_jwk(cert.host_key, what="health certificate host key")
    return jose.sign_compact(canonical_json(cert.claims()), signing_key, typ=HEALTH_CERT_TYPE)


def verify_health_certificate(
    token: str,
    trusted_signers: Mapping[str, jose.AsymmetricKey],
    *,
    now: float,
    deny_before: float | None = None,
    leeway: int = DEFAULT_LEEWAY,
) -> HealthCertificate:
    """Verify a health certificate for the Key Protection Service.

    The signer is looked up by ``kid`` among ``trusted_signers`` (id -> public
    key); the algorithm comes from that key, never from the token, so ``none``
    and HMAC-with-a-public-key tokens are refused before any claim is read.

    Raises:
        FormatError: not a health certificate at all.
        UntrustedSignerError: ``kid`` is not a trusted attestation signer.
        HealthCertificateError: bad signature or claims.
        ExpiredCertificateError: outside its validity, or issued before ``deny_before``.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise FormatError("health certificate: not a token of acceptable size")
    kid = _unverified_kid(token)
    signer = trusted_signers.get(kid)
    if signer is None:
        raise UntrustedSignerError(f"health certificate: signer {kid!r} is not trusted")
    cert = _verified_claims(token, kid, signer)
    _check_times(cert, now=now, deny_before=deny_before, leeway=leeway)
    return cert


def _verified_claims(token: str, kid: str, signer: jose.AsymmetricKey) -> HealthCertificate:
    """The claims of ``token`` once its signature verified under ``signer`` (or was found to).

    A host presents one certificate for every key release until it re-attests,
    so the signature check and claim parsing of those exact bytes under that
    exact key are cached. What depends on the moment is checked on every call:
    whether the signer is still trusted (the lookup before this), validity times
    and deny-before (after it), and host revocation (by the KPS).
    """
    cache_key = (token, jose.thumbprint(signer))
    cert = _VERIFIED.get(cache_key)
    if cert is None:
        try:
            verified = jose.verify_compact(
                token, signer, typ=HEALTH_CERT_TYPE, what="health certificate"
            )
        except VerificationError as exc:
            raise HealthCertificateError(str(exc)) from exc
        claims = load_json_document(verified.payload, what="health certificate claims")
        cert = _from_claims(require_dict(claims, what="health certificate claims"), signer=kid)
        _VERIFIED.put(cache_key, cert)
    # The one mutable member: a caller's change must not reach the next caller.
    return replace(cert, host_key=dict(cert.host_key))


#: (token, signer key thumbprint) -> the claims its signature was found to cover.
_VERIFIED: VerifiedCache[tuple[str, str], HealthCertificate] = VerifiedCache(VERIFIED_CACHE_SIZE)


def _unverified_kid(token: str) -> str:
    """The ``kid`` of the protected header: only used to pick the key to verify with."""
    parts = token.split(".")
    if len(parts) != 3:
        raise FormatError("health certificate: not a compact JWS")
    try:
        header = require_dict(
            json.loads(b64url_decode(parts[0], what="health certificate header")),
            what="health certificate header",
        )
    except (ValueError, RecursionError) as exc:
        raise FormatError("health certificate: header is not JSON") from exc
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise FormatError("health certificate: header has no key id")
    return kid


def _from_claims(claims: dict[str, Any], *, signer: str) -> HealthCertificate:
    try:
        submod = claims["submods"][SUBMOD]
        if claims["eat_profile"] != EAR_PROFILE or submod["ear.status"] != "affirming":
            raise HealthCertificateError("health certificate: not an affirming guardfab EAR")
        cert = HealthCertificate(
            issuer=_text(claims["iss"]),
            host_id=_text(claims["sub"]),
            mode=_text(submod["guardfab.mode"]),
            host_key=_mapping(claims["cnf"]["jwk"]),
            issued_at=_number(claims["iat"]),
            expires_at=_number(claims["exp"]),
            cert_id=_text(claims["jti"]),
            policies=tuple(_text(p) for p in _sequence(submod["guardfab.policies"])),
            signer=signer,
        )
    except (KeyError, TypeError) as exc:
        raise HealthCertificateError("health certificate: a required claim is missing") from exc
    if claims.get("nbf") != cert.issued_at:
        raise HealthCertificateError("health certificate: nbf must equal iat")
    jose.import_public_jwk(cert.host_key, what="health certificate cnf key")
    return cert


def _sequence(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("expected a list claim")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string claim")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected an object claim")
    return value


def _number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer claim")
    return value


def _check_times(
    cert: HealthCertificate, *, now: float, deny_before: float | None, leeway: int
) -> None:
    if cert.issued_at > now + leeway:
        raise ExpiredCertificateError("health certificate: issued in the future")
    if cert.expires_at <= now - leeway:
        raise ExpiredCertificateError("health certificate: expired")
    if deny_before is not None and cert.issued_at < deny_before:
        raise ExpiredCertificateError(
            "health certificate: issued before the deny-before date set by the HGS administrator"
        )
