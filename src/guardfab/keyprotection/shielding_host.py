"""The guarded host's half of a shielding data opening: verify the KPS's answer, then decrypt.

Pure: the answer's JSON, the PDK the host sent and its private encryption key
in, the PDK's secrets out. Verify, then parse:

1. the PDK the host sent loads (its owner's signature verifies), so its guardian
   list is the owner's word;
2. the answer is a JWS by a ``kps`` guardian of that list, verified under the
   signing key of the guardian document the owner signed;
3. its payload names exactly that PDK (id and SHA-256) and, when the host
   passes it, the certificate it sent;
4. only then are the secrets decrypted, with AAD recomputed from the payload,
   and parsed; their answer-file kind must be the one the header names.

The secrets are encrypted to exactly one recipient, the certificate's ``cnf``
key: another host's key cannot open them.
"""

from __future__ import annotations

import hashlib
import hmac
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
from guardfab.formats.health_certificate import MAX_TOKEN_BYTES
from guardfab.formats.shielding_data import ShieldingData, load_shielding_data
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.keyprotection.shielding import (
    OPENING_JWS_TYPE,
    OPENING_PAYLOAD_TYPE,
    OPENING_VERSION,
    secrets_aad,
)

_WHAT = "shielding data opening"
_PAYLOAD_FIELDS = {
    "type",
    "version",
    "pdk_id",
    "pdk_sha256",
    "host_id",
    "certificate_id",
    "kps_guardian",
    "secrets",
}
#: The secrets (640 KiB of JSON at most) base64url-encoded twice, JWE then JWS.
MAX_OPENING_CHARS = 2 * 1024 * 1024


def open_shielding_answer(
    response: Any,
    host_private_key: jose.AsymmetricKey,
    *,
    pdk: bytes,
    certificate_id: str | None = None,
) -> ShieldingSecrets:
    """Verify a KPS's answer to an opening and decrypt the secrets with the host key.

    Args:
        response: the JSON body of ``POST /keyprotection/v1/shielding-data/open`` (untrusted).
        host_private_key: the host's private encryption key (the certificate's ``cnf``).
        pdk: the shielding data file the host sent.
        certificate_id: the ``jti`` of the certificate the host sent; when given,
            the answer must name it.

    Raises:
        FormatError: the answer or the PDK is malformed.
        VerificationError: a signature, binding or decryption fails, or the
            secrets were not encrypted to ``host_private_key``.
    """
    data = load_shielding_data(pdk)
    body = require_dict(response, what=_WHAT)
    token = require_str(body, "opening", what=_WHAT, max_len=MAX_OPENING_CHARS)
    signer = _kps_guardian(data, require_str(body, "kps_guardian", what=_WHAT, max_len=64))
    verified = jose.verify_compact(token, signer.signing_key, typ=OPENING_JWS_TYPE, what=_WHAT)
    if verified.header.get("kid") != signer.id:
        raise VerificationError(f"{_WHAT}: not signed by the KPS guardian it names")
    payload = _payload(verified.payload)
    _check_binding(payload, data, pdk, signer, certificate_id)
    plaintext = jose.decrypt_for_recipient(
        payload["secrets"],
        jose.thumbprint(host_private_key),
        host_private_key,
        aad=secrets_aad(
            pdk_id=payload["pdk_id"],
            pdk_sha256=payload["pdk_sha256"],
            host_id=payload["host_id"],
            certificate_id=payload["certificate_id"],
        ),
        what="opened secrets",
    )
    secrets = ShieldingSecrets.from_bytes(plaintext)
    if secrets.answer_file_kind is not data.header.answer_file_kind:
        raise VerificationError(f"{_WHAT}: the secrets' answer file is not the kind the PDK names")
    return secrets


def certificate_id_of(token: str) -> str:
    """The ``jti`` of the host's own health certificate, read without verifying it.

    Only to check that an answer names the certificate the host sent: the KPS
    verified the certificate, and the host obtained it from its HGS over TLS.

    Raises:
        FormatError: not a JWT with a string ``jti``.
    """
    parts = token.split(".") if isinstance(token, str) and len(token) <= MAX_TOKEN_BYTES else []
    if len(parts) != 3:
        raise FormatError("health certificate: not a compact JWT")
    claims = require_dict(
        load_json_document(
            b64url_decode(parts[1], what="health certificate claims"),
            what="health certificate claims",
        ),
        what="health certificate claims",
    )
    return require_str(claims, "jti", what="health certificate claims", max_len=256)


def _kps_guardian(data: ShieldingData, guardian_id: str) -> Guardian:
    named = next((g for g in data.header.guardians if g.id == guardian_id), None)
    if named is None or named.guardian.kind is not GuardianKind.KPS:
        raise VerificationError(
            f"{_WHAT}: the answer names a signer that is not a KPS guardian of the shielding data"
        )
    return named.guardian


def _payload(raw: bytes) -> dict[str, Any]:
    payload = require_dict(
        load_json_document(raw, what=_WHAT, max_bytes=MAX_OPENING_CHARS), what=_WHAT
    )
    reject_unknown_fields(payload, _PAYLOAD_FIELDS, what=_WHAT)
    if payload.get("type") != OPENING_PAYLOAD_TYPE:
        raise FormatError(f"{_WHAT}: type is not {OPENING_PAYLOAD_TYPE!r}")
    if require_int(payload, "version", what=_WHAT) != OPENING_VERSION:
        raise FormatError(f"{_WHAT}: version is not supported")
    for name in ("pdk_id", "pdk_sha256", "host_id", "certificate_id", "kps_guardian"):
        require_str(payload, name, what=_WHAT, max_len=256)
    require_dict(payload.get("secrets"), what=f"{_WHAT} secrets")
    return payload


def _check_binding(
    payload: dict[str, Any],
    data: ShieldingData,
    pdk: bytes,
    signer: Guardian,
    certificate_id: str | None,
) -> None:
    """The signed payload must describe exactly this PDK, this signer and this certificate."""
    digest = hashlib.sha256(pdk).hexdigest()
    if not hmac.compare_digest(payload["pdk_sha256"], digest):
        raise VerificationError(f"{_WHAT}: the answer is for another shielding data file")
    if payload["pdk_id"] != data.header.pdk_id:
        raise VerificationError(f"{_WHAT}: the answer names another PDK id")
    if payload["kps_guardian"] != signer.id:
        raise VerificationError(f"{_WHAT}: the answer names another KPS guardian than its signer")
    if certificate_id is not None and payload["certificate_id"] != certificate_id:
        raise VerificationError(f"{_WHAT}: the answer is for another health certificate")
