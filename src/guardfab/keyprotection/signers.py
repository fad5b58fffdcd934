"""Trusted attestation signers: which health certificates a KPS honours.

The guardfab counterpart of ``Add-HgsKeyProtectionAttestationSignerCertificate``:
the HGS administrator names the public keys whose health certificates this KPS
accepts -- by default its own attestation service's, and possibly another HGS's
(a KPS-only fabric, or a second site) as published at its
``/attestation/v1/signers`` (a JWK Set).

A signer is identified by the RFC 7638 thumbprint of its key, which is also the
``kid`` its health certificates carry. A JWK that names another ``kid``, holds
private parts or is not a signature key is refused rather than silently fixed.
"""

from __future__ import annotations

from typing import Any

from guardfab.errors import FormatError
from guardfab.formats import jose

#: More than this many keys in one JWK Set is not a signer list.
MAX_SIGNERS_PER_SET = 16
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "n", "e")


def load_signer_keys(document: Any) -> dict[str, jose.AsymmetricKey]:
    """Load a JWK or a JWK Set of attestation signers; return id -> public key.

    Raises:
        FormatError: not a JWK (Set), private parts present, a ``kid`` that is not
            the key's thumbprint, a key for another use, or a key guardfab does not
            sign with.
    """
    if isinstance(document, dict) and "keys" in document:
        keys = document["keys"]
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_SIGNERS_PER_SET:
            raise FormatError(f"signer JWK Set: 'keys' must list 1 to {MAX_SIGNERS_PER_SET} keys")
    else:
        keys = [document]
    signers: dict[str, jose.AsymmetricKey] = {}
    for index, jwk in enumerate(keys):
        key = _signer_key(jwk, what=f"signer key #{index}")
        signers[jose.thumbprint(key)] = key
    return signers


def _signer_key(jwk: Any, *, what: str) -> jose.AsymmetricKey:
    if not isinstance(jwk, dict):
        raise FormatError(f"{what}: expected a JWK object")
    if _PRIVATE_MEMBERS & set(jwk):
        raise FormatError(f"{what}: a public key was expected but private parts are present")
    if jwk.get("use", "sig") != "sig":
        raise FormatError(f"{what}: not a signature key (use {jwk.get('use')!r})")
    key = jose.import_public_jwk({k: jwk[k] for k in _PUBLIC_MEMBERS if k in jwk}, what=what)
    jose.signing_alg_for(key)  # P-256, P-384 or RSA: what health certificates are signed with
    kid = jwk.get("kid")
    if kid is not None and kid != jose.thumbprint(key):
        raise FormatError(f"{what}: its kid is not the key's RFC 7638 thumbprint")
    return key


def public_signer_jwk(key: jose.AsymmetricKey) -> dict[str, Any]:
    """The JWK form a signer is stored and listed in (with ``kid`` and ``use``)."""
    return {**jose.public_jwk(key), "kid": jose.thumbprint(key), "use": "sig"}
