"""The one place guardfab touches JOSE (RFC 7515-7518, 7638) through joserfc.

Everything here is pure: keys and bytes in, verified objects out. Algorithms
are allow-listed per use, so ``alg: none``, HMAC-with-a-public-key and other
algorithm-confusion tricks never reach joserfc's dispatch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from joserfc import jwe, jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError, VerificationError

#: JOSE signature algorithms guardfab accepts (RFC 7518 section 3).
SIGNING_ALGS: tuple[str, ...] = ("ES256", "ES384", "PS256")
#: JOSE key-wrapping algorithms guardfab accepts (RFC 7518 section 4).
WRAPPING_ALGS: tuple[str, ...] = ("ECDH-ES+A256KW", "RSA-OAEP-256")
#: The one content-encryption algorithm (AEAD) guardfab uses.
CONTENT_ENC = "A256GCM"

_CURVE_FOR_SIGNING_ALG = {"ES256": "P-256", "ES384": "P-384"}

AsymmetricKey = ECKey | RSAKey

#: Largest JWE ciphertext guardfab decrypts (base64url characters). joserfc's
#: default (64 KB) is below what a shielding data file legitimately carries
#: (384 KiB of files, base64 inside JSON, then encrypted); documents are bounded
#: as a whole by their loaders long before this.
MAX_JWE_CIPHERTEXT = 1024 * 1024
#: Largest compact JWS payload guardfab verifies (base64url characters); joserfc's
#: default (128 kB) is below a shielding data file, which signs its sealed secrets.
MAX_JWS_PAYLOAD = 2 * 1024 * 1024

_JWE_REGISTRY = jwe.JWERegistry(
    algorithms=[*WRAPPING_ALGS, CONTENT_ENC],
    verify_all_recipients=False,
)
_JWE_REGISTRY.max_ciphertext_length = MAX_JWE_CIPHERTEXT


def signing_alg_for(key: AsymmetricKey) -> str:
    """Return the JOSE signature algorithm guardfab uses for ``key``."""
    if isinstance(key, RSAKey):
        return "PS256"
    crv = key.as_dict(private=False)["crv"]
    for alg, curve in _CURVE_FOR_SIGNING_ALG.items():
        if curve == crv:
            return alg
    raise FormatError(f"EC curve {crv} is not allowed for signing (use P-256 or P-384)")


def wrapping_alg_for(key: AsymmetricKey) -> str:
    """Return the JOSE key-wrapping algorithm guardfab uses for ``key``."""
    return "RSA-OAEP-256" if isinstance(key, RSAKey) else "ECDH-ES+A256KW"


def import_public_jwk(value: Any, *, what: str) -> AsymmetricKey:
    """Import a public JWK (a dict) and refuse private parts, symmetric or unknown keys."""
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JWK object")
    kty = value.get("kty")
    if "d" in value:
        raise FormatError(f"{what}: a public key was expected but private parts are present")
    try:
        if kty == "EC":
            key: AsymmetricKey = ECKey.import_key(value)
        elif kty == "RSA":
            key = RSAKey.import_key(value)
        else:
            raise FormatError(f"{what}: key type {kty!r} is not allowed (EC or RSA)")
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{what}: not a valid JWK") from exc
    _check_key_strength(key, what=what)
    return key


#: Long-lived public keys kept by their exact JWK members (see import_known_public_jwk).
KNOWN_KEYS_CACHE_SIZE = 4096
_KNOWN_KEYS: OrderedDict[tuple[tuple[str, str], ...], AsymmetricKey] = OrderedDict()
_KNOWN_KEYS_LOCK = threading.Lock()


def import_known_public_jwk(value: Any, *, what: str) -> AsymmetricKey:
    """:func:`import_public_jwk` for a key seen again and again (a host key, a signer).

    A host's encryption key is in every health certificate issued to it and in
    every key release wrapped to it; its import (point decoding and validation)
    is kept by the JWK's exact members, so any difference imports afresh. Only
    keys that imported without error are kept, and keys are never changed after
    import, so sharing one is safe. Not for one-time keys (an ECDH ephemeral
    key): they would only push the long-lived ones out.
    """
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return import_public_jwk(value, what=what)
    members = tuple(sorted(value.items()))
    with _KNOWN_KEYS_LOCK:
        key = _KNOWN_KEYS.get(members)
        if key is not None:
            _KNOWN_KEYS.move_to_end(members)
            return key
    key = import_public_jwk(value, what=what)
    with _KNOWN_KEYS_LOCK:
        _KNOWN_KEYS[members] = key
        while len(_KNOWN_KEYS) > KNOWN_KEYS_CACHE_SIZE:
            _KNOWN_KEYS.popitem(last=False)
    return key


def _check_key_strength(key: AsymmetricKey, *, what: str) -> None:
    if isinstance(key, RSAKey):
        bits = key.raw_value.key_size
        if bits < 2048:
            raise FormatError(f"{what}: RSA key of {bits} bits is too small (2048 at least)")
    elif key.as_dict(private=False)["crv"] not in ("P-256", "P-384", "P-521"):
        raise FormatError(f"{what}: EC curve is not allowed")


def public_jwk(key: AsymmetricKey) -> dict[str, Any]:
    """Return the public JWK members of ``key`` (no ``kid`` or other extras)."""
    full = key.as_dict(private=False)
    required = ("kty", "crv", "x", "y") if full["kty"] == "EC" else ("kty", "n", "e")
    return {name: full[name] for name in required}


def thumbprint(key: AsymmetricKey) -> str:
    """RFC 7638 SHA-256 thumbprint of ``key``: guardfab's key identifier."""
    return str(key.thumbprint())


@dataclass(frozen=True)
class VerifiedJWS:
    """A JWS whose signature was checked: its protected header and payload bytes."""

    header: dict[str, Any]
    payload: bytes


def sign_compact(payload: bytes, key: AsymmetricKey, *, typ: str) -> str:
    """Sign ``payload`` as a compact JWS with ``typ`` and ``kid`` (the key thumbprint)."""
    header = {"alg": signing_alg_for(key), "typ": typ, "kid": thumbprint(key)}
    return jws.serialize_compact(header, payload, key, algorithms=list(SIGNING_ALGS))


def verify_compact(token: str, key: AsymmetricKey, *, typ: str, what: str) -> VerifiedJWS:
    """Verify a compact JWS against exactly ``key`` and require ``typ``.

    Raises:
        FormatError: the token is not a JWS.
        VerificationError: wrong algorithm for the key, wrong type or bad signature.
    """
    if not isinstance(token, str) or token.count(".") != 2:
        raise FormatError(f"{what}: not a compact JWS")
    registry = jws.JWSRegistry(algorithms=[signing_alg_for(key)])
    registry.max_payload_length = MAX_JWS_PAYLOAD
    try:
        obj = jws.deserialize_compact(token, key, registry=registry)
    except JoseError as exc:
        raise VerificationError(f"{what}: signature does not verify ({exc.error})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{what}: malformed JWS") from exc
    header = obj.headers()
    if header.get("typ") != typ:
        raise VerificationError(f"{what}: expected type {typ!r}, got {header.get('typ')!r}")
    if "crit" in header:
        raise VerificationError(f"{what}: critical header parameters are not supported")
    return VerifiedJWS(header=dict(header), payload=obj.payload)


def encrypt_to_recipients(
    plaintext: bytes,
    recipients: list[tuple[str, AsymmetricKey]],
    *,
    aad: bytes,
) -> dict[str, Any]:
    """Encrypt ``plaintext`` once (A256GCM) and wrap its key to every (kid, key) recipient.

    ``aad`` is authenticated by the AEAD tag: binding, for example, the exact
    guardian set, so a recipient list cannot be edited without detection.
    Returns the JWE General JSON Serialization (RFC 7516 section 7.2.1).
    """
    if not recipients:
        raise FormatError("at least one recipient is required")
    obj = jwe.GeneralJSONEncryption({"enc": CONTENT_ENC}, plaintext, aad=aad)
    for kid, key in recipients:
        obj.add_recipient({"alg": wrapping_alg_for(key), "kid": kid}, key)
    return dict(jwe.encrypt_json(obj, None, registry=_JWE_REGISTRY))


def decrypt_for_recipient(
    document: Any, kid: str, private_key: AsymmetricKey, *, aad: bytes, what: str
) -> bytes:
    """Decrypt a General JSON JWE as recipient ``kid`` and require the expected ``aad``.

    Raises:
        FormatError: the document is not a JWE of the expected shape.
        VerificationError: no wrapping for ``kid``, or a wrapping, ciphertext,
            tag or AAD that does not authenticate.
    """
    if not isinstance(document, dict) or not isinstance(document.get("recipients"), list):
        raise FormatError(f"{what}: not a JWE General JSON document")
    mine = [r for r in document["recipients"] if _recipient_kid(r) == kid]
    if not mine:
        raise VerificationError(f"{what}: it has no wrapping for key {kid}")
    if document.get("aad") is None:
        raise VerificationError(f"{what}: the AAD binding is missing")
    # Decrypt only our own wrapping: others' wrappings are not ours to try.
    single = {**document, "recipients": mine[:1]}
    try:
        result = jwe.decrypt_json(single, private_key, registry=_JWE_REGISTRY)  # type: ignore[arg-type]
    except JoseError as exc:
        raise VerificationError(f"{what}: decryption failed ({exc.error})") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{what}: malformed JWE") from exc
    if result.aad != aad:
        raise VerificationError(f"{what}: the authenticated data does not match this object")
    return bytes(result.plaintext or b"")


def _recipient_kid(recipient: Any) -> str | None:
    if not isinstance(recipient, dict) or not isinstance(recipient.get("header"), dict):
        return None
    kid = recipient["header"].get("kid")
    return kid if isinstance(kid, str) else None
