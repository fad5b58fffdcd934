"""Template disk signatures, volume signature catalogs and volume ID qualifiers.

A publisher signs a template disk by signing a small statement -- the disk's
Merkle digest, its size, a name and a four-part version -- as a compact JWS
(RFC 7515) stored beside the disk. A tenant who trusts that publisher keeps a
*volume signature catalog* (VSC: publisher key, name, version) and turns it into
a *volume ID qualifier* (catalog + version rule) inside its shielding data, so a
host only provisions a disk whose signature the qualifier admits.

Everything here is pure: bytes and keys in, verified objects out. Reading the
disk lives in :mod:`guardfab.tenant.template`; the tree math in
:mod:`guardfab.formats.merkle`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import FormatError, NotAuthorizedError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)

#: ``type`` member of a disk signature statement payload.
STATEMENT_TYPE = "guardfab-disk-signature"
#: JOSE ``typ`` of the signed statement, so no other guardfab JWS can stand in for it.
STATEMENT_TYP = "guardfab-disk-signature+jws"
#: ``type`` member of a volume signature catalog.
CATALOG_TYPE = "guardfab-volume-signature-catalog"
#: JOSE ``typ`` of the catalog's self-signature.
CATALOG_TYP = "guardfab-vsc+jws"
#: ``type`` member of a volume ID qualifier.
QUALIFIER_TYPE = "guardfab-volume-id-qualifier"
#: The one format version of every document in this module.
FORMAT_VERSION = 1

#: The digest algorithm: RFC 6962-style SHA-256 Merkle tree over fixed-size chunks.
DIGEST_ALG = "sha256-merkle"
#: Chunk sizes are powers of two in this range: the lower bound keeps the tree
#: (and a region proof) small, the upper bound keeps a verifier's buffers small
#: even when the statement comes from an attacker.
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: The largest size RFC 8785 can sign exactly (I-JSON safe integers): 8 PiB.
MAX_DISK_SIZE = 2**53 - 1

#: A signature file, a catalog or a qualifier is a few KB; anything larger is not one.
MAX_SIGNATURE_BYTES = 16 * 1024
MAX_CATALOG_BYTES = 16 * 1024
MAX_QUALIFIER_BYTES = 16 * 1024

MAX_NAME_LENGTH = 255
#: Windows ``System.Version`` components are Int32; keep the same range.
MAX_VERSION_COMPONENT = 2**31 - 1

_VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,9})(\.(0|[1-9][0-9]{0,9})){3}")
_HEX_ROOT_RE = re.compile(r"[0-9a-f]{64}")
_THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, order=True)
class DiskVersion:
    """A four-part template version ``major.minor.build.revision``, ordered numerically.

    The text form is canonical (no leading zeros, no signs, no spaces), so a
    version that round-trips through ``str`` is byte-for-byte the signed one.
    """

    major: int
    minor: int
    build: int
    revision: int

    def __post_init__(self) -> None:
        for part in (self.major, self.minor, self.build, self.revision):
            if isinstance(part, bool) or not isinstance(part, int):
                raise FormatError("disk version: every component must be an integer")
            if not 0 <= part <= MAX_VERSION_COMPONENT:
                raise FormatError(
                    f"disk version: components must be between 0 and {MAX_VERSION_COMPONENT}"
                )

    @classmethod
    def parse(cls, text: Any) -> DiskVersion:
        """Parse ``a.b.c.d`` (four decimal integers, no leading zeros).

        Raises:
            FormatError: ``text`` is not exactly four canonical decimal components.
        """
        if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
            shown = text[:40] if isinstance(text, str) else type(text).__name__
            raise FormatError(
                f"disk version {shown!r} is not of the form a.b.c.d",
                hint="use four decimal numbers without leading zeros, e.g. 10.0.1.0",
            )
        major, minor, build, revision = (int(part) for part in text.split("."))
        return cls(major, minor, build, revision)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}.{self.revision}"


class VersionRule(enum.Enum):
    """How a qualifier compares a disk's version with its own (Windows' VolumeIdQualifier)."""

    EQUALS = "equals"
    GREATER_THAN = "greater-than"
    GREATER_THAN_OR_EQUAL = "greater-than-or-equal"

    @classmethod
    def parse(cls, text: Any) -> VersionRule:
        """Parse a rule name, raising FormatError naming the allowed ones."""
        for rule in cls:
            if rule.value == text:
                return rule
        allowed = ", ".join(rule.value for rule in cls)
        raise FormatError(f"version rule must be one of: {allowed}")

    def admits(self, candidate: DiskVersion, reference: DiskVersion) -> bool:
        """Whether a disk at ``candidate`` satisfies this rule against ``reference``."""
        if self is VersionRule.EQUALS:
            return candidate == reference
        if self is VersionRule.GREATER_THAN:
            return candidate > reference
        return candidate >= reference


@dataclass(frozen=True)
class PublisherKey:
    """A template publisher's public key, identified by its RFC 7638 thumbprint."""

    key: jose.AsymmetricKey = field(compare=False, repr=False)
    thumbprint: str

    @classmethod
    def from_key(cls, key: jose.AsymmetricKey) -> PublisherKey:
        """Wrap a public (or private: only its public half is kept) joserfc key."""
        public = jose.import_public_jwk(jose.public_jwk(key), what="publisher key")
        return cls(key=public, thumbprint=jose.thumbprint(public))

    @classmethod
    def from_jwk(cls, value: Any, *, what: str) -> PublisherKey:
        """Import a public JWK, refusing private parts and weak or unknown keys."""
        key = jose.import_public_jwk(value, what=what)
        return cls(key=key, thumbprint=jose.thumbprint(key))

    def to_jwk(self) -> dict[str, Any]:
        """The public JWK members (no ``kid``)."""
        return jose.public_jwk(self.key)


def _require_header(obj: dict[str, Any], expected_type: str, *, what: str) -> None:
    if obj.get("type") != expected_type:
        raise FormatError(f"{what}: type must be {expected_type!r}")
    version = obj.get("version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise FormatError(
            f"{what}: format version {version!r} is not supported (expected {FORMAT_VERSION})",
            hint="this guardfab release reads version 1 only",
        )


def _require_name(obj: dict[str, Any], *, what: str) -> str:
    name = require_str(obj, "name", what=what, max_len=MAX_NAME_LENGTH)
    return check_name(name, what=what)


def check_name(name: str, *, what: str = "template name") -> str:
    """Return ``name`` if it is 1-255 printable characters, else raise FormatError.

    Names are compared exactly (case-sensitive); control characters are refused
    so a name shown to a person is the name that is checked.
    """
    if not name or len(name) > MAX_NAME_LENGTH:
        raise FormatError(f"{what}: name must be 1 to {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise FormatError(f"{what}: name must not contain control characters")
    return name


@dataclass(frozen=True)
class DiskDigest:
    """The Merkle digest of a disk: the bound root and the chunk size it was built with."""

    root: bytes
    chunk_size: int
    alg: str = DIGEST_ALG

    def __post_init__(self) -> None:
        if self.alg != DIGEST_ALG:
            raise FormatError(f"disk digest: algorithm must be {DIGEST_ALG!r}")
        if not isinstance(self.root, bytes) or len(self.root) != 32:
            raise FormatError("disk digest: root must be 32 bytes")
        check_chunk_size(self.chunk_size)

    @classmethod
    def from_dict(cls, value: Any) -> DiskDigest:
        """Load ``{"alg", "root", "chunk_size"}``, rejecting anything else."""
        what = "disk digest"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, {"alg", "root", "chunk_size"}, what=what)
        alg = require_str(obj, "alg", what=what, max_len=64)
        root = require_str(obj, "root", what=what, max_len=64)
        if not _HEX_ROOT_RE.fullmatch(root):
            raise FormatError(f"{what}: root must be 64 lowercase hex digits")
        chunk_size = require_int(obj, "chunk_size", what=what)
        return cls(root=bytes.fromhex(root), chunk_size=chunk_size, alg=alg)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that gets signed."""
        return {"alg": self.alg, "root": self.root.hex(), "chunk_size": self.chunk_size}


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if it is an allowed power of two, else raise FormatError."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise FormatError("disk digest: chunk size must be an integer")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise FormatError(
            f"disk digest: chunk size {chunk_size} must be a power of two "
            f"between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )
    return chunk_size


@dataclass(frozen=True)
class DiskSignatureStatement:
    """What a publisher signs about a template disk: name, version, size and digest."""

    name: str
    disk_version: DiskVersion
    size: int
    digest: DiskDigest

    def __post_init__(self) -> None:
        check_name(self.name, what="disk signature")
        if isinstance(self.size, bool) or not 0 < self.size <= MAX_DISK_SIZE:
            raise FormatError(f"disk signature: size must be between 1 and {MAX_DISK_SIZE} bytes")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form whose canonical bytes are the JWS payload."""
        return {
            "type": STATEMENT_TYPE,
            "version": FORMAT_VERSION,
            "name": self.name,
            "disk_version": str(self.disk_version),
            "size": self.size,
            "digest": self.digest.to_dict(),
        }

    @classmethod
    def from_dict(cls, value: Any) -> DiskSignatureStatement:
        """Load a statement payload; only call this on bytes whose signature verified."""
        what = "disk signature"
        obj = require_dict(value, what=what)
        _require_header(obj, STATEMENT_TYPE, what=what)
        reject_unknown_fields(
            obj, {"type", "version", "name", "disk_version", "size", "digest"}, what=what
        )
        return cls(
            name=_require_name(obj, what=what),
            disk_version=DiskVersion.parse(obj.get("disk_version")),
            size=require_int(obj, "size", what=what),
            digest=DiskDigest.from_dict(obj.get("digest")),
        )

    @classmethod
    def from_bytes(cls, payload: bytes) -> DiskSignatureStatement:
        """Parse verified payload bytes (bounded JSON)."""
        document = load_json_document(payload, what="disk signature", max_bytes=MAX_SIGNATURE_BYTES)
        return cls.from_dict(document)

    def sign(self, private_key: jose.AsymmetricKey) -> bytes:
        """Sign this statement as a compact JWS; the bytes to store beside the disk."""
        token = jose.sign_compact(canonical_json(self.to_dict()), private_key, typ=STATEMENT_TYP)
        return token.encode("ascii") + b"\n"


@dataclass(frozen=True)
class VerifiedDiskSignature:
    """A statement whose signature verified, and the publisher whose key verified it.

    Only :func:`verify_disk_signature` should make one: holding this object is
    the proof that ``publisher`` signed ``statement``.
    """

    statement: DiskSignatureStatement
    publisher: PublisherKey


def _token_from_bytes(data: bytes, *, what: str, limit: int) -> str:
    if len(data) > limit:
        raise FormatError(f"{what}: {len(data)} bytes is larger than the limit of {limit}")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not a compact JWS (non-ASCII bytes)") from exc


def verify_disk_signature(data: bytes, publisher: PublisherKey) -> VerifiedDiskSignature:
    """Verify a signature file against the trusted ``publisher``, then parse it.

    Verify, then parse: no field of the statement is read before the signature
    over the exact received bytes has verified against ``publisher``.

    Raises:
        FormatError: the file is not a compact JWS or its payload is malformed.
        VerificationError: the signature does not verify with ``publisher``.
    """
    what = "disk signature"
    token = _token_from_bytes(data, what=what, limit=MAX_SIGNATURE_BYTES)
    try:
        verified = jose.verify_compact(token, publisher.key, typ=STATEMENT_TYP, what=what)
    except VerificationError as exc:
        kid = jws_header_kid(data)
        if kid is not None and kid != publisher.thumbprint:
            exc.hint = (
                f"it claims to be signed by key {kid}, not the trusted publisher "
                f"{publisher.thumbprint}"
            )
        raise
    if verified.header.get("kid") != publisher.thumbprint:
        raise VerificationError(f"{what}: key id does not name the publisher key")
    statement = DiskSignatureStatement.from_bytes(verified.payload)
    return VerifiedDiskSignature(statement=statement, publisher=publisher)


@dataclass(frozen=True)
class VolumeSignatureCatalog:
    """A VSC: which publisher, template name and version a tenant has chosen to trust.

    On disk it is self-signed by the publisher, which proves the publisher holds
    the key and declared this name and version; trust in the key itself comes
    from how the tenant obtained the catalog.
    """

    publisher: PublisherKey
    name: str
    disk_version: DiskVersion

    def __post_init__(self) -> None:
        check_name(self.name, what="volume signature catalog")

    def _payload(self) -> dict[str, Any]:
        return {
            "type": CATALOG_TYPE,
            "version": FORMAT_VERSION,
            "publisher": self.publisher.thumbprint,
            "name": self.name,
            "disk_version": str(self.disk_version),
        }

    def sign(self, private_key: jose.AsymmetricKey) -> bytes:
        """Return the catalog file, self-signed with the publisher's ``private_key``.

        Raises:
            NotAuthorizedError: ``private_key`` is not the catalog's publisher key.
        """
        if jose.thumbprint(private_key) != self.publisher.thumbprint:
            raise NotAuthorizedError("volume signature catalog: signing key is not the publisher")
        token = jose.sign_compact(canonical_json(self._payload()), private_key, typ=CATALOG_TYP)
        return canonical_json({"publisher": self.publisher.to_jwk(), "catalog": token}) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> VolumeSignatureCatalog:
        """Load a catalog file and check its self-signature before reading its fields.

        Raises:
            FormatError: not a catalog of this version.
            VerificationError: the self-signature does not verify.
        """
        what = "volume signature catalog"
        outer = require_dict(
            load_json_document(data, what=what, max_bytes=MAX_CATALOG_BYTES), what=what
        )
        reject_unknown_fields(outer, {"publisher", "catalog"}, what=what)
        publisher = PublisherKey.from_jwk(outer.get("publisher"), what=f"{what} publisher")
        token = require_str(outer, "catalog", what=what, max_len=MAX_CATALOG_BYTES)
        verified = jose.verify_compact(token, publisher.key, typ=CATALOG_TYP, what=what)
        payload = require_dict(
            load_json_document(verified.payload, what=what, max_bytes=MAX_CATALOG_BYTES), what=what
        )
        _require_header(payload, CATALOG_TYPE, what=what)
        reject_unknown_fields(
            payload, {"type", "version", "publisher", "name", "disk_version"}, what=what
        )
        if payload.get("publisher") != publisher.thumbprint:
            raise VerificationError(f"{what}: signed publisher does not match the enclosed key")
        return cls(
            publisher=publisher,
            name=_require_name(payload, what=what),
            disk_version=DiskVersion.parse(payload.get("disk_version")),
        )

    def qualifier(self, rule: VersionRule) -> VolumeIdQualifier:
        """The volume ID qualifier admitting this catalog's template under ``rule``."""
        return VolumeIdQualifier(
            publisher=self.publisher, name=self.name, disk_version=self.disk_version, rule=rule
        )


@dataclass(frozen=True)
class VolumeIdQualifier:
    """Which template disks a shielded VM may be provisioned from.

    A disk qualifies when its signature verifies with ``publisher``, names
    ``name`` exactly, and its version satisfies ``rule`` against ``disk_version``.
    Qualifiers travel inside shielding data, which the tenant signs; they carry
    the full public key because the host needs it to verify the disk signature.
    """

    publisher: PublisherKey
    name: str
    disk_version: DiskVersion
    rule: VersionRule

    def __post_init__(self) -> None:
        check_name(self.name, what="volume ID qualifier")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (embedded in shielding data)."""
        return {
            "type": QUALIFIER_TYPE,
            "version": FORMAT_VERSION,
            "publisher": self.publisher.to_jwk(),
            "name": self.name,
            "disk_version": str(self.disk_version),
            "rule": self.rule.value,
        }

    @classmethod
    def from_dict(cls, value: Any) -> VolumeIdQualifier:
        """Load the JSON form, rejecting unknown fields and other versions."""
        what = "volume ID qualifier"
        obj = require_dict(value, what=what)
        _require_header(obj, QUALIFIER_TYPE, what=what)
        reject_unknown_fields(
            obj, {"type", "version", "publisher", "name", "disk_version", "rule"}, what=what
        )
        return cls(
            publisher=PublisherKey.from_jwk(obj.get("publisher"), what=f"{what} publisher"),
            name=_require_name(obj, what=what),
            disk_version=DiskVersion.parse(obj.get("disk_version")),
            rule=VersionRule.parse(obj.get("rule")),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VolumeIdQualifier:
        """Load a qualifier file (bounded JSON)."""
        what = "volume ID qualifier"
        return cls.from_dict(load_json_document(data, what=what, max_bytes=MAX_QUALIFIER_BYTES))

    def to_bytes(self) -> bytes:
        """The canonical file form."""
        return canonical_json(self.to_dict()) + b"\n"

    def failures(self, signature: VerifiedDiskSignature) -> list[str]:
        """Every reason ``signature`` does not qualify (empty when it does), for reports."""
        problems = []
        if signature.publisher.thumbprint != self.publisher.thumbprint:
            problems.append(
                f"publisher {signature.publisher.thumbprint} is not {self.publisher.thumbprint}"
            )
        statement = signature.statement
        if statement.name != self.name:
            problems.append(f"name {statement.name!r} is not {self.name!r}")
        if not self.rule.admits(statement.disk_version, self.disk_version):
            problems.append(
                f"version {statement.disk_version} is not {self.rule.value} {self.disk_version}"
            )
        return problems

    def check(self, signature: VerifiedDiskSignature) -> None:
        """Raise NotAuthorizedError listing every reason ``signature`` does not qualify."""
        problems = self.failures(signature)
        if problems:
            raise NotAuthorizedError(
                "template disk does not satisfy the volume ID qualifier: " + "; ".join(problems),
                hint="provision from a disk signed by the qualifier's publisher, name and version",
            )

    def matches(self, signature: VerifiedDiskSignature) -> bool:
        """Whether ``signature`` qualifies; :meth:`check` says why not."""
        return not self.failures(signature)

    def verify(self, data: bytes) -> VerifiedDiskSignature:
        """The provisioning check: verify a signature file with this publisher, then qualify it.

        Raises:
            FormatError, VerificationError: the signature file is bad or not this publisher's.
            NotAuthorizedError: it verified but the name or version is not admitted.
        """
        signature = verify_disk_signature(data, self.publisher)
        self.check(signature)
        return signature


def jws_header_kid(data: bytes) -> str | None:
    """Best-effort ``kid`` of a compact JWS, for error hints only (never for trust)."""
    try:
        token = _token_from_bytes(data, what="signature", limit=MAX_SIGNATURE_BYTES)
        header = load_json_document(
            b64url_decode(token.split(".", 1)[0], what="JWS header"), what="JWS header"
        )
    except FormatError:
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) and _THUMBPRINT_RE.fullmatch(kid) else None
