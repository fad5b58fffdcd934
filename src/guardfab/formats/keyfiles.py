"""Key files: generate key pairs and read/write them as PEM (PKCS#8 / SPKI) or JWK.

Private keys may be passphrase-encrypted PKCS#8 (``BestAvailableEncryption`` of
``cryptography``, through joserfc). Passphrases are passed in memory only,
never on a command line, and never appear in an error message.
"""

from __future__ import annotations

import json

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError, NotAuthorizedError
from guardfab.formats import jose
from guardfab.formats.guardian import KeyAlgorithm

_CURVES = {KeyAlgorithm.EC_P256: "P-256", KeyAlgorithm.EC_P384: "P-384"}
_RSA_BITS = 3072


def generate_key(algorithm: KeyAlgorithm) -> jose.AsymmetricKey:
    """Generate a fresh private key of the family ``algorithm`` (OS randomness)."""
    if algorithm in _CURVES:
        return ECKey.generate_key(_CURVES[algorithm])
    return RSAKey.generate_key(_RSA_BITS)


def private_key_pem(key: jose.AsymmetricKey, passphrase: str | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted when a passphrase is given."""
    return key.as_pem(private=True, password=passphrase or None)


def public_key_pem(key: jose.AsymmetricKey) -> bytes:
    """SubjectPublicKeyInfo PEM of the public part of ``key``."""
    return key.as_pem(private=False)


def load_private_key(
    data: bytes, passphrase: str | None = None, *, what: str
) -> jose.AsymmetricKey:
    """Load a PEM private key (EC P-256/P-384 or RSA >= 2048).

    Raises:
        NotAuthorizedError: the key is encrypted and the passphrase is missing or wrong.
        FormatError: not a PEM private key of an allowed type.
    """
    if b"PRIVATE KEY" not in data:
        raise FormatError(f"{what}: not a PEM private key")
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and not passphrase:
        raise NotAuthorizedError(f"{what}: the key is encrypted; a passphrase is needed")
    key = _import_private(data, passphrase if encrypted else None, what=what)
    # Re-import the public half through the same checks as any public key.
    jose.import_public_jwk(jose.public_jwk(key), what=what)
    return key


def _import_private(data: bytes, passphrase: str | None, *, what: str) -> jose.AsymmetricKey:
    password = passphrase.encode("utf-8") if passphrase else None
    try:
        raw = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        if password is not None:
            raise NotAuthorizedError(f"{what}: wrong passphrase, or not a valid key") from None
        raise FormatError(f"{what}: not a valid PEM private key") from exc
    except UnsupportedAlgorithm as exc:
        raise FormatError(f"{what}: unsupported key algorithm") from exc
    if isinstance(raw, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(raw)
    if isinstance(raw, rsa.RSAPrivateKey):
        return RSAKey.import_key(raw)
    raise FormatError(f"{what}: only EC and RSA private keys are allowed")


def load_public_key(data: bytes, *, what: str) -> jose.AsymmetricKey:
    """Load a public key from SPKI PEM or a JWK JSON object."""
    stripped = data.strip()
    if stripped.startswith(b"{"):
        try:
            return jose.import_public_jwk(json.loads(stripped), what=what)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers
            raise FormatError(f"{what}: not valid JWK JSON") from exc
    if b"PUBLIC KEY" not in stripped:
        raise FormatError(f"{what}: neither a PEM public key nor a JWK")
    try:
        raw = serialization.load_pem_public_key(stripped)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"{what}: not a valid PEM public key") from exc
    if isinstance(raw, ec.EllipticCurvePublicKey):
        key: jose.AsymmetricKey = ECKey.import_key(raw)
    elif isinstance(raw, rsa.RSAPublicKey):
        key = RSAKey.import_key(raw)
    else:
        raise FormatError(f"{what}: only EC and RSA public keys are allowed")
    return jose.import_public_jwk(jose.public_jwk(key), what=what)
