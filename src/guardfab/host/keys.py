"""The guarded host's own keys, kept in files readable only by root.

* The **host encryption key** (EC P-384): the Key Protection Service wraps VM
  keys to it (ECDH-ES+A256KW); every attestation binds its public half, and the
  health certificate names it in ``cnf``.
* The **host signing key** (host-key attestation mode only): registered at the
  HGS; it signs the attestation binding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guardfab.errors import UsageError
from guardfab.files import PRIVATE, atomic_write, read_bounded
from guardfab.formats import jose, keyfiles
from guardfab.formats.guardian import KeyAlgorithm

_MAX_KEY_BYTES = 16 * 1024


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
