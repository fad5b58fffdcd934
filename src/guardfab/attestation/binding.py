"""How a host's encryption key is bound into its attestation evidence.

The Key Protection Service wraps a VM's keys to the host encryption key named in
the health certificate (``cnf``). That key must therefore be the one the
healthy TPM (or the registered host key) vouched for in the same attestation:
otherwise a healthy host's evidence could carry an attacker's key.

TPM mode: the quote's qualifying data (``extraData``) is
``SHA-256(DOMAIN || nonce || SHA-256(canonical JWK of the host key))``.
Host-key mode: the host key signs the same digest (see ``host_key_binding``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from guardfab.formats.encoding import canonical_json

#: Domain separation: these bytes can never be mistaken for another guardfab digest.
QUOTE_DOMAIN = b"guardfab/attestation/quote/v1\x00"
HOST_KEY_DOMAIN = b"guardfab/attestation/host-key/v1\x00"


def host_key_digest(host_key_jwk: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical public JWK of the host encryption key."""
    return hashlib.sha256(canonical_json(host_key_jwk)).digest()


def quote_qualifying_data(nonce: bytes, host_key_jwk: dict[str, Any]) -> bytes:
    """The 32 bytes a host passes as the quote's qualifying data."""
    return hashlib.sha256(QUOTE_DOMAIN + nonce + host_key_digest(host_key_jwk)).digest()


def host_key_binding(nonce: bytes, host_key_jwk: dict[str, Any], claims: bytes) -> bytes:
    """The bytes a host signs with its registered host key in host-key mode.

    ``claims`` is the canonical JSON of whatever else the host asserts (may be ``b"{}"``).
    """
    return HOST_KEY_DOMAIN + nonce + host_key_digest(host_key_jwk) + hashlib.sha256(claims).digest()
