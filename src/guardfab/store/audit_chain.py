"""Audit records, the hash chain over them, and signed checkpoints -- all pure.

A record is a canonical JSON object (RFC 8785)::

    {seq, time, kind, actor, subject, outcome, details, prev, hash}

where ``hash`` is the hex SHA-256 of the canonical JSON of every other field and
``prev`` is the previous record's ``hash`` (64 zeros for record 1). Editing,
deleting, reordering or inserting a record breaks a link that
:class:`ChainVerifier` names by sequence number. Cutting records off the tail
and rewriting the head consistently is only caught against a signed
:class:`AuditCheckpoint` kept elsewhere.

Nothing here touches the store; :mod:`guardfab.store.audit` does the I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from guardfab.errors import FormatError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.store.errors import AuditChainError, StoreUsageError

#: ``prev`` of the first record.
GENESIS_HASH = "0" * 64
#: JWS ``typ`` of a signed checkpoint.
CHECKPOINT_JWS_TYPE = "guardfab-audit-checkpoint+jws"
#: ``type`` field inside a checkpoint payload.
CHECKPOINT_PAYLOAD_TYPE = "guardfab.audit-checkpoint"
#: Largest canonical ``details`` object: audit records describe, they do not carry.
MAX_DETAILS_BYTES = 16 * 1024
#: Largest stored record accepted when reading.
MAX_RECORD_BYTES = MAX_DETAILS_BYTES + 4096

_TOKEN = re.compile(r"[a-z][a-z0-9-]{0,31}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
#: ``details`` keys that look like secrets are refused: a tripwire for callers
#: that pass whole request objects, not a guarantee.
_SECRET_WORDS = ("secret", "password", "passphrase", "private", "seed", "psk")
_RECORD_FIELDS = {"seq", "time", "kind", "actor", "subject", "outcome", "details", "prev", "hash"}
_MAX_NAME = 256


def format_time(seconds: float) -> str:
    """Render clock seconds as RFC 3339 UTC with milliseconds, the record's ``time``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class AuditRecord:
    """One link of the audit chain."""

    seq: int
    time: str
    kind: str
    actor: str
    subject: str
    outcome: str
    details: dict[str, Any]
    prev: str
    hash: str

    def body(self) -> dict[str, Any]:
        """Return every field except ``hash``: what the hash covers."""
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "outcome": self.outcome,
            "details": self.details,
            "prev": self.prev,
        }

    def computed_hash(self) -> str:
        """Return the SHA-256 of the canonical body, to compare with ``hash``."""
        return hashlib.sha256(canonical_json(self.body())).hexdigest()

    def to_bytes(self) -> bytes:
        """Serialize as stored: canonical JSON of the body plus ``hash``."""
        return canonical_json({**self.body(), "hash": self.hash})

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str) -> AuditRecord:
        """Parse a stored record strictly (the hash is checked by the verifier).

        Raises:
            FormatError: not a record of this version.
        """
        obj = require_dict(
            load_json_document(data, what=what, max_bytes=MAX_RECORD_BYTES), what=what
        )
        reject_unknown_fields(obj, _RECORD_FIELDS, what=what)
        details = obj.get("details")
        if not isinstance(details, dict):
            raise FormatError(f"{what}: field 'details' must be a JSON object")
        return cls(
            seq=require_int(obj, "seq", what=what),
            time=_require_match(obj, "time", _TIME, what=what),
            kind=_require_match(obj, "kind", _TOKEN, what=what),
            actor=require_str(obj, "actor", what=what, max_len=_MAX_NAME),
            subject=require_str(obj, "subject", what=what, max_len=_MAX_NAME),
            outcome=_require_match(obj, "outcome", _TOKEN, what=what),
            details=details,
            prev=_require_match(obj, "prev", _HEX64, what=what),
            hash=_require_match(obj, "hash", _HEX64, what=what),
        )


def _require_match(obj: dict[str, Any], key: str, pattern: re.Pattern[str], *, what: str) -> str:
    value = require_str(obj, key, what=what, max_len=128)
    if not pattern.fullmatch(value):
        raise FormatError(f"{what}: field '{key}' is not in the expected form")
    return value


@dataclass(frozen=True)
class AuditEvent:
    """What a caller wants recorded; validated before it joins the chain.

    Attributes:
        kind: What happened (``attestation``, ``key-release``, ``admin``...).
        actor: Who asked (a host id, an admin name).
        subject: What it was about (a VM, a policy, a host).
        outcome: ``success``, ``failure``, ``denied``...
        details: Non-secret facts (failed policy names, certificate ids).
    """

    kind: str
    actor: str
    subject: str
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("kind", "outcome"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _TOKEN.fullmatch(value):
                raise StoreUsageError(f"audit {name} must be a lowercase token like 'attestation'")
        for name in ("actor", "subject"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > _MAX_NAME or not value.isprintable():
                raise StoreUsageError(f"audit {name} must be printable text of at most 256 chars")
        # Keep a JSON-normalized private copy: what is hashed is what is returned.
        object.__setattr__(self, "details", _normalized_details(self.details))

    def link(self, *, seq: int, time: float, prev: str) -> AuditRecord:
        """Return the record for this event as number ``seq`` after ``prev``."""
        unsigned = AuditRecord(
            seq, format_time(time), self.kind, self.actor, self.subject, self.outcome,
            self.details, prev, hash="",
        )  # fmt: skip
        return dataclasses.replace(unsigned, hash=unsigned.computed_hash())


def _normalized_details(details: object) -> dict[str, Any]:
    if not isinstance(details, dict):
        raise StoreUsageError("audit details must be a dict")
    try:
        data = canonical_json(details)
    except (ValueError, RecursionError) as exc:
        raise StoreUsageError("audit details must be plain JSON (str keys, no NaN)") from exc
    if len(data) > MAX_DETAILS_BYTES:
        raise StoreUsageError(f"audit details must be at most {MAX_DETAILS_BYTES} bytes")
    _refuse_secret_keys(details)
    normalized: dict[str, Any] = json.loads(data)
    return normalized


def _refuse_secret_keys(value: object) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if any(word in str(key).lower() for word in _SECRET_WORDS):
                raise StoreUsageError(f"audit details must not carry secrets (key {key!r})")
            _refuse_secret_keys(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_secret_keys(item)


@dataclass(frozen=True)
class AuditHead:
    """The head pointer: the last record's number and hash."""

    seq: int
    hash: str

    def to_bytes(self) -> bytes:
        """Serialize as stored."""
        return canonical_json({"seq": self.seq, "hash": self.hash})

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditHead:
        """Parse a stored head pointer.

        Raises:
            AuditChainError: the head is not a valid pointer (reason ``head-mismatch``).
        """
        what = "audit head"
        try:
            obj = require_dict(load_json_document(data, what=what, max_bytes=1024), what=what)
            reject_unknown_fields(obj, {"seq", "hash"}, what=what)
            return cls(
                require_int(obj, "seq", what=what), _require_match(obj, "hash", _HEX64, what=what)
            )
        except FormatError as exc:
            raise AuditChainError(str(exc), seq=None, reason="head-mismatch") from exc


EMPTY_HEAD = AuditHead(0, GENESIS_HASH)


@dataclass(frozen=True)
class AuditCheckpoint:
    """A signed statement "the log had ``seq`` records ending in ``hash`` at ``time``"."""

    seq: int
    hash: str
    time: str

    def sign(self, key: jose.AsymmetricKey) -> str:
        """Return a compact JWS over the canonical checkpoint."""
        payload = {
            "type": CHECKPOINT_PAYLOAD_TYPE,
            "seq": self.seq,
            "hash": self.hash,
            "time": self.time,
        }
        return jose.sign_compact(canonical_json(payload), key, typ=CHECKPOINT_JWS_TYPE)

    @classmethod
    def verify(cls, token: str, key: jose.AsymmetricKey) -> AuditCheckpoint:
        """Verify the signature first, then parse the payload.

        Raises:
            VerificationError: bad signature or wrong type.
            FormatError: the verified payload is not a checkpoint.
        """
        what = "audit checkpoint"
        verified = jose.verify_compact(token, key, typ=CHECKPOINT_JWS_TYPE, what=what)
        obj = require_dict(load_json_document(verified.payload, what=what), what=what)
        reject_unknown_fields(obj, {"type", "seq", "hash", "time"}, what=what)
        if obj.get("type") != CHECKPOINT_PAYLOAD_TYPE:
            raise FormatError(f"{what}: wrong payload type")
        return cls(
            require_int(obj, "seq", what=what),
            _require_match(obj, "hash", _HEX64, what=what),
            _require_match(obj, "time", _TIME, what=what),
        )


@dataclass(frozen=True)
class AuditReport:
    """What a successful verification saw, for ``hgs audit verify`` to print."""

    records: int
    head: AuditHead
    first_time: str | None
    last_time: str | None
    kinds: dict[str, int]
    outcomes: dict[str, int]
    checkpoint_seq: int | None


class ChainVerifier:
    """Walks records in key order and raises at the first broken link.

    Args:
        head: The head pointer read before the records, or ``None`` if absent.
        snapshot_revision: The store revision when ``head`` was read. Records
            numbered beyond the head but written after this revision were appended
            during the walk and are skipped; older ones are tampering.
        checkpoint: A verified checkpoint the chain must contain.
    """

    def __init__(
        self,
        head: AuditHead | None,
        snapshot_revision: int,
        checkpoint: AuditCheckpoint | None = None,
    ) -> None:
        self._head = head or EMPTY_HEAD
        self._snapshot = snapshot_revision
        self._checkpoint = checkpoint
        self._expected = 1
        self._prev = GENESIS_HASH
        self._first_time: str | None = None
        self._last_time: str | None = None
        self._kinds: Counter[str] = Counter()
        self._outcomes: Counter[str] = Counter()

    def feed(self, seq: int, value: bytes, revision: int) -> None:
        """Check the record stored under number ``seq`` at store ``revision``.

        Raises:
            AuditChainError: naming ``seq`` (or the missing one before it).
        """
        if seq > self._head.seq:
            if revision > self._snapshot:
                return
            raise AuditChainError(
                f"record exists beyond the head ({self._head.seq})", seq=seq, reason="beyond-head"
            )
        if seq != self._expected:
            raise AuditChainError("record is missing", seq=self._expected, reason="gap")
        record = _parse(value, seq)
        if record.seq != seq:
            raise AuditChainError(
                f"record stored at this position says seq {record.seq}", seq=seq, reason="reordered"
            )
        if not hmac.compare_digest(record.computed_hash(), record.hash):
            raise AuditChainError(
                "record content does not match its hash", seq=seq, reason="edited"
            )
        if not hmac.compare_digest(record.prev, self._prev):
            raise AuditChainError(
                "record does not link to the previous record's hash",
                seq=seq,
                reason="prev-mismatch",
            )
        self._check_checkpoint_link(record)
        self._prev = record.hash
        self._expected += 1
        self._first_time = self._first_time or record.time
        self._last_time = record.time
        self._kinds[record.kind] += 1
        self._outcomes[record.outcome] += 1

    def _check_checkpoint_link(self, record: AuditRecord) -> None:
        checkpoint = self._checkpoint
        if (
            checkpoint is not None
            and record.seq == checkpoint.seq
            and not hmac.compare_digest(record.hash, checkpoint.hash)
        ):
            raise AuditChainError(
                "record differs from the signed checkpoint", seq=record.seq, reason="checkpoint"
            )

    def finish(self) -> AuditReport:
        """Check the end of the chain against the head and the checkpoint.

        Raises:
            AuditChainError: truncated chain, head mismatch or a missing checkpoint.
        """
        last = self._expected - 1
        if last < self._head.seq:
            raise AuditChainError(
                f"the head names {self._head.seq} records but the log ends at {last}",
                seq=last + 1,
                reason="truncated",
            )
        if not hmac.compare_digest(self._prev, self._head.hash):
            raise AuditChainError(
                "the head hash does not match the last record", seq=last, reason="head-mismatch"
            )
        checkpoint = self._checkpoint
        if checkpoint is not None and checkpoint.seq > last:
            raise AuditChainError(
                f"a signed checkpoint covers {checkpoint.seq} records but the log ends at {last}",
                seq=last + 1,
                reason="truncated",
            )
        if checkpoint is not None and checkpoint.seq == 0 and checkpoint.hash != GENESIS_HASH:
            raise AuditChainError("the signed checkpoint is malformed", seq=0, reason="checkpoint")
        return AuditReport(
            records=last,
            head=self._head,
            first_time=self._first_time,
            last_time=self._last_time,
            kinds=dict(self._kinds),
            outcomes=dict(self._outcomes),
            checkpoint_seq=None if checkpoint is None else checkpoint.seq,
        )


def _parse(value: bytes, seq: int) -> AuditRecord:
    try:
        return AuditRecord.from_bytes(value, what=f"audit record {seq}")
    except FormatError as exc:
        raise AuditChainError(f"not a valid record ({exc})", seq=seq, reason="malformed") from exc
