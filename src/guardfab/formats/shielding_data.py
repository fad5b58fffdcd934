"""Shielding data files (PDK): a VM's secrets, sealed for its guardians, signed by its owner.

Version 1 on the wire is one compact JWS (RFC 7515, ``typ`` ``guardfab-pdk+jws``,
``kid`` = the owner's guardian id) over canonical JSON::

    {"type": "guardfab.shielding-data", "version": 1,
     "header":  {name, pdk_id, policy, owner, guardians, kp_guardians,
                 qualifiers, created_at, answer_file_kind},
     "secrets": JWE General JSON (A256GCM, one key wrapping per guardian)}

The header is public: a fabric reads the policy, who may run the VM and which
template disks qualify, without any key. The secrets open only with the private
encryption key of the owner or a listed guardian.

Two bindings, each needed:

* The owner's signature covers the header *and* the sealed secrets. AEAD alone
  does not authenticate a sender: anyone holding the guardians' public keys could
  seal an answer file of their own under a copied header.
* The JWE's additional authenticated data is a digest of the header, so a header
  edited and re-signed by someone else (an attacker naming itself owner) no
  longer opens the original secrets.

Everything here is pure (bytes and keys in, verified objects out); reading
files and the guardian store is :mod:`guardfab.tenant.pdk`.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from guardfab.errors import FormatError, InvalidInputError, NotAuthorizedError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    MAX_DOCUMENT_BYTES,
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
    load_guardian_document,
    sign_guardian_document,
)
from guardfab.formats.shielding_secrets import (
    MAX_RECIPIENTS,
    AnswerFileKind,
    Recipient,
    ShieldingSecrets,
    check_sealed,
    parse_enum,
    seal,
    unseal,
)
from guardfab.formats.template import MAX_NAME_LENGTH, VolumeIdQualifier, check_name

PDK_JWS_TYPE = "guardfab-pdk+jws"
PDK_PAYLOAD_TYPE = "guardfab.shielding-data"
PDK_VERSION = 1
#: 384 KiB of files, base64 in the plaintext, base64url in the JWE, base64url
#: again in the JWS: about 0.9 MiB, plus up to 16 guardian documents.
MAX_SHIELDING_DATA_BYTES = MAX_DOCUMENT_BYTES
#: Guardians besides the owner: every guardian is one JWE recipient.
MAX_GUARDIANS = MAX_RECIPIENTS - 1
MAX_QUALIFIERS = 32
#: Times are JSON integers; keep them inside the range every JSON reader handles.
MAX_CREATED_AT = 2**53 - 1

_WHAT = "shielding data"
_AAD_PREFIX = b"guardfab.shielding-data.v1 header sha256:"
_PDK_ID_BYTES = 16
_PDK_ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")
_BODY_FIELDS = {"type", "version", "header", "secrets"}
_HEADER_FIELDS = {
    "name",
    "pdk_id",
    "policy",
    "owner",
    "guardians",
    "kp_guardians",
    "qualifiers",
    "created_at",
    "answer_file_kind",
}


class SecurityPolicy(enum.StrEnum):
    """How a host must run VMs made from this shielding data (the reference's two kinds)."""

    #: Every protection on and locked: secure boot, vTPM, encrypted state and
    #: migration, no console, serial port, debugger or guest-agent channel.
    SHIELDED = "shielded"
    #: Secure boot, vTPM and encrypted state on, but configurable by a (trusted)
    #: fabric administrator; console, serial port and debugger stay available.
    ENCRYPTION_SUPPORTED = "encryption-supported"


class GuardianKeyHolder(Protocol):
    """A guardian with its private keys (:class:`guardfab.tenant.guardians.GuardianKeys`)."""

    @property
    def guardian(self) -> Guardian: ...
    @property
    def signing_key(self) -> jose.AsymmetricKey: ...
    @property
    def encryption_key(self) -> jose.AsymmetricKey: ...


@dataclass(frozen=True)
class GuardianDocument:
    """A guardian whose self-signature verified, with the exact document it came from.

    The header carries whole documents, not ids, so a host or KPS can read every
    guardian's keys from the PDK itself; the owner's signature vouches for them.
    """

    guardian: Guardian = field(compare=False)
    document: str = field(repr=False)

    @classmethod
    def load(cls, document: bytes | str, *, what: str) -> GuardianDocument:
        """Verify a self-signed guardian document; errors name ``what`` it was."""
        try:
            raw = document.encode("ascii") if isinstance(document, str) else document
            guardian = load_guardian_document(raw)
        except UnicodeEncodeError:
            raise FormatError(f"{what}: a guardian document is ASCII text") from None
        except InvalidInputError as exc:
            raise type(exc)(f"{what}: {exc}", hint=exc.hint or None) from exc
        return cls(guardian=guardian, document=raw.decode("ascii").strip())

    @property
    def id(self) -> str:
        """The guardian's id (thumbprint of its signing key)."""
        return self.guardian.id


def _check_guardian_set(owner: GuardianDocument, guardians: tuple[GuardianDocument, ...]) -> None:
    """One owner (a tenant), 1..15 other guardians, sorted, no key used twice."""
    if owner.guardian.kind is not GuardianKind.TENANT:
        raise FormatError(f"{_WHAT}: the owner must be a tenant guardian, not a fabric's")
    if not 0 < len(guardians) <= MAX_GUARDIANS:
        raise FormatError(
            f"{_WHAT}: needs 1 to {MAX_GUARDIANS} guardians besides the owner",
            hint="name the HGS guardian of every fabric that may run the VM",
        )
    ids = [g.id for g in guardians]
    if owner.id in ids:
        raise FormatError(f"{_WHAT}: the owner is listed again among the guardians")
    if len(set(ids)) != len(ids):
        raise FormatError(f"{_WHAT}: a guardian is listed twice")
    if ids != sorted(ids):
        raise FormatError(f"{_WHAT}: guardians must be sorted by id")
    kids = [g.guardian.encryption_kid for g in (owner, *guardians)]
    if len(set(kids)) != len(kids):
        raise FormatError(f"{_WHAT}: two guardians share one encryption key")


@dataclass(frozen=True)
class ShieldingDataHeader:
    """The public part of a shielding data file, signed by the owner.

    ``qualifiers`` says which template disks a VM may be provisioned from; an
    empty tuple admits none (fail closed), which suits shielding an existing VM.
    """

    name: str
    pdk_id: str
    policy: SecurityPolicy
    owner: GuardianDocument
    guardians: tuple[GuardianDocument, ...]
    qualifiers: tuple[VolumeIdQualifier, ...]
    created_at: int
    answer_file_kind: AnswerFileKind

    def __post_init__(self) -> None:
        check_name(self.name, what=f"{_WHAT} name")
        if not isinstance(self.pdk_id, str) or not _PDK_ID_RE.fullmatch(self.pdk_id):
            raise FormatError(f"{_WHAT}: pdk_id must be 22 base64url characters (128 bits)")
        object.__setattr__(self, "policy", parse_enum(SecurityPolicy, self.policy, what="policy"))
        kind = parse_enum(AnswerFileKind, self.answer_file_kind, what="answer file kind")
        object.__setattr__(self, "answer_file_kind", kind)
        created = self.created_at
        if isinstance(created, bool) or not isinstance(created, int):
            raise FormatError(f"{_WHAT}: created_at must be an integer")
        if not 0 <= created <= MAX_CREATED_AT:
            raise FormatError(f"{_WHAT}: created_at must be between 0 and 2**53-1")
        object.__setattr__(self, "guardians", tuple(self.guardians))
        object.__setattr__(self, "qualifiers", tuple(self.qualifiers))
        _check_guardian_set(self.owner, self.guardians)
        if len(self.qualifiers) > MAX_QUALIFIERS:
            raise FormatError(f"{_WHAT}: more than {MAX_QUALIFIERS} volume ID qualifiers")
        if len(set(self.qualifiers)) != len(self.qualifiers):
            raise FormatError(f"{_WHAT}: a volume ID qualifier is listed twice")

    @property
    def kp_guardians(self) -> tuple[str, ...]:
        """Ids of the guardians the VM's key protector must carry: owner and guardians."""
        return tuple(sorted(g.id for g in (self.owner, *self.guardians)))

    def guardian(self, guardian_id: str) -> GuardianDocument | None:
        """The owner or listed guardian with ``guardian_id``, if any."""
        return next((g for g in (self.owner, *self.guardians) if g.id == guardian_id), None)

    def recipients(self) -> list[Recipient]:
        """The JWE recipients: (encryption key id, public key) of the owner and guardians."""
        return [
            (g.guardian.encryption_kid, g.guardian.encryption_key)
            for g in (self.owner, *self.guardians)
        ]

    def aad(self) -> bytes:
        """The JWE additional authenticated data: a digest of the canonical header."""
        return _AAD_PREFIX + hashlib.sha256(canonical_json(self.to_dict())).hexdigest().encode()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that gets signed."""
        return {
            "name": self.name,
            "pdk_id": self.pdk_id,
            "policy": self.policy.value,
            "owner": self.owner.document,
            "guardians": [g.document for g in self.guardians],
            "kp_guardians": list(self.kp_guardians),
            "qualifiers": [q.to_dict() for q in self.qualifiers],
            "created_at": self.created_at,
            "answer_file_kind": self.answer_file_kind.value,
        }

    @classmethod
    def from_dict(cls, value: Any) -> ShieldingDataHeader:
        """Load the JSON form; it must be exactly what :meth:`to_dict` writes.

        Requiring the normal form means every signed byte is one this version
        understands: no extra JWK members, no reordered guardians, no stale
        ``kp_guardians``.
        """
        what = f"{_WHAT} header"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, _HEADER_FIELDS, what=what)
        guardians = _require_list(obj, "guardians", max_items=MAX_GUARDIANS, what=what)
        qualifiers = _require_list(obj, "qualifiers", max_items=MAX_QUALIFIERS, what=what)
        header = cls(
            name=require_str(obj, "name", what=what, max_len=MAX_NAME_LENGTH),
            pdk_id=require_str(obj, "pdk_id", what=what, max_len=64),
            policy=parse_enum(SecurityPolicy, obj.get("policy"), what=f"{what} policy"),
            owner=GuardianDocument.load(
                require_str(obj, "owner", what=what, max_len=MAX_GUARDIAN_BYTES),
                what=f"{what} owner",
            ),
            guardians=tuple(
                GuardianDocument.load(_document_text(doc, what=what), what=f"{what} guardian")
                for doc in guardians
            ),
            qualifiers=tuple(VolumeIdQualifier.from_dict(q) for q in qualifiers),
            created_at=require_int(obj, "created_at", what=what),
            answer_file_kind=parse_enum(
                AnswerFileKind, obj.get("answer_file_kind"), what=f"{what} answer_file_kind"
            ),
        )
        if header.to_dict() != obj:
            raise FormatError(
                f"{what}: not in the normal form this version writes"
                " (kp_guardians, guardian documents or qualifiers differ)"
            )
        return header

    def summary(self) -> dict[str, Any]:
        """A JSON-able description of the public header, for people and scripts."""
        return {
            "name": self.name,
            "pdk_id": self.pdk_id,
            "policy": self.policy.value,
            "owner": {"name": self.owner.guardian.name, "id": self.owner.id},
            "guardians": [
                {"name": g.guardian.name, "id": g.id, "kind": g.guardian.kind.value}
                for g in self.guardians
            ],
            "kp_guardians": list(self.kp_guardians),
            "qualifiers": [
                {
                    "publisher": q.publisher.thumbprint,
                    "name": q.name,
                    "rule": q.rule.value,
                    "disk_version": str(q.disk_version),
                }
                for q in self.qualifiers
            ],
            "created_at": self.created_at,
            "answer_file_kind": self.answer_file_kind.value,
        }


def _require_list(obj: dict[str, Any], key: str, *, max_items: int, what: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise FormatError(f"{what}: field '{key}' must be a list")
    if len(value) > max_items:
        raise FormatError(f"{what}: field '{key}' has more than {max_items} entries")
    return value


def _document_text(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_GUARDIAN_BYTES:
        raise FormatError(f"{what}: every guardian must be a guardian document (a string)")
    return value


@dataclass(frozen=True)
class ShieldingData:
    """A shielding data file whose owner signature verified; its secrets still sealed.

    Only :func:`load_shielding_data` should make one. A fabric needs nothing more
    than :attr:`header`; a guardian key holder calls :meth:`reveal`.
    """

    header: ShieldingDataHeader
    sealed_secrets: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def owner(self) -> Guardian:
        """The owner guardian, whose signature verified."""
        return self.header.owner.guardian

    def reveal(self, keys: GuardianKeyHolder) -> ShieldingSecrets:
        """Open the secrets with a guardian's private encryption key.

        Raises:
            NotAuthorizedError: ``keys`` is not the owner or a listed guardian.
            VerificationError: the secrets do not decrypt or are not bound to the header.
            FormatError: the decrypted secrets are malformed or disagree with the header.
        """
        mine = self.header.guardian(keys.guardian.id)
        if mine is None:
            raise NotAuthorizedError(
                f"{_WHAT} {self.header.name!r}: guardian {keys.guardian.name!r}"
                f" ({keys.guardian.id}) is neither its owner nor one of its guardians",
                hint="only the owner and the guardians it lists can open the secrets",
            )
        kid = mine.guardian.encryption_kid
        if jose.thumbprint(keys.encryption_key) != kid:
            raise NotAuthorizedError(
                f"{_WHAT}: the encryption key given is not guardian {mine.guardian.name!r}'s"
            )
        secrets = unseal(self.sealed_secrets, kid, keys.encryption_key, aad=self.header.aad())
        if secrets.answer_file_kind is not self.header.answer_file_kind:
            raise FormatError(f"{_WHAT}: the sealed answer file is not the kind the header names")
        return secrets


def create_shielding_data(
    owner_keys: GuardianKeyHolder,
    guardians: Sequence[bytes],
    *,
    policy: SecurityPolicy,
    secrets: ShieldingSecrets,
    qualifiers: Sequence[VolumeIdQualifier] = (),
    name: str,
    created_at: int,
) -> bytes:
    """Seal ``secrets`` for the owner and ``guardians`` and sign the whole as the owner.

    Args:
        owner_keys: the owner guardian with its private keys (it signs).
        guardians: public guardian documents of the fabrics that may run the VM;
            each is verified, and the header lists them sorted by id.
        policy: shielded or encryption-supported.
        secrets: what only guardians may read.
        qualifiers: which template disks the VM may be provisioned from.
        name: a label for people (1-255 printable characters).
        created_at: seconds since the epoch (formats keep no clock).

    Returns:
        The file's bytes (one compact JWS and a newline).

    Raises:
        FormatError: an argument is invalid, or the file would be too large.
        VerificationError: a guardian document's self-signature does not verify.
    """
    owner = GuardianDocument.load(
        sign_guardian_document(owner_keys.guardian, owner_keys.signing_key), what=f"{_WHAT} owner"
    )
    loaded = [GuardianDocument.load(doc, what=f"{_WHAT} guardian") for doc in guardians]
    header = ShieldingDataHeader(
        name=name,
        pdk_id=b64url_encode(os.urandom(_PDK_ID_BYTES)),
        policy=policy,
        owner=owner,
        guardians=tuple(sorted(loaded, key=lambda g: g.id)),
        qualifiers=tuple(qualifiers),
        created_at=created_at,
        answer_file_kind=secrets.answer_file_kind,
    )
    sealed = seal(secrets, header.recipients(), aad=header.aad())
    body = {"type": PDK_PAYLOAD_TYPE, "version": PDK_VERSION, "header": header.to_dict()}
    payload = canonical_json({**body, "secrets": sealed})
    token = jose.sign_compact(payload, owner_keys.signing_key, typ=PDK_JWS_TYPE)
    data = token.encode("ascii") + b"\n"
    if len(data) > MAX_SHIELDING_DATA_BYTES:
        raise FormatError(
            f"{_WHAT}: the file would be {len(data)} bytes, over the limit of"
            f" {MAX_SHIELDING_DATA_BYTES}",
            hint="use fewer or smaller files, guardians or qualifiers",
        )
    return data


def load_shielding_data(data: bytes, *, expected_owner: str | None = None) -> ShieldingData:
    """Verify a shielding data file's owner signature, then parse its public header.

    The owner's key comes from the guardian document embedded in the header; it
    is the only field read before the signature over the exact bytes verifies
    (and only to verify with). Nothing is decrypted here.

    Args:
        data: the file's bytes.
        expected_owner: if given, the guardian id the owner must have (pin it
            whenever the owner is known, since anyone can sign as themselves).

    Raises:
        FormatError: not a shielding data file of this version, too large or malformed.
        VerificationError: the owner's signature does not verify, the signer is not
            the expected owner, or the secrets are not sealed to the header's guardians.
    """
    token = _token_from_bytes(data)
    claimed = _claimed_owner(token)
    verified = jose.verify_compact(
        token, claimed.guardian.signing_key, typ=PDK_JWS_TYPE, what=_WHAT
    )
    if verified.header.get("kid") != claimed.id:
        raise VerificationError(f"{_WHAT}: the signature's key id is not the owner's id")
    body = _verified_body(verified.payload)
    header = ShieldingDataHeader.from_dict(body["header"])
    if header.owner.document != claimed.document:
        raise VerificationError(f"{_WHAT}: the owner changed between verification and parsing")
    if expected_owner is not None and header.owner.id != expected_owner:
        raise VerificationError(
            f"{_WHAT}: signed by guardian {header.owner.guardian.name!r} ({header.owner.id}),"
            f" not the expected owner {expected_owner}",
            hint="someone other than the VM's owner made or re-signed this file",
        )
    sealed = check_sealed(body["secrets"], header.recipients(), aad=header.aad())
    return ShieldingData(header=header, sealed_secrets=sealed)


def _token_from_bytes(data: bytes) -> str:
    if not isinstance(data, bytes):
        raise FormatError(f"{_WHAT}: expected bytes")
    if len(data) > MAX_SHIELDING_DATA_BYTES:
        raise FormatError(
            f"{_WHAT}: {len(data)} bytes is larger than the limit of {MAX_SHIELDING_DATA_BYTES}"
        )
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise FormatError(f"{_WHAT}: not a compact JWS (non-ASCII bytes)") from None
    if token.count(".") != 2:
        raise FormatError(f"{_WHAT}: not a compact JWS (truncated or not a PDK)")
    return token


def _check_type_and_version(body: dict[str, Any]) -> None:
    if body.get("type") != PDK_PAYLOAD_TYPE:
        raise FormatError(f"{_WHAT}: type is not {PDK_PAYLOAD_TYPE!r}")
    version = body.get("version")
    if isinstance(version, bool) or version != PDK_VERSION:
        raise FormatError(
            f"{_WHAT}: version {version!r} is not supported (expected {PDK_VERSION})",
            hint="this guardfab release reads version 1 only",
        )


def _claimed_owner(token: str) -> GuardianDocument:
    """Peek at the unverified payload for the owner document, only to verify with it.

    The document's own self-signature is checked; whether that guardian signed
    the file is decided by the caller's signature check, never here.
    """
    raw = b64url_decode(token.split(".")[1], what=f"{_WHAT} payload")
    body = require_dict(
        load_json_document(raw, what=_WHAT, max_bytes=MAX_SHIELDING_DATA_BYTES), what=_WHAT
    )
    _check_type_and_version(body)
    header = require_dict(body.get("header"), what=f"{_WHAT} header")
    owner = require_str(header, "owner", what=f"{_WHAT} header", max_len=MAX_GUARDIAN_BYTES)
    return GuardianDocument.load(owner, what=f"{_WHAT} owner")


def _verified_body(payload: bytes) -> dict[str, Any]:
    """Parse the verified payload; it must be canonical JSON (so no duplicate keys)."""
    body = require_dict(
        load_json_document(payload, what=_WHAT, max_bytes=MAX_SHIELDING_DATA_BYTES), what=_WHAT
    )
    try:
        canonical = canonical_json(body)
    except ValueError as exc:
        raise FormatError(f"{_WHAT}: payload cannot be canonical JSON ({exc})") from None
    if canonical != payload:
        raise FormatError(f"{_WHAT}: payload is not canonical JSON (RFC 8785)")
    reject_unknown_fields(body, _BODY_FIELDS, what=_WHAT)
    _check_type_and_version(body)
    return body
