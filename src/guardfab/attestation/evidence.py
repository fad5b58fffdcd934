"""Typed attestation evidence: the JSON body of ``POST /attestation/v1/attest``.

Three modes, one loader (:func:`evidence_from_dict`). Loading is strict on
purpose: unknown fields are rejected (nothing unverified rides along into a
health certificate), every binary field is unpadded base64url with a size
limit checked before decoding, PCR indexes are canonical decimal strings and
values lower-case hex. Loading checks shape only; what the bytes prove is
decided by the mode verifiers, after their signatures verify.

The host encryption key (``host_key``) is a public JWK with exactly the members
RFC 7638 names (EC: kty, crv, x, y; RSA: kty, n, e). Because the binding
(:mod:`guardfab.attestation.binding`) hashes its canonical JSON, any extra
member would be a second spelling of the same key; refusing them keeps one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from guardfab.attestation.binding import digest_of_members, host_key_digest, string_members
from guardfab.attestation.summary import pcr_map_from_dict, pcr_map_to_dict
from guardfab.attestation.trust import AttestationMode
from guardfab.errors import FormatError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_str,
)
from guardfab.tpm.constants import MAX_ATTEST_BYTES

#: A whole evidence document (the HGS should cap request bodies at this too).
MAX_EVIDENCE_BYTES = 2 * 1024 * 1024
#: TPM2B_PUBLIC of an RSA-4096 key is about 600 bytes.
MAX_TPM_PUBLIC_BYTES = 1024
MAX_EK_CERTIFICATE_BYTES = 8 * 1024
MAX_TPM_SIGNATURE_BYTES = 1024
#: Real logs are 20-100 KB; a dbx update adds about 25 KB.
MAX_EVENT_LOG_BYTES = 1024 * 1024
MAX_CLAIMS_BYTES = 16 * 1024
MAX_CHAIN_CERTIFICATES = 4
MAX_CERTIFICATE_BYTES = 8 * 1024
#: A compact JWS with a detached payload: protected header, empty payload, signature.
MAX_JWS_CHARS = 4096
_DETACHED_JWS = re.compile(r"[A-Za-z0-9_-]+\.\.[A-Za-z0-9_-]+")
_JWK_MEMBERS = {"EC": {"kty", "crv", "x", "y"}, "RSA": {"kty", "n", "e"}}
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
_TPM_FIELDS = frozenset(
    {"mode", "ek_public", "ek_certificate", "ak_public", "quote", "pcrs", "event_log", "host_key"}
)
_QUOTE_FIELDS = frozenset({"attest", "signature"})
_PCR_BANKS = frozenset({"sha256"})


def _b64(obj: Mapping[str, Any], key: str, *, what: str, max_bytes: int) -> bytes:
    """A non-empty base64url field of at most ``max_bytes`` decoded bytes."""
    text = obj.get(key)
    if not isinstance(text, str):
        raise FormatError(f"{what}: field '{key}' must be a base64url string")
    if len(text) > (max_bytes * 4 + 2) // 3:
        raise FormatError(f"{what}: field '{key}' is larger than {max_bytes} bytes")
    value = b64url_decode(text, what=f"{what} {key}")
    if not value:
        raise FormatError(f"{what}: field '{key}' is empty")
    return value


#: Identity fields decoded once per exact text: a host presents the same EK, EK
#: certificate and AK at every attestation, and the identity checks downstream
#: are cached by these bytes (one bytes object per text keeps its hash). Texts of
#: up to 4 K characters (an RSA-4096 public area is ~800, an EK certificate
#: ~1.6 K) are kept, so the cache holds at most ~30 MB, whoever fills it.
IDENTITY_TEXT_CACHE_SIZE = 4096
IDENTITY_TEXT_MAX_CHARS = 4096


def _identity_b64(obj: Mapping[str, Any], key: str, *, what: str, max_bytes: int) -> bytes:
    """:func:`_b64` of an identity field, decoded once per exact text.

    Only a plain ``str`` is looked up: a subclass could redefine equality.
    """
    text = obj.get(key)
    if type(text) is not str or len(text) > IDENTITY_TEXT_MAX_CHARS:
        return _b64(obj, key, what=what, max_bytes=max_bytes)
    return _decoded_identity(text, key, what, max_bytes)


@functools.lru_cache(maxsize=IDENTITY_TEXT_CACHE_SIZE)
def _decoded_identity(text: str, key: str, what: str, max_bytes: int) -> bytes:
    """The field decoded and checked (a failure raises and is never kept)."""
    return _b64({key: text}, key, what=what, max_bytes=max_bytes)


class DecodedLog:
    """An event log decoded from its base64url text, and what a verifier derived from it.

    The loader keeps one per distinct text (:func:`_decoded_log`) and hands it
    out with the evidence (:attr:`TpmEvidence.decoded`). ``derived`` is where
    the verifier keeps the parse and replay of ``data``
    (:mod:`guardfab.attestation.tpm_mode`): a pure function of the bytes, which
    are a pure function of the text, so a log seen again is found by its text
    alone, with no second lookup keyed by (and no hash of) the bytes. Set once,
    by the verifier, after the bytes parsed.
    """

    __slots__ = ("data", "derived")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.derived: object = None


#: Decoded event logs kept by their exact base64url text: a host sends the same
#: log at every attestation until it reboots, and decoding it costs several times
#: more than finding the text (Python hashes a new string once, ~2 us for 16 K
#: characters, and a hit compares the whole text). Only logs that decoded are
#: kept (an lru_cache keeps no exception); longer ones are decoded every time.
LOG_TEXT_CACHE_SIZE = 64
LOG_TEXT_CACHE_MAX_CHARS = 700 * 1024


def _event_log(obj: Mapping[str, Any]) -> DecodedLog:
    """The decoded ``event_log`` field of TPM evidence (the same entry for the same text).

    Only a plain ``str`` is looked up: a subclass could redefine equality.
    """
    text = obj.get("event_log")
    if type(text) is not str or len(text) > LOG_TEXT_CACHE_MAX_CHARS:
        return _decode_log(obj)
    return _decoded_log(text)


@functools.lru_cache(maxsize=LOG_TEXT_CACHE_SIZE)
def _decoded_log(text: str) -> DecodedLog:
    """One text's entry, decoded once (one argument: the text itself is the key)."""
    return _decode_log({"event_log": text})


def _decode_log(obj: Mapping[str, Any]) -> DecodedLog:
    return DecodedLog(_b64(obj, "event_log", what="TPM evidence", max_bytes=MAX_EVENT_LOG_BYTES))


def forget_decoded_logs() -> None:
    """Drop every decoded log text, and what was derived from it (the next load decodes)."""
    _decoded_log.cache_clear()


def load_host_key(value: Any, *, what: str = "host_key") -> dict[str, Any]:
    """Check a public JWK of the host encryption key and return it as given.

    A host presents the same key at every attestation, so a JWK whose members
    are all strings is checked once per exact content (sorted members); any
    other value is checked every time (and refused).

    Raises:
        FormatError: not an EC or RSA public JWK with exactly its RFC 7638 members,
            or a key too weak to wrap VM keys to.
    """
    return _loaded_host_key(value, what)[0]


def _loaded_host_key(value: Any, what: str) -> tuple[dict[str, Any], bytes | None]:
    """:func:`load_host_key`, with the key's binding digest when it was cached with it."""
    jwk = require_dict(value, what=what)
    members = string_members(jwk)
    if members is None:
        _check_key(jwk, what)
        return dict(jwk), None
    return dict(jwk), _checked_key(members, what)


@functools.lru_cache(maxsize=4096)
def _checked_key(members: tuple[tuple[str, str], ...], what: str) -> bytes:
    """:func:`_check_key` once per exact JWK, and its binding digest (failures are not kept).

    The digest (:func:`~guardfab.attestation.binding.host_key_digest`) is kept
    with the check: the verifier needs it at every attestation, and finding it
    here spares a second walk over the members and a second lookup.
    """
    _check_key(dict(members), what)
    return digest_of_members(members)


def _check_key(jwk: dict[str, Any], what: str) -> None:
    kty = jwk.get("kty")
    members = _JWK_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise FormatError(f"{what}: key type must be EC or RSA")
    reject_unknown_fields(jwk, members, what=what)
    missing = sorted(members - set(jwk))
    if missing:
        raise FormatError(f"{what}: missing member(s) {', '.join(missing)}")
    for name in members:
        require_str(jwk, name, what=what, max_len=1024)
    jose.import_public_jwk(jwk, what=what)


def canonical_claims(value: Any, *, what: str = "claims") -> bytes:
    """The canonical JSON bytes of a claims object, bounded in size.

    Raises:
        FormatError: not a JSON object, not canonicalizable (floats out of range,
            huge integers, too deep), or larger than :data:`MAX_CLAIMS_BYTES`.
    """
    claims = require_dict(value, what=what)
    try:
        data = canonical_json(claims)
    except (ValueError, TypeError, RecursionError) as exc:
        raise FormatError(f"{what}: cannot be canonicalized ({exc.__class__.__name__})") from exc
    if len(data) > MAX_CLAIMS_BYTES:
        raise FormatError(f"{what}: larger than {MAX_CLAIMS_BYTES} bytes")
    return data


def _detached_jws(obj: Mapping[str, Any], key: str, *, what: str) -> str:
    text = require_str(dict(obj), key, what=what, max_len=MAX_JWS_CHARS)
    if not _DETACHED_JWS.fullmatch(text):
        raise FormatError(f"{what}: '{key}' must be a compact JWS with a detached payload")
    return text


def _mode(obj: Mapping[str, Any], expected: AttestationMode, what: str) -> None:
    if obj.get("mode") != expected.value:
        raise FormatError(f"{what}: 'mode' must be {expected.value!r}")


@dataclass(frozen=True)
class TpmEvidence:
    """TPM-mode evidence: identity, AK, quote, reported PCRs, event log, host key.

    ``pcrs`` are the SHA-256 PCR values the host read with its quote; the quote
    must cover exactly these, and the log must replay to them.
    """

    mode: ClassVar[AttestationMode] = AttestationMode.TPM
    ek_public: bytes
    ek_certificate: bytes | None
    ak_public: bytes
    quote_attest: bytes
    quote_signature: bytes
    pcrs: Mapping[int, bytes]
    event_log: bytes
    host_key: Mapping[str, Any]
    #: The loader's entry for the log text (``decoded.data is event_log``), where
    #: the verifier finds the log's parse; None for evidence built otherwise
    #: (and for a copy: :func:`dataclasses.replace` does not carry it over).
    decoded: DecodedLog | None = field(default=None, init=False, repr=False, compare=False)
    #: ``host_key`` and its binding digest, as the loader found them with the
    #: key's check (see :meth:`key_digest`); None when built otherwise.
    _key_digest: tuple[Mapping[str, Any], bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcrs", MappingProxyType(dict(self.pcrs)))
        object.__setattr__(self, "host_key", MappingProxyType(dict(self.host_key)))

    def key_checked(self) -> bool:
        """Whether the loader checked this very ``host_key`` mapping (so no one need again).

        True only for the read-only mapping the loader made from the key it
        checked: not for evidence built otherwise, a copy, or a key set afterwards.
        """
        known = self._key_digest
        return known is not None and known[0] is self.host_key

    def key_digest(self) -> bytes:
        """:func:`~guardfab.attestation.binding.host_key_digest` of ``host_key``.

        The loader found it with the key's check; it is used only while
        ``host_key`` is the very mapping it was found for.
        """
        known = self._key_digest
        if known is not None and known[0] is self.host_key:
            return known[1]
        return host_key_digest(self.host_key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a host sends."""
        cert = self.ek_certificate
        return {
            "mode": self.mode.value,
            "ek_public": b64url_encode(self.ek_public),
            "ek_certificate": None if cert is None else b64url_encode(cert),
            "ak_public": b64url_encode(self.ak_public),
            "quote": {
                "attest": b64url_encode(self.quote_attest),
                "signature": b64url_encode(self.quote_signature),
            },
            "pcrs": {"sha256": pcr_map_to_dict(self.pcrs)},
            "event_log": b64url_encode(self.event_log),
            "host_key": dict(self.host_key),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> TpmEvidence:
        """Load TPM evidence (strict). Raises FormatError naming the bad field."""
        what, in_quote = "TPM evidence", "TPM evidence quote"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, _TPM_FIELDS, what=what)
        _mode(obj, cls.mode, what)
        quote = require_dict(obj.get("quote"), what=in_quote)
        reject_unknown_fields(quote, _QUOTE_FIELDS, what=in_quote)
        pcrs = require_dict(obj.get("pcrs"), what=f"{what} pcrs")
        reject_unknown_fields(pcrs, _PCR_BANKS, what=f"{what} pcrs (only sha256 is accepted)")
        cert = None
        if obj.get("ek_certificate") is not None:
            cert = _identity_b64(
                obj, "ek_certificate", what=what, max_bytes=MAX_EK_CERTIFICATE_BYTES
            )
        ek_public = _identity_b64(obj, "ek_public", what=what, max_bytes=MAX_TPM_PUBLIC_BYTES)
        ak_public = _identity_b64(obj, "ak_public", what=what, max_bytes=MAX_TPM_PUBLIC_BYTES)
        attest = _b64(quote, "attest", what=in_quote, max_bytes=MAX_ATTEST_BYTES)
        signature = _b64(quote, "signature", what=in_quote, max_bytes=MAX_TPM_SIGNATURE_BYTES)
        values = pcr_map_from_dict(pcrs.get("sha256"), what=f"{what} pcrs")
        decoded = _event_log(obj)
        host_key, key_digest = _loaded_host_key(obj.get("host_key"), "host_key")
        # Every field was just made here, and both mappings are fresh: the frozen
        # dataclass's __init__ would set each field through object.__setattr__ and copy
        # the mappings again (per request), so the instance is filled in one update.
        evidence = object.__new__(cls)
        host = MappingProxyType(host_key)
        evidence.__dict__.update(
            ek_public=ek_public,
            ek_certificate=cert,
            ak_public=ak_public,
            quote_attest=attest,
            quote_signature=signature,
            pcrs=MappingProxyType(values),
            event_log=decoded.data,
            host_key=host,
            decoded=decoded,
            _key_digest=None if key_digest is None else (host, key_digest),
        )
        return evidence


@dataclass(frozen=True)
class HostKeyEvidence:
    """Host-key-mode evidence: the registered key's id, its signature, claims, host key.

    ``signature`` is a compact JWS with a detached payload (RFC 7515 appendix F)
    made with the registered signing key over
    :func:`~guardfab.attestation.binding.host_key_binding` of the nonce, the host
    key and the canonical claims.
    """

    mode: ClassVar[AttestationMode] = AttestationMode.HOST_KEY
    host_key_id: str
    signature: str
    claims: Mapping[str, Any]
    host_key: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", MappingProxyType(dict(self.claims)))
        object.__setattr__(self, "host_key", MappingProxyType(dict(self.host_key)))

    def claims_bytes(self) -> bytes:
        """The canonical claims the signature covers."""
        return canonical_claims(dict(self.claims))

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a host sends."""
        return {
            "mode": self.mode.value,
            "host_key_id": self.host_key_id,
            "signature": self.signature,
            "claims": dict(self.claims),
            "host_key": dict(self.host_key),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> HostKeyEvidence:
        """Load host-key evidence (strict)."""
        what = "host-key evidence"
        obj = require_dict(obj, what=what)
        allowed = {"mode", "host_key_id", "signature", "claims", "host_key"}
        reject_unknown_fields(obj, allowed, what=what)
        _mode(obj, cls.mode, what)
        key_id = require_str(obj, "host_key_id", what=what, max_len=43)
        if not _THUMBPRINT.fullmatch(key_id):
            raise FormatError(f"{what}: 'host_key_id' must be an RFC 7638 SHA-256 thumbprint")
        canonical_claims(obj.get("claims"))
        return cls(
            host_key_id=key_id,
            signature=_detached_jws(obj, "signature", what=what),
            claims=dict(obj["claims"]),
            host_key=load_host_key(obj.get("host_key")),
        )


@dataclass(frozen=True)
class AdminGroupEvidence:
    """Admin-group-mode evidence (deprecated): a certificate chain, a signature, host key.

    ``certificates`` are DER certificates, leaf first (intermediates may follow).
    ``signature`` is a detached compact JWS by the leaf certificate's key over the
    same binding as host-key mode, with claims ``{"mode": "admin-group"}``, so a
    certificate (which is not secret) cannot be replayed by anyone without its key.
    """

    mode: ClassVar[AttestationMode] = AttestationMode.ADMIN_GROUP
    certificates: tuple[bytes, ...]
    signature: str
    host_key: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_key", MappingProxyType(dict(self.host_key)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a host sends."""
        return {
            "mode": self.mode.value,
            "certificates": [b64url_encode(cert) for cert in self.certificates],
            "signature": self.signature,
            "host_key": dict(self.host_key),
        }

    @classmethod
    def from_dict(cls, obj: Any) -> AdminGroupEvidence:
        """Load admin-group evidence (strict)."""
        what = "admin-group evidence"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"mode", "certificates", "signature", "host_key"}, what=what)
        _mode(obj, cls.mode, what)
        chain = obj.get("certificates")
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN_CERTIFICATES:
            raise FormatError(
                f"{what}: 'certificates' must list 1 to {MAX_CHAIN_CERTIFICATES} certificates"
            )
        certificates = tuple(
            _b64({"c": c}, "c", what=f"{what} certificate {i}", max_bytes=MAX_CERTIFICATE_BYTES)
            for i, c in enumerate(chain)
        )
        return cls(
            certificates=certificates,
            signature=_detached_jws(obj, "signature", what=what),
            host_key=load_host_key(obj.get("host_key")),
        )


Evidence = TpmEvidence | HostKeyEvidence | AdminGroupEvidence
_LOADERS: dict[str, Any] = {
    AttestationMode.TPM.value: TpmEvidence.from_dict,
    AttestationMode.HOST_KEY.value: HostKeyEvidence.from_dict,
    AttestationMode.ADMIN_GROUP.value: AdminGroupEvidence.from_dict,
}


def evidence_from_dict(obj: Any) -> Evidence:
    """Load evidence of any mode from parsed JSON.

    Raises:
        FormatError: unknown mode, unknown fields, bad encodings or sizes.
    """
    obj = require_dict(obj, what="evidence")
    mode = obj.get("mode")
    loader = _LOADERS.get(mode) if isinstance(mode, str) else None
    if loader is None:
        raise FormatError(f"evidence: 'mode' must be one of {', '.join(_LOADERS)}")
    evidence: Evidence = loader(obj)
    return evidence


def load_evidence(data: bytes) -> Evidence:
    """Load evidence from the raw request body (size-bounded JSON)."""
    return evidence_from_dict(
        load_json_document(data, what="evidence", max_bytes=MAX_EVIDENCE_BYTES)
    )
