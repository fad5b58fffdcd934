"""Canonical bytes and text encodings shared by every format.

Everything that gets signed is serialized by :func:`canonical_json` (RFC 8785,
JSON Canonicalization Scheme), so a signer and a verifier always agree on the
exact bytes.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Set as AbstractSet
from typing import Any

import pybase64
import rfc8785

from guardfab.errors import FormatError

#: The largest JSON document any guardfab loader accepts (PDKs hold at most
#: 384 KB of files; base64 and envelopes roughly double that).
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024

#: The padding the strict decoder wants, by length mod 4 (1 is never valid).
_PADDING = ("", "", "==", "=")
#: base64url's two characters in place of the standard alphabet's ``+`` and ``/``.
_URL_ALTCHARS = b"-_"
_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: By length mod 4: the low bits of the last character that carry no data.
_UNUSED_BITS = {0: 0, 2: 0x0F, 3: 0x03}


#: RFC 8785's integer domain: what an IEEE 754 double holds exactly.
_INT_MAX = 2**53 - 1
#: Leaves both encoders write alike whatever their value.
_LEAVES = frozenset({str, bool, type(None)})
_C_ENCODER = json.JSONEncoder(
    ensure_ascii=False, check_circular=False, sort_keys=True, separators=(",", ":")
)


def canonical_json(value: Any) -> bytes:
    """Serialize ``value`` to RFC 8785 canonical JSON bytes.

    ``rfc8785`` is pure Python and was a large share of the HGS's CPU per request
    (audit records, certificates, KPs). For values that are only exact
    dict/list/tuple/str/int/bool/None, with ASCII keys, no floats and integers in
    RFC 8785's domain, the C JSON encoder with sorted keys writes the same bytes:
    ASCII keys sort the same by UTF-16 unit and by code point, and both escape
    exactly ``"``, ``\\`` and the C0 controls, with the same short forms. Anything
    else (floats, non-ASCII keys, subclasses, big integers, lone surrogates) goes
    to ``rfc8785``, which then serializes or refuses it exactly as it always did.
    """
    try:
        simple = _is_simple(value)
    except RecursionError:
        simple = False
    if simple:
        try:
            return _C_ENCODER.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: rfc8785 refuses it with its own error
    return rfc8785.dumps(value)


def _is_simple(value: Any) -> bool:
    """Whether the C encoder is proven to write ``value`` as RFC 8785 does.

    Exact types only (``type(x) is``), so subclasses with their own ``__str__``
    or ordering never take the fast path. Strings, the bulk of every document,
    are checked inline rather than by a call each: the check must stay much
    cheaper than the encoding it saves.
    """
    kind = type(value)
    if kind is dict:
        for key in value:
            if type(key) is not str or not key.isascii():
                return False
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return _is_simple_scalar(value)
    for item in items:
        if type(item) not in _LEAVES and not _is_simple(item):
            break
    else:
        return True
    return False


def _is_simple_scalar(value: Any) -> bool:
    """Whether a non-container is a leaf both encoders write alike (ints in the domain)."""
    if type(value) in _LEAVES:
        return True
    return type(value) is int and -_INT_MAX <= value <= _INT_MAX


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url (RFC 7515 section 2)."""
    return pybase64.b64encode(data, altchars=_URL_ALTCHARS).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str) -> bytes:
    """Decode canonical unpadded base64url, naming ``what`` in the error if it is not.

    Only one encoding of any byte string is accepted (no padding, no ``+``/``/``,
    no stray trailing bits), so signed data cannot be re-encoded unnoticed.
    Evidence carries boot logs of 100 KB, decoded on every host's first
    attestation after a reboot, so the text goes through C calls only: three
    searches refuse the standard alphabet's own characters (``pybase64`` takes
    them beside ``-`` and ``_``, as the standard library does), and
    ``pybase64``'s validating SIMD decoder refuses anything else, non-ASCII text
    included (docs/adr/0020: ~6x faster than ``binascii`` on a 16 K log).
    """
    if type(text) is not str:
        if not isinstance(text, str):
            raise FormatError(f"{what}: not valid base64url")
        text = str.__str__(text)  # an exact copy: a subclass could redefine ``in``
    rest = len(text) % 4
    if rest == 1 or "+" in text or "/" in text or "=" in text:
        raise FormatError(f"{what}: not valid base64url")
    try:
        data = pybase64.b64decode(text + _PADDING[rest], altchars=_URL_ALTCHARS, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{what}: not valid base64url") from exc
    # Canonical means the bits the last character carries beyond the data are zero.
    if rest and _B64URL_ALPHABET.index(text[-1]) & _UNUSED_BITS[rest]:
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


def reject_unknown_fields(obj: dict[str, Any], allowed: AbstractSet[str], *, what: str) -> None:
    """Reject fields this version does not know, so nothing unsigned rides along."""
    if obj.keys() <= allowed:  # one C call when every field is known (every request)
        return
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FormatError(f"{what}: unknown field(s) {', '.join(unknown)}")
