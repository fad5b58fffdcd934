"""The two bindings of a key protector's guardian set that do not need its outer signature.

* :class:`TransportKey`, what is wrapped, and who unwraps it: any
  :class:`GuardianKeyPair`, or a KPS's :class:`KpsKeys` across its key generations;
* :func:`guardian_set_payload`: what the owner signs (``guardian_set``). Version 1
  binds every guardian's id, kind and encryption key id. Version 2 binds a
  ``kps`` guardian by id and kind only, so its KPS can rotate its encryption
  key (a newer self-signed document for the same signing key) without the
  owner; a tenant guardian is still bound with its encryption key id.
* :func:`wrapping_aad` and :func:`check_wrapping`: the AEAD additional data of
  the JWE wrapping, and the wrapping's shape (one recipient per guardian, each
  with the algorithm its key calls for), so a KP whose set was edited and
  re-signed by anyone still fails to unwrap for the real guardians.

Split out of :mod:`guardfab.formats.key_protector` to keep each module small;
everything here is pure.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from guardfab.errors import FormatError, InvalidInputError, UsageError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.formats.guardian import (
    MAX_GUARDIAN_BYTES,
    Guardian,
    GuardianKind,
    VerifiedCache,
    load_guardian_document,
)

#: JOSE ``typ`` of the owner's statement of the guardian set.
GUARDIAN_SET_JWS_TYPE = "guardfab-kp-guardian-set+jws"
#: I-JSON integers: larger ones do not survive every JSON parser.
MAX_GENERATION = 2**53 - 1
#: ``type`` member of the owner's statement of the guardian set.
GUARDIAN_SET_TYPE = "guardfab.kp-guardian-set"
#: ``type`` member of the wrapping's additional authenticated data.
WRAPPING_AAD_TYPE = "guardfab.kp-wrapping"
#: The KP format this code mints; :data:`KP_VERSIONS` it loads.
KP_VERSION = 2
KP_VERSIONS = (1, 2)
TRANSPORT_KEY_BYTES = 32

_WRAPPING_FIELDS = {"protected", "iv", "ciphertext", "tag", "aad", "recipients"}
#: Decoded sizes of the A256GCM parts: 96-bit IV, 32-byte key, 128-bit tag.
_WRAPPING_SIZES = (("iv", 12), ("ciphertext", TRANSPORT_KEY_BYTES), ("tag", 16))
_ECDH = "ECDH-ES+A256KW"
#: The curves a guardian's EC encryption key may be on (JWK name -> curve, coordinate bytes).
_EC_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}
#: Verified guardian-set statements kept (about one per KP a KPS serves).
STATEMENT_CACHE_SIZE = 4096
#: (statement token, owner id) -> the payload its signature covers. The owner id
#: is the thumbprint of the key that verified it, so the key is in the cache key.
_STATEMENTS: VerifiedCache[tuple[str, str], bytes] = VerifiedCache(STATEMENT_CACHE_SIZE)


class TransportKey:
    """The VM's 32-byte transport key; its bytes never show in a repr, log or error."""

    __slots__ = ("_secret",)
    #: Unhashable: a key should not become a dict key or set member by accident.
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, secret: bytes) -> None:
        if len(secret) != TRANSPORT_KEY_BYTES:
            raise FormatError(f"a transport key is {TRANSPORT_KEY_BYTES} bytes")
        self._secret = bytes(secret)

    @classmethod
    def generate(cls) -> TransportKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(TRANSPORT_KEY_BYTES))

    def reveal(self) -> bytes:
        """The key bytes, for deriving disk, vTPM and migration keys; never print them."""
        return self._secret

    def __eq__(self, other: object) -> bool:
        """Compare in constant time, so timing does not leak how many bytes match."""
        if not isinstance(other, TransportKey):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    def __repr__(self) -> str:
        return "TransportKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a transport key is not picklable: it would leave memory in clear")


class GuardianKeyPair(Protocol):
    """A guardian with its private keys (``guardfab.tenant.guardians.GuardianKeys`` fits).

    A protocol rather than the store's class, so this pure module does not import
    the file-backed store and a KPS can hand in its own key holder.
    """

    @property
    def guardian(self) -> Guardian: ...
    @property
    def signing_key(self) -> jose.AsymmetricKey: ...
    @property
    def encryption_key(self) -> jose.AsymmetricKey: ...


@dataclass(frozen=True)
class KpsKeys:
    """A KPS guardian across its key generations: what a KPS re-keys KPs with.

    It fits :class:`GuardianKeyPair` (its ``encryption_key`` is the current
    one), and adds what rotation needs: the current generation's self-signed
    document, which an egress KP embeds, and every older encryption key still
    held, so a KP wrapped to an older generation still unwraps (no downtime).

    Attributes:
        guardian: the current generation (the newest the KPS re-keys KPs to).
        document: its self-signed document, as published.
        signing_key: the KPS's signing key (its identity, the same in every generation).
        encryption_keys: every private encryption key held, by encryption key id.
    """

    guardian: Guardian
    document: bytes = field(repr=False)
    signing_key: jose.AsymmetricKey = field(repr=False)
    encryption_keys: Mapping[str, jose.AsymmetricKey] = field(repr=False)

    def __post_init__(self) -> None:
        if self.guardian.kind is not GuardianKind.KPS:
            raise UsageError("KPS keys must be those of a 'kps' guardian")
        if self.guardian.encryption_kid not in self.encryption_keys:
            raise UsageError("the current generation's encryption key is not among the keys held")

    @property
    def encryption_key(self) -> jose.AsymmetricKey:
        """The current generation's private encryption key."""
        return self.encryption_keys[self.guardian.encryption_kid]

    @functools.cached_property
    def signing_key_id(self) -> str:
        """The thumbprint of ``signing_key`` (checked on every re-key, computed once)."""
        return jose.thumbprint(self.signing_key)


def wrapping_aad(
    kp_id: str,
    generation: int,
    owner: str,
    guardian_ids: Iterable[str],
    *,
    version: int = KP_VERSION,
) -> bytes:
    """The AEAD additional data of a wrapping: what the AES-GCM tag binds.

    Binding the set here, not only in a signature, means that a KP whose set was
    edited and re-signed by anyone (even under another owner) fails to unwrap.
    The version is bound too, so a v2 wrapping cannot pass for a v1 KP's.
    """
    return canonical_json(
        {
            "type": WRAPPING_AAD_TYPE,
            "version": version,
            "kp_id": kp_id,
            "generation": generation,
            "owner": owner,
            "guardians": sorted(guardian_ids),
        }
    )


def _member(guardian: Guardian, version: int) -> dict[str, Any]:
    member = {"id": guardian.id, "kind": guardian.kind.value}
    if version == 1 or guardian.kind is not GuardianKind.KPS:
        member["encryption_kid"] = guardian.encryption_kid
    return member


def guardian_set_payload(
    kp_id: str, generation: int, owner: str, guardians: Iterable[Guardian], *, version: int
) -> dict[str, Any]:
    """What the owner signs: the exact set, each guardian's kind and (see module) key id.

    A KPS guardian's identity is its signing key: from version 2 on the owner
    trusts it, not one of its encryption keys, so only the KPS's own
    self-signed documents choose which key it is wrapped to.
    """
    return {
        "type": GUARDIAN_SET_TYPE,
        "version": version,
        "kp_id": kp_id,
        "generation": generation,
        "owner": owner,
        "guardians": [_member(g, version) for g in sorted(guardians, key=lambda g: g.id)],
    }


def verify_guardian_set(
    token: Any, kp_id: str, owner: Guardian, guardians: tuple[Guardian, ...], version: int
) -> int:
    """Check the owner signed exactly this set for this KP; return the statement's generation.

    The statement is carried unchanged from generation to generation, and a KPS
    release loads it twice (the ingress KP, then the egress it minted): its
    signature check is cached by the exact token and the owner's key (see
    :class:`~guardfab.formats.guardian.VerifiedCache`). Every other check runs
    on every call.
    """
    what = "key protector guardian set"
    if not isinstance(token, str):
        raise FormatError(f"{what}: missing")
    payload = _verified_statement(token, owner, what=what)
    body = require_dict(load_json_document(payload, what=what), what=what)
    generation = require_int(body, "generation", what=what)
    if generation > MAX_GENERATION:
        raise FormatError(f"{what}: generation is out of range")
    expected = guardian_set_payload(kp_id, generation, owner.id, guardians, version=version)
    if payload != canonical_json(expected):
        raise VerificationError(
            f"{what}: the owner did not sign this set of guardians for this key protector"
        )
    return generation


def _verified_statement(token: str, owner: Guardian, *, what: str) -> bytes:
    """The payload of the owner's statement, its signature verified (or found verified)."""
    key = (token, owner.id)
    payload = _STATEMENTS.get(key)
    if payload is None:
        verified = jose.verify_compact(
            token, owner.signing_key, typ=GUARDIAN_SET_JWS_TYPE, what=what
        )
        payload = verified.payload
        _STATEMENTS.put(key, payload)
    return payload


def check_generation(generation: int, statement_generation: int, *, signer_is_owner: bool) -> None:
    """The owner signs its set statement with each KP; a KPS re-keys only later generations."""
    if signer_is_owner and generation != statement_generation:
        raise VerificationError(
            f"key protector: signed by the owner at generation {generation},"
            f" but the owner's guardian set is for generation {statement_generation}"
        )
    if not signer_is_owner and generation <= statement_generation:
        raise VerificationError(
            "key protector: a KPS may sign only a re-keyed KP, newer than the owner's guardian set"
        )


def load_embedded_guardians(
    body: dict[str, Any], *, max_guardians: int
) -> tuple[tuple[Guardian, ...], tuple[str, ...]]:
    """Load the embedded guardian documents, each verified by its own signature."""
    documents = body.get("guardians")
    if not isinstance(documents, list) or not 2 <= len(documents) <= max_guardians:
        raise FormatError(f"key protector: 'guardians' must list 2 to {max_guardians} documents")
    guardians = []
    for index, document in enumerate(documents):
        if not isinstance(document, str) or len(document) > MAX_GUARDIAN_BYTES:
            raise FormatError(f"key protector: guardian #{index} is not a document string")
        if document != document.strip():
            raise FormatError(f"key protector: guardian #{index} has surrounding white space")
        try:
            guardians.append(load_guardian_document(_ascii(document, what=f"guardian #{index}")))
        except InvalidInputError as exc:
            raise type(exc)(f"key protector: guardian #{index}: {exc}") from exc
    ids = [g.id for g in guardians]
    if ids != sorted(set(ids)):
        raise FormatError("key protector: guardians must be sorted by id, each listed once")
    if len({g.encryption_kid for g in guardians}) != len(guardians):
        raise FormatError("key protector: two guardians share an encryption key")
    return tuple(guardians), tuple(documents)


def _ascii(text: str, *, what: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise FormatError(f"{what}: not ASCII") from exc


def check_wrapping(
    value: Any, guardians: tuple[Guardian, ...], aad: bytes, *, what: str
) -> dict[str, Any]:
    """Check the JWE's shape and that it is bound to this KP and wraps to exactly its set."""
    what = f"{what} wrapping"
    wrapping = require_dict(value, what=what)
    reject_unknown_fields(wrapping, _WRAPPING_FIELDS, what=what)
    protected_text = require_str(wrapping, "protected", what=what, max_len=256)
    protected = load_json_document(
        b64url_decode(protected_text, what=f"{what} protected header"), what=what
    )
    if protected != {"enc": jose.CONTENT_ENC}:
        raise FormatError(f"{what}: the protected header must be exactly enc {jose.CONTENT_ENC}")
    for name, size in _WRAPPING_SIZES:
        part = b64url_decode(require_str(wrapping, name, what=what), what=f"{what} {name}")
        if len(part) != size:
            raise FormatError(f"{what}: {name} must be {size} bytes")
    if require_str(wrapping, "aad", what=what) != b64url_encode(aad):
        raise VerificationError(
            f"{what}: not bound to this key protector's id, generation and guardian set"
        )
    _check_recipients(wrapping.get("recipients"), guardians, what=what)
    return wrapping


def _check_recipients(value: Any, guardians: tuple[Guardian, ...], *, what: str) -> None:
    """Exactly one wrapping per guardian, each with the algorithm its key calls for."""
    if not isinstance(value, list) or len(value) != len(guardians):
        raise VerificationError(f"{what}: there must be exactly one wrapping per guardian")
    by_kid = {g.encryption_kid: g for g in guardians}
    seen: set[str] = set()
    for recipient in value:
        kid = _check_recipient(recipient, by_kid, what=what)
        if kid in seen:
            raise VerificationError(f"{what}: two wrappings for guardian key {kid}")
        seen.add(kid)


def _check_recipient(value: Any, by_kid: dict[str, Guardian], *, what: str) -> str:
    recipient = require_dict(value, what=what)
    reject_unknown_fields(recipient, {"header", "encrypted_key"}, what=what)
    header = require_dict(recipient.get("header"), what=f"{what} recipient header")
    reject_unknown_fields(header, {"alg", "kid", "epk"}, what=f"{what} recipient header")
    kid = require_str(header, "kid", what=what, max_len=64)
    guardian = by_kid.get(kid)
    if guardian is None:
        raise VerificationError(f"{what}: a wrapping for a key of no guardian of this KP")
    alg = require_str(header, "alg", what=what)
    if alg != jose.wrapping_alg_for(guardian.encryption_key):
        raise FormatError(f"{what}: algorithm {alg[:32]!r} does not suit guardian {guardian.id}")
    if ("epk" in header) != (alg == _ECDH):
        raise FormatError(f"{what}: an ephemeral key is required for ECDH-ES and only there")
    if alg == _ECDH:
        _check_ephemeral_key(header["epk"], guardian, what=what)
    b64url_decode(require_str(recipient, "encrypted_key", what=what), what=f"{what} encrypted_key")
    return kid


def _check_ephemeral_key(value: Any, guardian: Guardian, *, what: str) -> None:
    """An ECDH-ES ephemeral key: a public point on the guardian's own curve.

    Every KP load checks one per ECDH guardian, on every key release: a point
    decoded and validated by ``cryptography`` costs about 4 us where a full JWK
    import costs 15 us, and nothing here uses the key (the KPS's own wrapping's
    key is imported again by the decryption that uses it). Coordinates shorter
    than the curve's size are left-padded, as a JWK import reads them.
    """
    what = f"{what} ephemeral key"
    epk = require_dict(value, what=what)
    if epk.get("kty") != "EC" or "d" in epk:
        raise FormatError(f"{what}: not a public EC key")
    crv = epk.get("crv")
    if crv != jose.public_jwk(guardian.encryption_key).get("crv") or crv not in _EC_CURVES:
        raise FormatError(f"{what}: the ephemeral key is not on the guardian's curve")
    curve, size = _EC_CURVES[crv]
    coordinates = [
        b64url_decode(require_str(epk, name, what=what, max_len=128), what=f"{what} {name}")
        for name in ("x", "y")
    ]
    if any(len(c) > size for c in coordinates):
        raise FormatError(f"{what}: a coordinate is longer than {crv} allows")
    point = b"\x04" + b"".join(c.rjust(size, b"\0") for c in coordinates)
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(curve(), point)
    except ValueError as exc:
        raise FormatError(f"{what}: not a point on {crv}") from exc
