"""Key protectors (KP): a VM's transport key, wrapped once per guardian and signed.

A KP lets a fabric start a shielded VM while the tenant is away: it carries the
VM's 32-byte transport key wrapped for every guardian -- the owner and one or
more fabrics' Key Protection Services -- so each guardian's private key recovers
the key and nobody else's does.

The file (version 2; version 1 still loads) is a compact JWS (``typ``
``guardfab-kp+jws``, ``kid`` = the signer's guardian id) over an RFC 8785
canonical JSON payload::

    {"type": "guardfab.key-protector", "version": 1, "kp_id": "<128-bit b64url>",
     "generation": n, "owner": "<id>", "signer": "<id>",
     "guardians": ["<self-signed guardian document>", ...],       # sorted by id
     "guardian_set": "<owner-signed JWS over kp_id, generation, owner and
                      every guardian's id and kind, and for tenant guardians
                      (every guardian in version 1) the encryption key id>",
     "wrapping": {JWE General JSON, A256GCM, one recipient per guardian}}

The guardian set is bound three ways (docs/adr/0002-key-protector-format.md):
the owner's ``guardian_set`` statement, which a KPS re-keying the KP carries
along but cannot re-make; the outer signature, by the owner or by a KPS guardian
of the set; and the AEAD additional data of the wrapping, so a KP whose set was
edited and re-signed by anybody still fails to unwrap for the real guardians.

From version 2 a KPS guardian is bound by its identity (its signing key), not
by one encryption key: on re-key the KPS embeds its newest self-signed document
(a higher ``key_generation``) and wraps to it, so it rotates its keys without
the owner. A version-1 KP keeps the encryption key its owner signed for, so its
egress stays version 1 until the owner re-signs its set (any grant or revoke,
or :func:`upgrade`).

Everything here is pure: bytes and keys in, verified objects out.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from guardfab.errors import (
    FormatError,
    NotAuthorizedError,
    UsageError,
    VerificationError,
)
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
    Guardian,
    GuardianKind,
    load_guardian_document,
    sign_guardian_document,
)
from guardfab.formats.kp_wrapping import (
    GUARDIAN_SET_JWS_TYPE,
    GUARDIAN_SET_TYPE,
    KP_VERSION,
    KP_VERSIONS,
    MAX_GENERATION,
    TRANSPORT_KEY_BYTES,
    WRAPPING_AAD_TYPE,
    GuardianKeyPair,
    KpsKeys,
    TransportKey,
    check_generation,
    check_wrapping,
    guardian_set_payload,
    load_embedded_guardians,
    verify_guardian_set,
    wrapping_aad,
)

__all__ = [
    "GUARDIAN_SET_JWS_TYPE",
    "GUARDIAN_SET_TYPE",
    "KP_JWS_TYPE",
    "KP_PAYLOAD_TYPE",
    "KP_VERSION",
    "KP_VERSIONS",
    "MAX_GENERATION",
    "MAX_GUARDIANS",
    "MAX_KP_BYTES",
    "TRANSPORT_KEY_BYTES",
    "WRAPPING_AAD_TYPE",
    "GuardianKeyPair",
    "KeyProtector",
    "KpsKeys",
    "TransportKey",
    "create_key_protector",
    "egress_key_generation",
    "grant",
    "load_key_protector",
    "rekey",
    "revoke",
    "upgrade",
    "wrapping_aad",
]

#: JOSE ``typ`` of a KP, so no other guardfab JWS can stand in for one.
KP_JWS_TYPE = "guardfab-kp+jws"
#: ``type`` member of the KP payload.
KP_PAYLOAD_TYPE = "guardfab.key-protector"
#: 32 guardian documents of RSA-3072 keys and their wrappings fit well below this.
MAX_KP_BYTES = 256 * 1024
MAX_GUARDIANS = 32

_WHAT = "key protector"
_KP_ID_BYTES = 16
_KP_ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_PAYLOAD_FIELDS = {
    "type",
    "version",
    "kp_id",
    "generation",
    "owner",
    "signer",
    "guardians",
    "guardian_set",
    "wrapping",
}


@dataclass(frozen=True)
class KeyProtector:
    """A verified key protector; only :func:`load_key_protector` makes one.

    Attributes:
        kp_id: random id shared by every generation of this KP.
        generation: 0 when made, +1 on every grant, revoke or KPS re-key.
        version: the format version (1: every encryption key owner-bound; 2: KPS keys rotate).
        owner: guardian id of the owner (kind tenant).
        signer: guardian id of whoever signed this generation (the owner or a KPS).
        guardians: every guardian, owner included, sorted by id.
    """

    kp_id: str
    generation: int
    version: int
    owner: str
    signer: str
    guardians: tuple[Guardian, ...]
    documents: tuple[str, ...] = field(repr=False)
    guardian_set: str = field(repr=False)
    wrapping: dict[str, Any] = field(repr=False)
    raw: bytes = field(repr=False)

    @property
    def guardian_ids(self) -> tuple[str, ...]:
        """Ids of all guardians, sorted."""
        return tuple(g.id for g in self.guardians)

    def guardian(self, guardian_id: str) -> Guardian:
        """The guardian ``guardian_id`` of this KP.

        Raises:
            NotAuthorizedError: it is not a guardian of this KP.
        """
        for g in self.guardians:
            if g.id == guardian_id:
                return g
        raise NotAuthorizedError(f"{_WHAT}: {guardian_id} is not one of its guardians")

    def aad(self) -> bytes:
        """The additional data the wrapping must authenticate (see :func:`wrapping_aad`)."""
        return wrapping_aad(
            self.kp_id, self.generation, self.owner, self.guardian_ids, version=self.version
        )

    def unwrap(self, keys: GuardianKeyPair) -> TransportKey:
        """Recover the transport key with a guardian's private encryption key.

        Raises:
            NotAuthorizedError: ``keys`` are not those of a guardian of this KP.
            VerificationError: the wrapping, its tag or its AAD does not authenticate.
        """
        held = (
            keys.encryption_keys
            if isinstance(keys, KpsKeys)
            else {jose.thumbprint(keys.encryption_key): keys.encryption_key}
        )
        return self.unwrap_with(keys.guardian.id, held)

    def unwrap_with(
        self, guardian_id: str, encryption_keys: Mapping[str, jose.AsymmetricKey]
    ) -> TransportKey:
        """Recover the transport key with whichever held key guardian ``guardian_id`` has here.

        Args:
            guardian_id: the guardian unwrapping.
            encryption_keys: its private encryption keys by key id (a KPS holds
                one per key generation; a tenant one).

        Raises:
            NotAuthorizedError: not a guardian of this KP, or its key here is not held.
            VerificationError: the wrapping, its tag or its AAD does not authenticate.
        """
        mine = self.guardian(guardian_id)
        key = encryption_keys.get(mine.encryption_kid)
        if key is None:
            raise NotAuthorizedError(
                f"{_WHAT}: the encryption key given is not the one guardian {mine.id} has here"
                f" (key generation {mine.key_generation})",
                hint="use the guardian's key pair as it was when the KP was made",
            )
        plaintext = jose.decrypt_for_recipient(
            self.wrapping, mine.encryption_kid, key, aad=self.aad(), what=f"{_WHAT} wrapping"
        )
        if len(plaintext) != TRANSPORT_KEY_BYTES:
            raise VerificationError(f"{_WHAT}: the wrapped key has the wrong length")
        return TransportKey(plaintext)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: ids, kinds and algorithms, never key material."""
        return {
            "kp_id": self.kp_id,
            "generation": self.generation,
            "version": self.version,
            "owner": self.owner,
            "signer": self.signer,
            "guardians": [
                {**g.summary(), "role": "owner" if g.id == self.owner else "guardian"}
                for g in self.guardians
            ],
        }


# --- making KPs ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    guardian: Guardian
    document: str


@dataclass(frozen=True)
class _Draft:
    """Everything of a KP generation except the wrapping and the outer signature."""

    kp_id: str
    generation: int
    owner: str
    members: list[_Member]
    guardian_set: str = ""
    version: int = KP_VERSION


def create_key_protector(
    owner_keys: GuardianKeyPair,
    fabric_guardians: Sequence[bytes],
    transport_key: TransportKey | None = None,
) -> tuple[bytes, TransportKey]:
    """Make a new KP (generation 0) for the owner and the given guardians.

    Args:
        owner_keys: the owner (a tenant guardian) with its private keys; it signs.
        fabric_guardians: self-signed guardian documents (as exported) of the other
            guardians; documents, not Guardian objects, because the KP embeds them
            and only their own signing keys could re-make them.
        transport_key: the key to protect; a fresh random one if None.

    Returns:
        The KP file bytes and the transport key it protects.

    Raises:
        UsageError: no other guardian, a guardian listed twice, or too many.
        InvalidInputError: a guardian document does not load.
    """
    owner = owner_keys.guardian
    if owner.kind is not GuardianKind.TENANT:
        raise UsageError(f"the owner must be a tenant guardian, not kind {owner.kind.value!r}")
    owner_doc = sign_guardian_document(owner, owner_keys.signing_key).decode("ascii")
    members = [_Member(owner, owner_doc)]
    for data in fabric_guardians:
        members = _with_member(members, _member_from_document(data))
    if len(members) < 2:
        raise UsageError("a key protector needs at least one guardian besides the owner")
    key = TransportKey.generate() if transport_key is None else transport_key
    kp_id = b64url_encode(secrets.token_bytes(_KP_ID_BYTES))
    return _mint_as_owner(_Draft(kp_id, 0, owner.id, members), owner_keys, key), key


def grant(kp: KeyProtector, owner_keys: GuardianKeyPair, guardian_document: bytes) -> bytes:
    """Add a guardian: the next generation, same transport key, signed by the owner.

    Raises:
        NotAuthorizedError: ``owner_keys`` are not the KP owner's.
        UsageError: the guardian is already in the set, or the set is full.
    """
    key = _unwrap_as_owner(kp, owner_keys)
    members = _with_member(_members(kp), _member_from_document(guardian_document))
    return _mint_as_owner(_Draft(kp.kp_id, kp.generation + 1, kp.owner, members), owner_keys, key)


def revoke(kp: KeyProtector, owner_keys: GuardianKeyPair, guardian_id: str) -> bytes:
    """Remove a guardian: the next generation, same transport key, signed by the owner.

    The transport key is kept (the VM's disks and vTPM depend on it), so a
    revoked guardian that kept an older KP or the key itself is not locked out of
    what it already had; revocation governs what this and later KPs release.

    Raises:
        NotAuthorizedError: ``owner_keys`` are not the KP owner's.
        UsageError: the guardian is the owner, the last other guardian, or not in the set.
    """
    key = _unwrap_as_owner(kp, owner_keys)
    if guardian_id == kp.owner:
        raise UsageError("the owner cannot be revoked from its own key protector")
    kp.guardian(guardian_id)  # raises if it is not in the set
    members = [m for m in _members(kp) if m.guardian.id != guardian_id]
    if len(members) < 2:
        raise UsageError(
            "this is the last guardian besides the owner",
            hint="grant another guardian first, or make a new key protector",
        )
    return _mint_as_owner(_Draft(kp.kp_id, kp.generation + 1, kp.owner, members), owner_keys, key)


def upgrade(kp: KeyProtector, owner_keys: GuardianKeyPair) -> bytes:
    """Re-sign the set in the current format: the next generation, same key and guardians.

    What moves a version-1 KP to version 2 (its KPS guardians can then rotate
    their keys without the owner); any grant or revoke does it as well.

    Raises:
        NotAuthorizedError: ``owner_keys`` are not the KP owner's.
    """
    key = _unwrap_as_owner(kp, owner_keys)
    draft = _Draft(kp.kp_id, kp.generation + 1, kp.owner, _members(kp))
    return _mint_as_owner(draft, owner_keys, key)


def rekey(
    kp: KeyProtector, signer_keys: GuardianKeyPair
) -> tuple[bytes, TransportKey, TransportKey]:
    """Mint the egress KP a Key Protection Service returns on a release.

    Same kp_id and guardian set (the owner's ``guardian_set`` statement is carried
    over unchanged), generation + 1, a fresh transport key, signed by the KPS.
    In a version-2 KP, when ``signer_keys`` is a :class:`KpsKeys` newer than the
    KPS document the KP embeds, the egress embeds the current document and is
    wrapped to its key: rotation needs no owner. Never to an older one.

    Returns:
        The egress KP bytes, the old transport key and the new one.

    Raises:
        NotAuthorizedError: ``signer_keys`` are not a KPS guardian of this KP, or
            do not hold the encryption key the KP is wrapped to.
    """
    signer = kp.guardian(signer_keys.guardian.id)
    if signer.kind is not GuardianKind.KPS:
        raise NotAuthorizedError(f"{_WHAT}: only a KPS guardian of the KP may re-key it")
    if _signing_key_id(signer_keys) != signer.id:
        raise NotAuthorizedError(f"{_WHAT}: the signing key is not guardian {signer.id}'s")
    old, new = kp.unwrap(signer_keys), TransportKey.generate()
    members = _members(kp)
    moves = egress_key_generation(kp, signer_keys) != signer.key_generation
    if moves and isinstance(signer_keys, KpsKeys):
        members = _with_current_document(members, signer.id, signer_keys)
    draft = _Draft(
        kp.kp_id, kp.generation + 1, kp.owner, members, kp.guardian_set, version=kp.version
    )
    return _mint(draft, signer_keys, new, reload=False), old, new


def _signing_key_id(keys: GuardianKeyPair) -> str:
    """The id of the key that will sign: a KPS's, computed once per key ring."""
    if isinstance(keys, KpsKeys):
        return keys.signing_key_id
    return jose.thumbprint(keys.signing_key)


def egress_key_generation(kp: KeyProtector, signer_keys: GuardianKeyPair) -> int:
    """The KPS key generation :func:`rekey` wraps the egress KP to.

    The signer's current generation if the KP is version 2 and it embeds an
    older one; else the generation the KP already names (a version-1 KP's owner
    signed for that very key, and a KPS never moves a KP back).
    """
    embedded = kp.guardian(signer_keys.guardian.id).key_generation
    if kp.version >= 2 and isinstance(signer_keys, KpsKeys):
        return max(embedded, signer_keys.guardian.key_generation)
    return embedded


def _with_current_document(members: list[_Member], signer_id: str, keys: KpsKeys) -> list[_Member]:
    """Swap in the KPS's current document (only called when it is newer)."""
    current = _Member(keys.guardian, keys.document.decode("ascii").strip())
    return [current if m.guardian.id == signer_id else m for m in members]


def _unwrap_as_owner(kp: KeyProtector, owner_keys: GuardianKeyPair) -> TransportKey:
    if owner_keys.guardian.id != kp.owner:
        raise NotAuthorizedError(
            f"{_WHAT}: only its owner {kp.owner} may change its guardians",
            hint="use the owner guardian's private keys",
        )
    return kp.unwrap(owner_keys)


def _members(kp: KeyProtector) -> list[_Member]:
    return [_Member(g, d) for g, d in zip(kp.guardians, kp.documents, strict=True)]


def _member_from_document(data: bytes) -> _Member:
    guardian = load_guardian_document(data)
    return _Member(guardian, data.decode("ascii").strip())


def _with_member(members: list[_Member], new: _Member) -> list[_Member]:
    if any(m.guardian.id == new.guardian.id for m in members):
        raise UsageError(f"guardian {new.guardian.name} ({new.guardian.id}) is already in the set")
    if any(m.guardian.encryption_kid == new.guardian.encryption_kid for m in members):
        raise UsageError(f"guardian {new.guardian.name} shares an encryption key with another")
    if len(members) >= MAX_GUARDIANS:
        raise UsageError(f"a key protector holds at most {MAX_GUARDIANS} guardians")
    return [*members, new]


def _mint_as_owner(draft: _Draft, owner_keys: GuardianKeyPair, key: TransportKey) -> bytes:
    """Sign a fresh guardian-set statement and the KP, both by the owner."""
    guardians = [m.guardian for m in draft.members]
    statement = guardian_set_payload(
        draft.kp_id, draft.generation, draft.owner, guardians, version=draft.version
    )
    guardian_set = jose.sign_compact(
        canonical_json(statement), owner_keys.signing_key, typ=GUARDIAN_SET_JWS_TYPE
    )
    return _mint(replace(draft, guardian_set=guardian_set), owner_keys, key)


def _mint(
    draft: _Draft, signer_keys: GuardianKeyPair, key: TransportKey, *, reload: bool = True
) -> bytes:
    """Wrap the key to every member, sign, and check the result.

    ``reload`` (the owner's paths: a new set, a fresh statement): the result must
    load in full. Without it (a KPS re-key, on every release): the draft is the
    ingress KP's verified guardians and owner statement with a fresh wrapping,
    and the host and the next release load the egress in full; what minting
    alone could still get wrong unseen is the signature (a faulty signing
    operation), so that is verified over the exact bytes handed out. A broken
    egress must never leave the KPS: the release that minted it spends the
    ingress generation.
    """
    ordered = sorted(draft.members, key=lambda m: m.guardian.id)
    guardians = [m.guardian for m in ordered]
    ids = [g.id for g in guardians]
    aad = wrapping_aad(draft.kp_id, draft.generation, draft.owner, ids, version=draft.version)
    recipients = [(g.encryption_kid, g.encryption_key) for g in guardians]
    payload = {
        "type": KP_PAYLOAD_TYPE,
        "version": draft.version,
        "kp_id": draft.kp_id,
        "generation": draft.generation,
        "owner": draft.owner,
        "signer": signer_keys.guardian.id,
        "guardians": [m.document for m in ordered],
        "guardian_set": draft.guardian_set,
        "wrapping": jose.encrypt_to_recipients(key.reveal(), recipients, aad=aad),
    }
    encoded = canonical_json(payload)
    token = jose.sign_compact(encoded, signer_keys.signing_key, typ=KP_JWS_TYPE)
    data = token.encode("ascii") + b"\n"
    if reload:
        load_key_protector(data, expected_owner=draft.owner)  # never hand out what would not load
    else:
        _check_own_signature(token, encoded, signer_keys)
    return data


def _check_own_signature(token: str, payload: bytes, signer_keys: GuardianKeyPair) -> None:
    """The KP just signed verifies under the signer's public key and covers ``payload``."""
    public = signer_keys.guardian.signing_key
    verified = jose.verify_compact(token, public, typ=KP_JWS_TYPE, what=_WHAT)
    if verified.payload != payload or verified.header.get("kid") != signer_keys.guardian.id:
        raise VerificationError(f"{_WHAT}: the KP just signed does not verify")


# --- loading KPs -----------------------------------------------------------------------


def load_key_protector(data: bytes, *, expected_owner: str | None = None) -> KeyProtector:
    """Load and verify a KP file.

    Verify, then parse: before the signature is checked, only the embedded
    guardian documents (each self-signed) and the owner id are read, to find the
    signer's key; the header's ``kid`` must name the owner or a KPS guardian of
    the set. Every other field is read from the verified payload.

    Args:
        data: the file's bytes (untrusted).
        expected_owner: the owner's guardian id, pinned by the caller. Without it,
            the KP is only proven self-consistent: anyone can make a KP of their own.

    Raises:
        FormatError: not a KP, wrong version, too big, malformed.
        VerificationError: a signature, the guardian set statement or a binding fails.
        NotAuthorizedError: signed by a guardian who may not sign it, or another owner.
    """
    token, header, raw, body = _split(data)
    guardians, documents = load_embedded_guardians(body, max_guardians=MAX_GUARDIANS)
    owner = _owner(body, guardians, expected_owner)
    signer = _authorized_signer(header, owner, guardians)
    verified = jose.verify_compact(token, signer.signing_key, typ=KP_JWS_TYPE, what=_WHAT)
    if verified.payload != raw or verified.header.get("kid") != signer.id:
        raise VerificationError(f"{_WHAT}: the verified content differs from what was read")
    kp_id, generation, version = _header_fields(body)
    if body.get("signer") != signer.id:
        raise VerificationError(f"{_WHAT}: the signer field does not name the key that signed")
    statement_generation = verify_guardian_set(
        body.get("guardian_set"), kp_id, owner, guardians, version
    )
    check_generation(generation, statement_generation, signer_is_owner=signer.id == owner.id)
    ids = [g.id for g in guardians]
    aad = wrapping_aad(kp_id, generation, owner.id, ids, version=version)
    wrapping = check_wrapping(body.get("wrapping"), guardians, aad, what=_WHAT)
    _require_canonical(body, raw)
    return KeyProtector(
        kp_id=kp_id,
        generation=generation,
        version=version,
        owner=owner.id,
        signer=signer.id,
        guardians=guardians,
        documents=documents,
        guardian_set=body["guardian_set"],
        wrapping=wrapping,
        raw=data,
    )


def _require_canonical(body: dict[str, Any], raw: bytes) -> None:
    """One byte form per KP: no duplicate keys, no NaN, no number or escape variants."""
    try:
        canonical = canonical_json(body)
    except ValueError as exc:  # rfc8785 refuses NaN, huge integers, lone surrogates
        raise FormatError(f"{_WHAT}: the payload holds a value JSON cannot carry") from exc
    if canonical != raw:
        raise FormatError(f"{_WHAT}: the payload is not canonical JSON (RFC 8785)")


def _split(data: bytes) -> tuple[str, dict[str, Any], bytes, dict[str, Any]]:
    """Bound the size and cut the compact JWS into its (still unverified) parts."""
    if len(data) > MAX_KP_BYTES:
        raise FormatError(f"{_WHAT}: {len(data)} bytes is larger than the limit of {MAX_KP_BYTES}")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{_WHAT}: not ASCII text") from exc
    parts = token.split(".")
    if len(parts) != 3:
        raise FormatError(f"{_WHAT}: not a compact JWS")
    what = f"{_WHAT} header"
    header = require_dict(
        load_json_document(b64url_decode(parts[0], what=what), what=what), what=what
    )
    raw = b64url_decode(parts[1], what=f"{_WHAT} payload")
    body = require_dict(load_json_document(raw, what=_WHAT, max_bytes=MAX_KP_BYTES), what=_WHAT)
    return token, header, raw, body


def _owner(
    body: dict[str, Any], guardians: tuple[Guardian, ...], expected_owner: str | None
) -> Guardian:
    owner_id = require_str(body, "owner", what=_WHAT, max_len=64)
    if expected_owner is not None and owner_id != expected_owner:
        raise NotAuthorizedError(
            f"{_WHAT}: owned by {owner_id}, not by the expected owner {expected_owner}"
        )
    owner = next((g for g in guardians if g.id == owner_id), None)
    if owner is None:
        raise VerificationError(f"{_WHAT}: the owner is not one of its guardians")
    if owner.kind is not GuardianKind.TENANT:
        raise VerificationError(f"{_WHAT}: the owner must be a tenant guardian")
    return owner


def _authorized_signer(
    header: dict[str, Any], owner: Guardian, guardians: tuple[Guardian, ...]
) -> Guardian:
    """The guardian whose key must have signed: the owner, or a KPS guardian of the set."""
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise FormatError(f"{_WHAT}: the header names no signer ('kid')")
    signer = next((g for g in guardians if g.id == kid), None)
    if signer is None:
        raise NotAuthorizedError(
            f"{_WHAT}: signed by {kid[:64]}, which is not one of its guardians"
        )
    if signer.id != owner.id and signer.kind is not GuardianKind.KPS:
        raise NotAuthorizedError(
            f"{_WHAT}: signed by guardian {signer.id} ({signer.kind.value}),"
            " which is neither the owner nor a KPS guardian"
        )
    return signer


def _header_fields(body: dict[str, Any]) -> tuple[str, int, int]:
    """Check type, version and fields; return kp_id, generation and version."""
    reject_unknown_fields(body, _PAYLOAD_FIELDS, what=_WHAT)
    if body.get("type") != KP_PAYLOAD_TYPE:
        raise FormatError(f"{_WHAT}: type is not {KP_PAYLOAD_TYPE!r}")
    version = require_int(body, "version", what=_WHAT)
    if version not in KP_VERSIONS:
        raise FormatError(f"{_WHAT}: version {version} is not supported (expected 1 or 2)")
    kp_id = require_str(body, "kp_id", what=_WHAT, max_len=64)
    if not _KP_ID_RE.fullmatch(kp_id) or b64url_encode(b64url_decode(kp_id, what="kp_id")) != kp_id:
        raise FormatError(f"{_WHAT}: kp_id is not 128 bits in base64url")
    generation = require_int(body, "generation", what=_WHAT)
    if generation > MAX_GENERATION:
        raise FormatError(f"{_WHAT}: generation is out of range")
    return kp_id, generation, version
