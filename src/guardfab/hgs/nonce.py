"""Attestation challenges: stateless, MAC-protected nonces that expire.

A nonce is ``version || 16 random bytes || expiry (u64, seconds) || HMAC-SHA256``
under a key only the HGS nodes hold, base64url encoded. Any HGS node can check
one without shared state; the store then records its id so each nonce is used
once (see ``HgsService.attest``). Time is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from guardfab.errors import FormatError, VerificationError
from guardfab.formats.encoding import b64url_decode, b64url_encode

_VERSION = 1
_LAYOUT = struct.Struct(">B16sQ")
_MAC_SIZE = 32
#: Default time a host has to answer a challenge.
DEFAULT_NONCE_TTL = 120


class NonceError(VerificationError):
    """A challenge that is forged, expired or already used."""

    hint = "request a new challenge (POST /attestation/v1/challenge) and attest again"


@dataclass(frozen=True)
class Nonce:
    """A checked challenge: its bytes (what the evidence binds), id and expiry."""

    value: bytes
    nonce_id: str
    expires_at: int

    @property
    def token(self) -> str:
        """The base64url form sent to and from the host."""
        return b64url_encode(self.value)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def issue_nonce(key: bytes, *, now: float, ttl: int = DEFAULT_NONCE_TTL) -> Nonce:
    """Make a fresh challenge valid for ``ttl`` seconds."""
    body = _LAYOUT.pack(_VERSION, secrets.token_bytes(16), int(now) + ttl)
    return _parsed(body + _mac(key, body))


def _parsed(value: bytes) -> Nonce:
    _version, random_part, expires_at = _LAYOUT.unpack_from(value)
    return Nonce(value=value, nonce_id=b64url_encode(random_part), expires_at=expires_at)


def check_nonce(key: bytes, token: str, *, now: float) -> Nonce:
    """Check a challenge's MAC and expiry (not its single use: the store does that).

    Raises:
        FormatError: not a nonce of this version.
        NonceError: forged (MAC) or expired.
    """
    value = b64url_decode(token, what="nonce")
    if len(value) != _LAYOUT.size + _MAC_SIZE or value[0] != _VERSION:
        raise FormatError("nonce: wrong size or version")
    body, mac = value[: _LAYOUT.size], value[_LAYOUT.size :]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise NonceError("nonce: not issued by this HGS")
    nonce = _parsed(value)
    if nonce.expires_at <= now:
        raise NonceError("nonce: expired")
    return nonce
