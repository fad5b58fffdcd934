"""The guarded host's half of a key release: verify the KPS's answer, then unwrap the keys.

Pure, like the KPS side: the answer's JSON and the host's private encryption key
in, the two transport keys and the egress KP out. Verify, then parse:

1. the egress KP loads, and -- when the host passes the KP it sent -- it is the
   successor of that KP: same owner (so no one else's KP can stand in), same
   ``kp_id``, format version and guardian set, generation + 1, every guardian
   on the same key except the re-keying KPS, which may only move to a *newer*
   key generation (its rotation; an older one is a rollback);
2. the release JWS verifies under the signing key of the KPS guardian that
   signed the egress KP, a ``kps`` guardian of the owner's own set;
3. its payload names that KP, those generations and the egress KP's SHA-256;
4. only then are the keys decrypted, with AAD recomputed from the payload.

A host whose key is not the certificate's ``cnf`` key cannot decrypt: the keys are
wrapped to exactly one recipient.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.formats.guardian import Guardian, GuardianKind
from guardfab.formats.key_protector import (
    MAX_KP_BYTES,
    TRANSPORT_KEY_BYTES,
    KeyProtector,
    TransportKey,
    load_key_protector,
)
from guardfab.keyprotection.release import (
    RELEASE_JWS_TYPE,
    RELEASE_PAYLOAD_TYPE,
    RELEASE_VERSION,
    keys_aad,
)

_WHAT = "key release"
_PAYLOAD_FIELDS = {
    "type",
    "version",
    "kp_id",
    "generation",
    "egress_generation",
    "host_id",
    "certificate_id",
    "kps_guardian",
    "egress_kp_sha256",
    "keys",
}
#: A release is one small JWE and a few ids; the bound keeps a hostile answer cheap.
MAX_RELEASE_CHARS = 64 * 1024


@dataclass(frozen=True)
class ReleasedKeys:
    """What a host gets from a release.

    Attributes:
        current: the transport key the VM's key vault is under now (open it with this).
        new: the key of the egress KP (re-encrypt the vault under this).
        egress_kp: the egress KP bytes; store them with the VM before using ``new``.
    """

    current: TransportKey = field(repr=False)
    new: TransportKey = field(repr=False)
    egress_kp: bytes = field(repr=False)
    kp_id: str
    generation: int
    egress_generation: int
    host_id: str
    certificate_id: str
    kps_guardian: str


def unwrap_release(
    response: Any, host_private_key: jose.AsymmetricKey, *, ingress: KeyProtector | None = None
) -> ReleasedKeys:
    """Verify a KPS's release answer and decrypt its keys with the host encryption key.

    Args:
        response: the JSON body of ``POST /keyprotection/v1/release`` (untrusted).
        host_private_key: the host's private encryption key (the certificate's ``cnf``).
        ingress: the KP the host sent; when given, the egress KP must be its successor.

    Raises:
        FormatError: the answer is malformed.
        VerificationError: a signature, binding or decryption fails, or the keys
            were not wrapped to ``host_private_key``.
        NotAuthorizedError: the egress KP has another owner than ``ingress``.
    """
    body = require_dict(response, what=_WHAT)
    egress_text = require_str(body, "egress_key_protector", what=_WHAT, max_len=2 * MAX_KP_BYTES)
    egress_bytes = b64url_decode(egress_text, what="egress key protector")
    egress = load_key_protector(
        egress_bytes, expected_owner=None if ingress is None else ingress.owner
    )
    if ingress is not None:
        _check_successor(ingress, egress)
    signer = _kps_signer(egress)
    token = require_str(body, "release", what=_WHAT, max_len=MAX_RELEASE_CHARS)
    verified = jose.verify_compact(token, signer.signing_key, typ=RELEASE_JWS_TYPE, what=_WHAT)
    if verified.header.get("kid") != signer.id:
        raise VerificationError(f"{_WHAT}: not signed by the KPS guardian of the egress KP")
    payload = _payload(verified.payload)
    _check_binding(payload, egress, egress_bytes)
    plaintext = jose.decrypt_for_recipient(
        payload["keys"],
        jose.thumbprint(host_private_key),
        host_private_key,
        aad=keys_aad(
            kp_id=payload["kp_id"],
            generation=payload["generation"],
            egress_generation=payload["egress_generation"],
            host_id=payload["host_id"],
            certificate_id=payload["certificate_id"],
        ),
        what="released keys",
    )
    if len(plaintext) != 2 * TRANSPORT_KEY_BYTES:
        raise VerificationError(f"{_WHAT}: the released keys have the wrong length")
    return ReleasedKeys(
        current=TransportKey(plaintext[:TRANSPORT_KEY_BYTES]),
        new=TransportKey(plaintext[TRANSPORT_KEY_BYTES:]),
        egress_kp=egress_bytes,
        kp_id=egress.kp_id,
        generation=payload["generation"],
        egress_generation=egress.generation,
        host_id=payload["host_id"],
        certificate_id=payload["certificate_id"],
        kps_guardian=signer.id,
    )


def _check_successor(ingress: KeyProtector, egress: KeyProtector) -> None:
    if egress.kp_id != ingress.kp_id or egress.guardian_ids != ingress.guardian_ids:
        raise VerificationError(f"{_WHAT}: the egress KP is not a re-key of the KP sent")
    if egress.generation != ingress.generation + 1:
        raise VerificationError(
            f"{_WHAT}: the egress KP is generation {egress.generation},"
            f" not {ingress.generation + 1}"
        )
    if egress.version != ingress.version:
        raise VerificationError(f"{_WHAT}: a re-key changed the key protector's format version")
    for before, after in zip(ingress.guardians, egress.guardians, strict=True):
        _check_guardian_kept(before, after, rekeyed_by=egress.signer)


def _check_guardian_kept(before: Guardian, after: Guardian, *, rekeyed_by: str) -> None:
    """A re-key keeps every guardian's key, except that the re-keying KPS may move forward.

    The loader proves the KPS's newer document is its own (self-signed by the
    key that is its identity); only here, with the ingress at hand, can an
    older one -- a rollback to a retired, perhaps compromised, key -- be seen.
    """
    if before.encryption_kid == after.encryption_kid:
        if before.key_generation != after.key_generation:
            raise VerificationError(f"{_WHAT}: guardian {after.id} changed its key generation")
        return
    if after.id != rekeyed_by:
        raise VerificationError(
            f"{_WHAT}: the egress KP wraps guardian {after.id} to another key:"
            " only the re-keying KPS may move to its newer key"
        )
    if after.key_generation <= before.key_generation:
        raise VerificationError(
            f"{_WHAT}: the egress KP moves KPS guardian {after.id} from key generation"
            f" {before.key_generation} to {after.key_generation}: a rollback of its key"
        )


def _kps_signer(egress: KeyProtector) -> Guardian:
    signer = egress.guardian(egress.signer)
    if signer.kind is not GuardianKind.KPS:
        raise VerificationError(f"{_WHAT}: the egress KP was not re-keyed by a KPS guardian")
    return signer


def _payload(raw: bytes) -> dict[str, Any]:
    payload = require_dict(load_json_document(raw, what=_WHAT), what=_WHAT)
    reject_unknown_fields(payload, _PAYLOAD_FIELDS, what=_WHAT)
    if payload.get("type") != RELEASE_PAYLOAD_TYPE:
        raise FormatError(f"{_WHAT}: type is not {RELEASE_PAYLOAD_TYPE!r}")
    if require_int(payload, "version", what=_WHAT) != RELEASE_VERSION:
        raise FormatError(f"{_WHAT}: version is not supported")
    for name in ("kp_id", "host_id", "certificate_id", "kps_guardian", "egress_kp_sha256"):
        require_str(payload, name, what=_WHAT, max_len=256)
    for name in ("generation", "egress_generation"):
        require_int(payload, name, what=_WHAT)
    require_dict(payload.get("keys"), what=f"{_WHAT} keys")
    return payload


def _check_binding(payload: dict[str, Any], egress: KeyProtector, egress_bytes: bytes) -> None:
    """The signed payload must describe exactly this egress KP."""
    digest = hashlib.sha256(egress_bytes).hexdigest()
    if not hmac.compare_digest(payload["egress_kp_sha256"], digest):
        raise VerificationError(f"{_WHAT}: the keys were not released with this egress KP")
    if payload["kp_id"] != egress.kp_id or payload["kps_guardian"] != egress.signer:
        raise VerificationError(f"{_WHAT}: the release names another KP or KPS guardian")
    if (payload["generation"], payload["egress_generation"]) != (
        egress.generation - 1,
        egress.generation,
    ):
        raise VerificationError(f"{_WHAT}: the release names other generations than the KP")
