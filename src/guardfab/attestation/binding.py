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
from collections.abc import Mapping
from typing import Any

from guardfab.formats.encoding import canonical_json

#: Domain separation: these bytes can never be mistaken for another guardfab digest.
QUOTE_DOMAIN = b"guardfab/attestation/quote/v1\x00"
HOST_KEY_DOMAIN = b"guardfab/attestation/host-key/v1\x00"


def host_key_digest(host_key_jwk: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical public JWK of the host encryption key.

    Computed once per exact JWK when every member is a plain string (a JWK
    always is; the key is its members, so no two JWKs share one); anything
    else is canonicalized every time.
    """
    members = string_members(host_key_jwk)
    if members is not None:
        return digest_of_members(members)
    return hashlib.sha256(canonical_json(dict(host_key_jwk))).digest()


def string_members(jwk: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """A JWK's members, in its order, if every name and value is a plain ``str``, else None.

    The key of the caches of a JWK's checks and digest: ``1`` and ``True`` are
    equal as Python keys but not as JSON, and a ``str`` subclass could redefine
    equality, so only plain-string JWKs are cached. What is cached is a function
    of the members alone (canonical JSON sorts them), so the members are not
    sorted for the key: a host sends its key in one order.
    """
    if all(type(k) is str and type(v) is str for k, v in jwk.items()):
        return tuple(jwk.items())
    return None


@functools.lru_cache(maxsize=4096)
def digest_of_members(members: tuple[tuple[str, str], ...]) -> bytes:
    """:func:`host_key_digest` of the all-string JWK with these members."""
    return hashlib.sha256(canonical_json(dict(members))).digest()


def quote_qualifying_data(nonce: bytes, host_key_jwk: Mapping[str, Any]) -> bytes:
    """The 32 bytes a host passes as the quote's qualifying data."""
    return qualifying_data(nonce, host_key_digest(host_key_jwk))


def qualifying_data(nonce: bytes, key_digest: bytes) -> bytes:
    """:func:`quote_qualifying_data` from the host key's :func:`host_key_digest`."""
    return hashlib.sha256(QUOTE_DOMAIN + nonce + key_digest).digest()


def host_key_binding(nonce: bytes, host_key_jwk: Mapping[str, Any], claims: bytes) -> bytes:
    """The bytes a host signs with its registered host key in host-key mode.

    ``claims`` is the canonical JSON of whatever else the host asserts (may be ``b"{}"``).
    """
    return HOST_KEY_DOMAIN + nonce + host_key_digest(host_key_jwk) + hashlib.sha256(claims).digest()
