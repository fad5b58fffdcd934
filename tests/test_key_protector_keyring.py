"""Guardians for the key protector tests, made once per session, and attacker tools.

Other ``test_key_protector*`` modules import :func:`keyring` and the helpers
below; the tests here only check that the keyring is what the others assume.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import RSAKey

from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode, canonical_json
from guardfab.formats.guardian import (
    Guardian,
    GuardianKind,
    KeyAlgorithm,
    sign_guardian_document,
)
from guardfab.formats.key_protector import (
    GUARDIAN_SET_JWS_TYPE,
    KP_JWS_TYPE,
    TransportKey,
    create_key_protector,
    load_key_protector,
    rekey,
)
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

TENANT = GuardianKind.TENANT
KPS = GuardianKind.KPS


@dataclass(frozen=True)
class Keyring:
    """Named guardians with their private keys."""

    keys: dict[str, GuardianKeys]

    def __getitem__(self, name: str) -> GuardianKeys:
        return self.keys[name]

    def doc(self, name: str) -> bytes:
        """A fresh self-signed document of guardian ``name``."""
        keys = self.keys[name]
        return sign_guardian_document(keys.guardian, keys.signing_key)

    def named(self, kind: GuardianKind) -> list[str]:
        return sorted(n for n, k in self.keys.items() if k.guardian.kind is kind)


def _rsa_guardian(name: str, kind: GuardianKind) -> GuardianKeys:
    """An RSA guardian with 2048-bit keys: the smallest allowed, and fast to make."""
    signing = RSAKey.generate_key(2048)
    encryption = RSAKey.generate_key(2048)
    guardian = Guardian(
        name=name,
        kind=kind,
        signing_key=jose.import_public_jwk(jose.public_jwk(signing), what="test"),
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="test"),
    )
    return GuardianKeys(guardian, signing, encryption)


@functools.cache
def keyring() -> Keyring:
    """owner/owner2 (tenants), kps1/kps2/kps-rsa (fabric KPSs), cotenant, mallory, rogue-kps."""
    ec = {
        "owner": (KeyAlgorithm.EC_P256, TENANT),
        "owner2": (KeyAlgorithm.EC_P384, TENANT),
        "cotenant": (KeyAlgorithm.EC_P256, TENANT),
        "kps1": (KeyAlgorithm.EC_P384, KPS),
        "kps2": (KeyAlgorithm.EC_P256, KPS),
        "mallory": (KeyAlgorithm.EC_P256, TENANT),
        "rogue-kps": (KeyAlgorithm.EC_P256, KPS),
    }
    keys = {name: new_guardian_keys(name, alg, kind) for name, (alg, kind) in ec.items()}
    keys["kps-rsa"] = _rsa_guardian("kps-rsa", KPS)
    return Keyring(keys)


# --- the honest KPs the attack and operation tests start from --------------------------


@dataclass(frozen=True)
class Ctx:
    """An owner-made KP for owner + kps1 + cotenant, and kps1's egress KP made from it."""

    ring: Keyring
    base: bytes
    key: TransportKey
    egress: bytes
    egress_key: TransportKey

    @property
    def owner_id(self) -> str:
        return self.ring["owner"].guardian.id

    def guardian(self, name: str) -> Guardian:
        return self.ring[name].guardian


@functools.cache
def make_ctx() -> Ctx:
    ring = keyring()
    base, key = create_key_protector(ring["owner"], [ring.doc("kps1"), ring.doc("cotenant")])
    egress, old, new = rekey(load_key_protector(base), ring["kps1"])
    assert old == key
    return Ctx(ring, base, key, egress, new)


def assert_no_secret(text: str, key: TransportKey) -> None:
    """Neither the hex, the base64url nor the repr of the key bytes is in ``text``."""
    for form in (key.reveal().hex(), b64url_encode(key.reveal()), repr(key.reveal())):
        assert form not in text


# --- attacker tools: take a KP apart and put it back together ---------------------------


def split(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (unverified) header and payload of a KP file."""
    header, payload, _ = data.decode("ascii").strip().split(".")
    return (
        json.loads(b64url_decode(header, what="test")),
        json.loads(b64url_decode(payload, what="test")),
    )


def sign_payload(
    payload: dict[str, Any] | bytes, keys: GuardianKeys, *, typ: str = KP_JWS_TYPE
) -> bytes:
    """Sign a (possibly forged) KP payload with ``keys``, as an attacker holding them would."""
    raw = payload if isinstance(payload, bytes) else attacker_json(payload)
    return jose.sign_compact(raw, keys.signing_key, typ=typ).encode("ascii") + b"\n"


def attacker_json(value: Any) -> bytes:
    """Canonical JSON where it exists; plain JSON (huge numbers, NaN...) where it does not."""
    try:
        return canonical_json(value)
    except ValueError:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sign_set(
    keys: GuardianKeys, kp_id: str, generation: int, owner: str, guardians: list[Guardian]
) -> str:
    """A version-2 guardian-set statement signed by ``keys`` (honest when ``keys`` are the
    owner's): a KPS guardian by id and kind, a tenant guardian with its encryption key id."""
    statement = {
        "type": "guardfab.kp-guardian-set",
        "version": 2,
        "kp_id": kp_id,
        "generation": generation,
        "owner": owner,
        "guardians": [
            {"id": g.id, "kind": g.kind.value}
            | ({} if g.kind is GuardianKind.KPS else {"encryption_kid": g.encryption_kid})
            for g in sorted(guardians, key=lambda g: g.id)
        ],
    }
    return jose.sign_compact(canonical_json(statement), keys.signing_key, typ=GUARDIAN_SET_JWS_TYPE)


def flip_b64(text: str, index: int = 0) -> str:
    """Flip one bit of the decoded byte ``index`` of a base64url string."""
    raw = bytearray(b64url_decode(text, what="test"))
    raw[index] ^= 0x01
    return b64url_encode(bytes(raw))


# --- the keyring itself ---------------------------------------------------------------


def test_keyring_has_the_kinds_the_tests_assume() -> None:
    ring = keyring()
    assert ring.named(KPS) == ["kps-rsa", "kps1", "kps2", "rogue-kps"]
    assert ring.named(TENANT) == ["cotenant", "mallory", "owner", "owner2"]
    ids = {k.guardian.id for k in ring.keys.values()}
    assert len(ids) == len(ring.keys)


def test_keyring_is_made_once() -> None:
    assert keyring() is keyring()
    assert make_ctx() is make_ctx()
