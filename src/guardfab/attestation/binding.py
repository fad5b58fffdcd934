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

import functools
import hashlib
from typing import Any

from guardfab.formats.encoding import canonical_json

#: Domain separation: these bytes can never be mistaken for another guardfab digest.
QUOTE_DOMAIN = b"guardfab/attestation/quote/v1\x00"
HOST_KEY_DOMAIN = b"guardfab/attestation/host-key/v1\x00"


def host_key_digest(host_key_jwk: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical public JWK of the host encryption key.

    Computed once per exact JWK when every member is a string (a JWK always
    is; the key is its sorted members, so no two JWKs share one); anything
    else is canonicalized every time.
    """
    if all(type(k) is str and type(v) is str for k, v in host_key_jwk.items()):
        return _digest_of_members(tuple(sorted(host_key_jwk.items())))
    return hashlib.sha256(canonical_json(host_key_jwk)).digest()


@functools.lru_cache(maxsize=4096)
def _digest_of_members(members: tuple[tuple[str, str], ...]) -> bytes:
    return hashlib.sha256(canonical_json(dict(members))).digest()


def quote_qualifying_data(nonce: bytes, host_key_jwk: dict[str, Any]) -> bytes:
    """The 32 bytes a host passes as the quote's qualifying data."""
    return hashlib.sha256(QUOTE_DOMAIN + nonce + host_key_digest(host_key_jwk)).digest()


def host_key_binding(nonce: bytes, host_key_jwk: dict[str, Any], claims: bytes) -> bytes:
    """The bytes a host signs with its registered host key in host-key mode.

    ``claims`` is the canonical JSON of whatever else the host asserts (may be ``b"{}"``).
    """
    return HOST_KEY_DOMAIN + nonce + host_key_digest(host_key_jwk) + hashlib.sha256(claims).digest()
