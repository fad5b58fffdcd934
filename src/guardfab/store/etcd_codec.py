"""How the etcd backend lays out values and reads etcd's JSON gateway answers.

etcd decides expiry with leases, which are whole seconds, renewed on a leader
change and run on the server's clock; the store interface decides expiry with
the writer's injected clock (ADR 0004). So every value carries its expiry stamp
in a small header, and a reader filters on it:

    version (1 byte) | expires_at (8 bytes, order-preserving) | 0x00 | payload

The stamp bytes sort like the float they encode, and "no expiry" is ``ff`` * 8,
above every finite stamp. That lets one etcd compare decide liveness on the
server: ``value > version | stamp(now) | 0x01`` holds exactly when the stored
stamp is later than ``now`` (the ``0x00`` after the stamp makes an equal stamp
compare lower), and it is false for an absent key (etcd fails value compares on
missing keys).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from guardfab.store.errors import StoreSchemaError

#: First byte of every value this backend writes; a new layout gets a new byte.
VALUE_FORMAT = b"\x01"
_NO_EXPIRY = b"\xff" * 8
_HEADER_LENGTH = 10
_SIGN_BIT = 1 << 63
_ALL_BITS = (1 << 64) - 1


def encode_stamp(when: float) -> bytes:
    """Return 8 bytes that sort (as bytes) in the same order as the floats they encode."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", when))
    bits = bits ^ _ALL_BITS if bits & _SIGN_BIT else bits | _SIGN_BIT
    return struct.pack(">Q", bits)


def decode_stamp(raw: bytes) -> float:
    """Invert :func:`encode_stamp`."""
    (bits,) = struct.unpack(">Q", raw)
    bits = bits ^ _SIGN_BIT if bits & _SIGN_BIT else bits ^ _ALL_BITS
    (when,) = struct.unpack(">d", struct.pack(">Q", bits))
    return float(when)


def encode_value(payload: bytes, expires_at: float | None) -> bytes:
    """Return the stored form of ``payload`` with its expiry stamp."""
    stamp = _NO_EXPIRY if expires_at is None else encode_stamp(expires_at)
    return VALUE_FORMAT + stamp + b"\x00" + payload


def live_threshold(now: float) -> bytes:
    """Return the bytes a stored value must sort above to be live at ``now``."""
    return VALUE_FORMAT + encode_stamp(now) + b"\x01"


def decode_value(key: str, stored: bytes) -> tuple[bytes, float | None]:
    """Return ``(payload, expires_at)`` from a stored value.

    Raises:
        StoreSchemaError: the value was not written by this backend (another tool
            wrote into guardfab's key prefix, or a newer guardfab did).
    """
    if len(stored) < _HEADER_LENGTH or stored[:1] != VALUE_FORMAT or stored[9] != 0:
        raise StoreSchemaError(
            f"etcd key {key!r} does not hold a value in guardfab's format "
            "(written by another tool or a newer guardfab?); use a key prefix of its own"
        )
    stamp = stored[1:9]
    expires_at = None if stamp == _NO_EXPIRY else decode_stamp(stamp)
    return stored[_HEADER_LENGTH:], expires_at


def b64(data: bytes) -> str:
    """Encode bytes for the gateway's JSON (protobuf ``bytes`` fields are base64)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """Decode a base64 field of a gateway answer (absent means empty)."""
    if text is None:
        return b""
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(text, validate=True)


def as_int(value: object) -> int:
    """Read an int64 field of a gateway answer (JSON strings; absent means 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected an integer")
    return int(value)


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One key as etcd holds it, before the expiry filter."""

    key: str
    payload: bytes
    expires_at: float | None
    mod_revision: int
    create_revision: int
    lease: int


def parse_kv(kv: dict[str, Any], namespace: bytes) -> StoredKey:
    """Turn a gateway ``KeyValue`` under ``namespace`` into a :class:`StoredKey`."""
    raw_key = unb64(kv.get("key"))
    key = raw_key[len(namespace) :].decode("ascii")
    payload, expires_at = decode_value(key, unb64(kv.get("value")))
    return StoredKey(
        key,
        payload,
        expires_at,
        as_int(kv.get("mod_revision")),
        as_int(kv.get("create_revision")),
        as_int(kv.get("lease")),
    )
