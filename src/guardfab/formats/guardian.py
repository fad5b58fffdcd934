"""Guardians: a named pair of public keys, one to wrap keys to, one to verify signatures.

A guardian stands for whoever may run or own a shielded VM: the tenant (the
owner guardian) or a fabric's Key Protection Service (an HGS guardian). Its
public document is a compact JWS, self-signed by the guardian's signing key, so
the encryption key cannot be swapped without the signing key. Trust in the
signing key itself comes from the person importing it (compare the id shown).

A guardian's id is the RFC 7638 thumbprint of its signing key; the JWE
recipient id is the thumbprint of its encryption key.

A ``kps`` guardian may rotate its encryption key without changing its identity:
it publishes a new document for the same signing key with a higher
``key_generation`` (absent means 0, so documents made before rotation existed
keep their bytes). Only the signing key can make such a document, and a
verifier that saw generation *n* refuses anything older (ADR 0002).

Verified documents are cached by their exact bytes: a KP embeds the same few
documents in every generation, and a KPS release loads them twice.
"""

from __future__ import annotations

import enum
import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from guardfab.errors import FormatError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    canonical_json,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)

GUARDIAN_JWS_TYPE = "guardfab-guardian+jws"
GUARDIAN_PAYLOAD_TYPE = "guardfab.guardian"
GUARDIAN_VERSION = 1
#: A guardian document is two public keys and a name; anything bigger is not one.
MAX_GUARDIAN_BYTES = 16 * 1024
_NAME_MAX = 128
_FIELDS = {"type", "version", "name", "kind", "signing_key", "encryption_key", "key_generation"}
#: I-JSON integers: larger ones do not survive every JSON parser.
MAX_KEY_GENERATION = 2**53 - 1
#: Verified documents kept by their bytes; a fabric has few guardians, a KP at most 32.
DOCUMENT_CACHE_SIZE = 256

_K = TypeVar("_K")
_V = TypeVar("_V")


class GuardianKind(enum.StrEnum):
    """Who a guardian stands for."""

    TENANT = "tenant"
    #: The Key Protection Service of an HGS; it signs the egress KPs it mints.
    KPS = "kps"


class KeyAlgorithm(enum.StrEnum):
    """Key-pair families a guardian can be made of (JOSE registry algorithms)."""

    EC_P256 = "ec-p256"  # ES256 + ECDH-ES+A256KW
    EC_P384 = "ec-p384"  # ES384 + ECDH-ES+A256KW
    RSA_3072 = "rsa-3072"  # PS256 + RSA-OAEP-256


def validate_name(name: str) -> str:
    """Return ``name`` if it is a usable guardian name (also a directory name)."""
    if not name or len(name) > _NAME_MAX:
        raise FormatError(f"guardian name must be 1 to {_NAME_MAX} characters")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if name.startswith(".") or not set(name) <= allowed:
        raise FormatError(
            f"guardian name {name!r} may use only letters, digits, '-', '_' and '.'"
            " and must not start with '.'"
        )
    return name


@dataclass(frozen=True)
class Guardian:
    """The public half of a guardian."""

    name: str
    kind: GuardianKind
    signing_key: jose.AsymmetricKey
    encryption_key: jose.AsymmetricKey
    #: Which encryption key of a ``kps`` guardian this is (0 for tenants and first keys).
    key_generation: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.key_generation <= MAX_KEY_GENERATION:
            raise FormatError("a guardian's key generation is out of range")
        if self.key_generation and self.kind is not GuardianKind.KPS:
            raise FormatError("only a 'kps' guardian rotates its encryption key by generation")

    @functools.cached_property
    def id(self) -> str:
        """The guardian's id: the thumbprint of its signing key (computed once)."""
        return jose.thumbprint(self.signing_key)

    @functools.cached_property
    def encryption_kid(self) -> str:
        """The JWE recipient id of this guardian: the thumbprint of its encryption key."""
        return jose.thumbprint(self.encryption_key)

    def payload(self) -> dict[str, Any]:
        """The signed content of the guardian document.

        ``key_generation`` appears only from 1 on: one byte form per document,
        and generation-0 documents stay exactly as they were before rotation.
        """
        payload: dict[str, Any] = {
            "type": GUARDIAN_PAYLOAD_TYPE,
            "version": GUARDIAN_VERSION,
            "name": self.name,
            "kind": self.kind.value,
            "signing_key": jose.public_jwk(self.signing_key),
            "encryption_key": jose.public_jwk(self.encryption_key),
        }
        if self.key_generation:
            payload["key_generation"] = self.key_generation
        return payload

    def summary(self) -> dict[str, Any]:
        """A JSON-able description for people and scripts (public data only)."""
        return {
            "name": self.name,
            "id": self.id,
            "kind": self.kind.value,
            "signing_alg": jose.signing_alg_for(self.signing_key),
            "wrapping_alg": jose.wrapping_alg_for(self.encryption_key),
            "encryption_kid": self.encryption_kid,
            "key_generation": self.key_generation,
        }


def sign_guardian_document(guardian: Guardian, private_signing_key: jose.AsymmetricKey) -> bytes:
    """Produce the public, self-signed guardian document (compact JWS bytes)."""
    if jose.thumbprint(private_signing_key) != guardian.id:
        raise FormatError("the private signing key does not belong to this guardian")
    token = jose.sign_compact(
        canonical_json(guardian.payload()), private_signing_key, typ=GUARDIAN_JWS_TYPE
    )
    return token.encode("ascii")


class VerifiedCache(Generic[_K, _V]):
    """A small LRU of verification results, keyed by exactly what was verified.

    Keyed by the bytes (and, where the key is not in them, the verifying key's
    thumbprint), never by an id alone: input that differs in one byte is
    verified afresh. Only successes are kept (a failure raises every time), and
    the values are immutable, so sharing one between callers is safe.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_VERIFIED: VerifiedCache[bytes, Guardian] = VerifiedCache(DOCUMENT_CACHE_SIZE)


def load_guardian_document(data: bytes) -> Guardian:
    """Load and verify a self-signed guardian document.

    The signature is checked with the signing key the document names before
    any other field is used; the header's ``kid`` must be that key's thumbprint.
    A document already verified (the very same bytes) is served from a cache.

    Raises:
        FormatError: not a guardian document, wrong version, too big.
        VerificationError: the self-signature does not verify.
    """
    data = bytes(data)
    cached = _VERIFIED.get(data)
    if cached is not None:
        return cached
    guardian = _verify_guardian_document(data)
    _VERIFIED.put(data, guardian)
    return guardian


def _verify_guardian_document(data: bytes) -> Guardian:
    what = "guardian document"
    if len(data) > MAX_GUARDIAN_BYTES:
        raise FormatError(f"{what}: larger than {MAX_GUARDIAN_BYTES} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not ASCII text") from exc
    claimed_key = _claimed_signing_key(token, what=what)
    verified = jose.verify_compact(token, claimed_key, typ=GUARDIAN_JWS_TYPE, what=what)
    if verified.header.get("kid") != jose.thumbprint(claimed_key):
        raise FormatError(f"{what}: the key id does not match the signing key")
    return _guardian_from_payload(verified.payload, what=what)


def _claimed_signing_key(token: str, *, what: str) -> jose.AsymmetricKey:
    """Read only the signing key out of the unverified payload, to verify with it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise FormatError(f"{what}: not a compact JWS")
    raw = b64url_decode(parts[1], what=f"{what} payload")
    try:
        body = require_dict(json.loads(raw), what=what)
    # ValueError also covers Python's integer-digit limit, not only JSONDecodeError.
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: payload is not JSON") from exc
    return jose.import_public_jwk(body.get("signing_key"), what=f"{what} signing_key")


def _guardian_from_payload(payload: bytes, *, what: str) -> Guardian:
    body = require_dict(json.loads(payload), what=what)
    reject_unknown_fields(body, _FIELDS, what=what)
    if body.get("type") != GUARDIAN_PAYLOAD_TYPE:
        raise FormatError(f"{what}: type is not {GUARDIAN_PAYLOAD_TYPE!r}")
    version = require_int(body, "version", what=what)
    if version != GUARDIAN_VERSION:
        raise FormatError(f"{what}: version {version} is not supported (expected 1)")
    kind_text = require_str(body, "kind", what=what)
    try:
        kind = GuardianKind(kind_text)
    except ValueError as exc:
        raise FormatError(f"{what}: unknown guardian kind {kind_text!r}") from exc
    key_generation = 0
    if "key_generation" in body:
        key_generation = require_int(body, "key_generation", what=what)
        if key_generation < 1:
            raise FormatError(f"{what}: key_generation is written only from 1 on")
    return Guardian(
        name=validate_name(require_str(body, "name", what=what)),
        kind=kind,
        key_generation=key_generation,
        signing_key=jose.import_public_jwk(body["signing_key"], what=f"{what} signing_key"),
        encryption_key=jose.import_public_jwk(
            body.get("encryption_key"), what=f"{what} encryption_key"
        ),
    )
