"""Signed bindings for host-key and admin-group modes: compact JWS, detached payload.

The host signs :func:`~guardfab.attestation.binding.host_key_binding` (nonce,
host encryption key, canonical claims) with the key HGS knows it by: the
registered host key, or the key of its client certificate. The signature is a
standard compact JWS (RFC 7515) whose payload is detached (appendix F): the
verifier rebuilds the payload from its own nonce and the presented host key,
so a signature over anything else simply does not verify. The protected
header carries ``alg`` (checked against the key, never chosen by the token),
``typ`` (one per mode, so a signature for one mode is useless in the other)
and, for host keys, ``kid`` (the key's thumbprint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError

from guardfab.attestation.binding import host_key_binding
from guardfab.attestation.evidence import AdminGroupEvidence, HostKeyEvidence, canonical_claims
from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import canonical_json

HOST_KEY_TYP = "guardfab-host-key-attestation+jws"
ADMIN_GROUP_TYP = "guardfab-admin-group-attestation+jws"
#: What admin-group signatures bind as claims (the mode has no other claims).
ADMIN_GROUP_CLAIMS: dict[str, Any] = {"mode": "admin-group"}


class BindingSignatureError(VerificationError):
    """The signature over the attestation binding does not verify."""

    hint = "sign the binding of this challenge's nonce and host key with the registered key"


def sign_binding(
    private_key: jose.AsymmetricKey, payload: bytes, *, typ: str, kid: str | None = None
) -> str:
    """Sign ``payload`` as a compact JWS and detach the payload (host side, and tests)."""
    header: dict[str, Any] = {"alg": jose.signing_alg_for(private_key), "typ": typ}
    if kid is not None:
        header["kid"] = kid
    token = jws.serialize_compact(header, payload, private_key, algorithms=list(jose.SIGNING_ALGS))
    return jws.detach_content(token)


def verify_binding(
    token: str,
    public_key: jose.AsymmetricKey,
    payload: bytes,
    *,
    typ: str,
    kid: str | None = None,
) -> None:
    """Verify a detached compact JWS over ``payload`` with exactly ``public_key``.

    Raises:
        FormatError: the token is not a compact JWS.
        BindingSignatureError: wrong algorithm, type or key id, or a bad signature.
    """
    registry = jws.JWSRegistry(algorithms=[jose.signing_alg_for(public_key)])
    try:
        obj = jws.deserialize_compact(token, public_key, registry=registry, payload=payload)
    except JoseError as exc:
        raise BindingSignatureError(f"the binding signature does not verify ({exc.error})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError("the binding signature is not a compact JWS") from exc
    header = obj.headers()
    if header.get("typ") != typ:
        raise BindingSignatureError(f"the signature has type {header.get('typ')!r}, not {typ!r}")
    if "crit" in header:
        raise BindingSignatureError("critical JWS header parameters are not supported")
    if kid is not None and header.get("kid") != kid:
        raise BindingSignatureError("the signature's key id is not the registered key's")


def binding_payload(nonce: bytes, host_key: Mapping[str, Any], claims: bytes) -> bytes:
    """The detached payload: the binding of nonce, host key and canonical claims."""
    return host_key_binding(nonce, dict(host_key), claims)


def admin_group_claims() -> bytes:
    """The canonical claims every admin-group signature binds."""
    return canonical_json(ADMIN_GROUP_CLAIMS)


def host_key_evidence(
    signing_key: jose.AsymmetricKey,
    *,
    nonce: bytes,
    host_key: Mapping[str, Any],
    claims: Mapping[str, Any] | None = None,
) -> HostKeyEvidence:
    """Build host-key evidence on the host: sign the binding with the registered key.

    ``signing_key`` is the private host signing key (JOSE key); ``host_key`` the
    public JWK of the host encryption key the KPS will wrap VM keys to.
    """
    claims = dict(claims or {})
    payload = binding_payload(nonce, host_key, canonical_claims(claims))
    kid = jose.thumbprint(signing_key)
    signature = sign_binding(signing_key, payload, typ=HOST_KEY_TYP, kid=kid)
    return HostKeyEvidence(kid, signature, claims, dict(host_key))


def admin_group_evidence(
    certificate_key: jose.AsymmetricKey,
    certificates: Sequence[bytes],
    *,
    nonce: bytes,
    host_key: Mapping[str, Any],
) -> AdminGroupEvidence:
    """Build admin-group evidence on the host (deprecated mode): chain plus signed binding."""
    payload = binding_payload(nonce, host_key, admin_group_claims())
    signature = sign_binding(certificate_key, payload, typ=ADMIN_GROUP_TYP)
    return AdminGroupEvidence(tuple(certificates), signature, dict(host_key))
