"""Test helper (not a test module): shielding data files for a KPS, genuine and forged.

Each forgery has exactly one flaw, so that exactly one check of the KPS's
opening (:mod:`guardfab.keyprotection.shielding`) stands in its way: the
genuine parts stay genuine (re-signed by the real owner where the flaw is not
the signature). Shared by the pure suite (test_keyprotection_shielding.py) and
the HTTPS suite (test_kps_shielding.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm, sign_guardian_document
from guardfab.formats.shielding_data import (
    PDK_JWS_TYPE,
    SecurityPolicy,
    ShieldingDataHeader,
    create_shielding_data,
)
from guardfab.formats.shielding_secrets import (
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    ShieldingSecrets,
)
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

PASSWORD = "pdk-test-password-Zq7"
ANSWER = b"#cloud-config\nhostname: web01\n# pdk-test-answer-marker\n"
FILE = b"pdk-test-file-marker"
SECRETS = ShieldingSecrets(
    admin=AdminCredentials("root", PASSWORD),
    answer_file=AnswerFile(AnswerFileKind.CLOUD_INIT, ANSWER),
    files={"index.html": FILE},
)
#: What must never show up in an error body, a log or a file the host writes.
SECRET_MARKERS = (PASSWORD.encode(), b"pdk-test-answer-marker", FILE)


def make_pdk(owner: GuardianKeys, *guardian_documents: bytes, name: str = "web01") -> bytes:
    """A genuine PDK of ``owner`` for the given fabric guardians."""
    return create_shielding_data(
        owner,
        list(guardian_documents),
        policy=SecurityPolicy.SHIELDED,
        secrets=SECRETS,
        name=name,
        created_at=1_800_000_000,
    )


def body_of(data: bytes) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        b64url_decode(data.decode().strip().split(".")[1], what="test")
    )
    return body


def signed(body: dict[str, Any], signer: GuardianKeys) -> bytes:
    return jose.sign_compact(canonical_json(body), signer.signing_key, typ=PDK_JWS_TYPE).encode()


def keep_signature(data: bytes, body: dict[str, Any]) -> bytes:
    """An edited payload under the original protected header and signature."""
    head, _, signature = data.decode().strip().split(".")
    return f"{head}.{b64url_encode(canonical_json(body))}.{signature}".encode()


def _flip(text: str) -> str:
    raw = bytearray(b64url_decode(text, what="part"))
    raw[-1] ^= 1
    return b64url_encode(bytes(raw))


def header_edited(pdk: bytes, owner: GuardianKeys) -> bytes:
    """The signed header edited (name changed), the owner's signature kept: it breaks."""
    body = body_of(pdk)
    body["header"]["name"] = "web01-edited"
    return keep_signature(pdk, body)


def header_edited_and_resigned(pdk: bytes, owner: GuardianKeys) -> bytes:
    """The policy loosened and re-signed by the owner, the JWE's aad field redone to match.

    Every public check passes; only the AEAD's authenticated data (the header
    digest sealed with the secrets) keeps the secrets shut.
    """
    body = body_of(pdk)
    body["header"]["policy"] = SecurityPolicy.ENCRYPTION_SUPPORTED.value
    header = ShieldingDataHeader.from_dict(body["header"])
    body["secrets"]["aad"] = b64url_encode(header.aad())
    return signed(body, owner)


def secrets_edited(pdk: bytes, owner: GuardianKeys) -> bytes:
    """One bit of the sealed secrets flipped, the owner's signature kept: it breaks."""
    body = body_of(pdk)
    body["secrets"]["ciphertext"] = _flip(body["secrets"]["ciphertext"])
    return keep_signature(pdk, body)


def secrets_edited_and_resigned(pdk: bytes, owner: GuardianKeys) -> bytes:
    """One bit of the sealed secrets flipped, re-signed by the owner: the AES-GCM tag fails."""
    body = body_of(pdk)
    body["secrets"]["ciphertext"] = _flip(body["secrets"]["ciphertext"])
    return signed(body, owner)


def signed_by_another(pdk: bytes, owner: GuardianKeys) -> bytes:
    """The genuine payload (owner document included) signed by someone else."""
    return signed(body_of(pdk), new_guardian_keys("mallory", KeyAlgorithm.EC_P256))


def owner_replaced(pdk: bytes, owner: GuardianKeys) -> bytes:
    """Mallory names herself owner over the genuine secrets, fakes every public binding, signs.

    A valid file of Mallory's, as far as signatures go; the secrets' AAD (the
    header digest, which names the owner) keeps the owner's secrets shut.
    """
    mallory = new_guardian_keys("mallory", KeyAlgorithm.EC_P256)
    body = copy.deepcopy(body_of(pdk))
    header = body["header"]
    header["owner"] = sign_guardian_document(mallory.guardian, mallory.signing_key).decode()
    old_owner = owner.guardian.encryption_kid
    header["kp_guardians"] = sorted(
        [mallory.guardian.id, *[g for g in header["kp_guardians"] if g != owner.guardian.id]]
    )
    for entry in body["secrets"]["recipients"]:
        if entry["header"]["kid"] == old_owner:
            entry["header"] = {**entry["header"], "kid": mallory.guardian.encryption_kid}
    body["secrets"]["aad"] = b64url_encode(ShieldingDataHeader.from_dict(header).aad())
    return signed(body, mallory)


def another_fabric(pdk: bytes, owner: GuardianKeys) -> bytes:
    """A genuine PDK of the same owner that names only another fabric's KPS guardian."""
    other = new_guardian_keys("other-hgs", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    return make_pdk(owner, sign_guardian_document(other.guardian, other.signing_key))


def not_a_pdk(pdk: bytes, owner: GuardianKeys) -> bytes:
    return b"not a shielding data file\n"


@dataclass(frozen=True)
class PdkAttack:
    name: str
    status: int
    reason: str
    forge: Callable[[bytes, GuardianKeys], bytes]


PDK_ATTACKS = [
    PdkAttack("header-tampered", 422, "pdk-invalid", header_edited),
    PdkAttack("header-tampered-resigned", 422, "pdk-unseal-failed", header_edited_and_resigned),
    PdkAttack("secrets-tampered", 422, "pdk-invalid", secrets_edited),
    PdkAttack("secrets-tampered-resigned", 422, "pdk-unseal-failed", secrets_edited_and_resigned),
    PdkAttack("signed-by-non-owner", 422, "pdk-invalid", signed_by_another),
    PdkAttack("owner-replaced", 422, "pdk-unseal-failed", owner_replaced),
    PdkAttack("pdk-for-another-fabric", 404, "pdk-for-another-fabric", another_fabric),
    PdkAttack("not-a-pdk", 422, "pdk-invalid", not_a_pdk),
]
