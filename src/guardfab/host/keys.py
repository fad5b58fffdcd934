"""The guarded host's own keys, kept in files readable only by root.

* The **host encryption key** (EC P-384): the Key Protection Service wraps VM
  keys to it (ECDH-ES+A256KW); every attestation binds its public half, and the
  health certificate names it in ``cnf``.
* The **host signing key** (host-key attestation mode only): registered at the
  HGS; it signs the attestation binding. In a file it is used through
  :class:`FileSigner`; on a PKCS#11 token through
  :class:`guardfab.host.signer.Pkcs11Signer` (both are ``HostSigner``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from guardfab.errors import FormatError, UsageError
from guardfab.files import PRIVATE, atomic_write, read_bounded
from guardfab.formats import jose, keyfiles
from guardfab.formats.guardian import KeyAlgorithm

_MAX_KEY_BYTES = 16 * 1024
_PSS_SALT = 32
_EC_SIZES = {"ES256": (32, hashes.SHA256), "ES384": (48, hashes.SHA384)}


def load_or_create_key(
    path: Path, algorithm: KeyAlgorithm = KeyAlgorithm.EC_P384
) -> jose.AsymmetricKey:
    """Load the private key at ``path``; create it (0600) on first use."""
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"directory {path.parent} does not exist")
        atomic_write(path, keyfiles.private_key_pem(keyfiles.generate_key(algorithm)), mode=PRIVATE)
    mode = path.stat().st_mode & 0o077
    if mode:
        raise UsageError(f"{path} is readable by group or others", hint=f"chmod 600 {path}")
    data = read_bounded(path, limit=_MAX_KEY_BYTES, what="host key")
    return keyfiles.load_private_key(data, what=f"host key {path}")


def public_jwk(key: jose.AsymmetricKey) -> dict[str, Any]:
    """The public JWK the HGS sees (exactly the RFC 7638 members)."""
    return jose.public_jwk(key)


class FileSigner:
    """A private key held in memory (loaded from a PEM file, or given by a test)."""

    def __init__(self, key: jose.AsymmetricKey, description: str = "in-memory key") -> None:
        self._key = key
        self._public = jose.import_public_jwk(jose.public_jwk(key), what=description)
        self._alg = jose.signing_alg_for(key)
        self._key_id = jose.thumbprint(self._public)  # asked at every attestation
        self._description = description

    @classmethod
    def open(cls, path: Path) -> FileSigner:
        """Load the PEM key at ``path`` (0600); never create one.

        Raises:
            UsageError: the file is missing or readable by group or others.
            FormatError: not a PEM private key of an allowed type.
        """
        if not path.exists():
            raise UsageError(
                f"the host signing key {path} does not exist",
                hint="run 'guardfab host configure' to create it (then register the identity)",
            )
        return cls(load_or_create_key(path), f"key file {path}")

    @property
    def public_key(self) -> jose.AsymmetricKey:
        """The public half."""
        return self._public

    @property
    def alg(self) -> str:
        """ES256, ES384 or PS256."""
        return self._alg

    @property
    def key_id(self) -> str:
        """The RFC 7638 thumbprint."""
        return self._key_id

    @property
    def description(self) -> str:
        """``key file PATH``."""
        return self._description

    def sign(self, signing_input: bytes) -> bytes:
        """Raw JOSE signature with the in-memory key."""
        raw = self._key.private_key
        if isinstance(raw, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_PSS_SALT)
            return raw.sign(signing_input, pss, hashes.SHA256())
        if not isinstance(raw, ec.EllipticCurvePrivateKey):
            raise FormatError(f"{self._description}: not an EC or RSA private key")
        size, digest = _EC_SIZES[self._alg]
        r, s = decode_dss_signature(raw.sign(signing_input, ec.ECDSA(digest())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
