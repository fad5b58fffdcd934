"""Canonical bytes and text encodings shared by every format.

Everything that gets signed is serialized by :func:`canonical_json` (RFC 8785,
JSON Canonicalization Scheme), so a signer and a verifier always agree on the
exact bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import rfc8785

from guardfab.errors import FormatError

#: The largest JSON document any guardfab loader accepts (PDKs hold at most
#: 384 KB of files; base64 and envelopes roughly double that).
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: By length mod 4: the low bits of the last character that carry no data.
_UNUSED_BITS = {0: 0, 2: 0x0F, 3: 0x03}


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` to RFC 8785 canonical JSON bytes."""
    return rfc8785.dumps(value)


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str) -> bytes:
    """Decode canonical unpadded base64url, naming ``what`` in the error if it is not.

    Only one encoding of any byte string is accepted (no padding, no ``+``/``/``,
    no stray trailing bits), so signed data cannot be re-encoded unnoticed.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise FormatError(f"{what}: not valid base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what}: not valid base64url") from exc
    # Canonical means the bits the last character carries beyond the data are zero.
    unused_mask = _UNUSED_BITS[len(text) % 4]
    if unused_mask and _B64URL_ALPHABET.index(text[-1]) & unused_mask:
        raise FormatError(f"{what}: not canonical base64url")
    return data


def load_json_document(data: bytes, *, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse untrusted JSON bytes with a size bound, naming ``what`` in errors."""
    if not isinstance(data, bytes | bytearray):
        # E.g. a store row edited to hold text: report it, do not crash on it.
        raise FormatError(f"{what}: expected bytes, found {type(data).__name__}")
    if len(data) > max_bytes:
        raise FormatError(f"{what}: {len(data)} bytes is larger than the limit of {max_bytes}")
    try:
        return json.loads(data.decode("utf-8"))
    # ValueError also covers Python's integer-digit limit, not only JSONDecodeError.
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid UTF-8 JSON ({exc.__class__.__name__})") from exc


def require_dict(value: Any, *, what: str) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object, else raise a FormatError naming ``what``."""
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JSON object")
    return value


def require_str(obj: dict[str, Any], key: str, *, what: str, max_len: int = 4096) -> str:
    """Return ``obj[key]`` as a bounded string, else raise a FormatError naming the field."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{what}: field '{key}' must be a string")
    if len(value) > max_len:
        raise FormatError(f"{what}: field '{key}' is longer than {max_len} characters")
    return value


def require_int(obj: dict[str, Any], key: str, *, what: str) -> int:
    """Return ``obj[key]`` as a non-negative int (bools rejected), else raise FormatError."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{what}: field '{key}' must be a non-negative integer")
    return value


def reject_unknown_fields(obj: dict[str, Any], allowed: set[str], *, what: str) -> None:
    """Reject fields this version does not know, so nothing unsigned rides along."""
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(f"{what}: unknown field(s) {', '.join(unknown)}")
