"""Key protector operations: unwrap, re-key, grant, revoke, create; secrets stay secret."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from guardfab.errors import FormatError, NotAuthorizedError, UsageError, VerificationError
from guardfab.formats import jose
from guardfab.formats.guardian import KeyAlgorithm, sign_guardian_document
from guardfab.formats.key_protector import (
    MAX_GUARDIANS,
    KeyProtector,
    TransportKey,
    create_key_protector,
    grant,
    load_key_protector,
    rekey,
    revoke,
)
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys
from test_key_protector_keyring import Ctx, assert_no_secret, flip_b64, keyring, make_ctx


@pytest.fixture(scope="module")
def ctx() -> Ctx:
    return make_ctx()


# --- unwrap ---------------------------------------------------------------------------


def test_every_guardian_unwraps_the_same_key_and_nobody_else(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    assert {kp.unwrap(ctx.ring[n]) == ctx.key for n in ("owner", "kps1", "cotenant")} == {True}
    for outsider in ("mallory", "kps2", "rogue-kps"):
        with pytest.raises(NotAuthorizedError):
            kp.unwrap(ctx.ring[outsider])


def test_unwrap_with_someone_elses_encryption_key_is_refused(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    kps1, mallory = ctx.ring["kps1"], ctx.ring["mallory"]
    impostor = GuardianKeys(kps1.guardian, kps1.signing_key, mallory.encryption_key)
    with pytest.raises(NotAuthorizedError):
        kp.unwrap(impostor)


def test_rsa_guardian_round_trip() -> None:
    ring = keyring()
    data, key = create_key_protector(ring["owner2"], [ring.doc("kps-rsa")])
    kp = load_key_protector(data)
    assert kp.unwrap(ring["kps-rsa"]) == key
    egress, old, new = rekey(kp, ring["kps-rsa"])
    assert old == key
    assert load_key_protector(egress).unwrap(ring["owner2"]) == new


# --- rekey, grant, revoke -------------------------------------------------------------


def test_rekey_changes_the_key_and_keeps_the_set(ctx: Ctx) -> None:
    base, egress = load_key_protector(ctx.base), load_key_protector(ctx.egress)
    assert ctx.egress_key != ctx.key
    assert (egress.kp_id, egress.generation) == (base.kp_id, base.generation + 1)
    assert egress.guardian_ids == base.guardian_ids
    assert (egress.owner, egress.signer) == (ctx.owner_id, ctx.guardian("kps1").id)
    assert egress.guardian_set == base.guardian_set
    assert base.unwrap(ctx.ring["owner"]) == ctx.key  # the old KP still opens the old key
    assert egress.unwrap(ctx.ring["owner"]) == ctx.egress_key
    egress2, old, newer = rekey(egress, ctx.ring["kps1"])
    assert old == ctx.egress_key
    assert load_key_protector(egress2).generation == 2
    assert newer not in (ctx.key, ctx.egress_key)


@pytest.mark.parametrize("name", ["owner", "cotenant", "mallory", "rogue-kps"])
def test_only_a_kps_guardian_of_the_set_may_rekey(ctx: Ctx, name: str) -> None:
    with pytest.raises(NotAuthorizedError):
        rekey(load_key_protector(ctx.base), ctx.ring[name])


def test_rekey_with_a_mismatched_signing_key_is_refused(ctx: Ctx) -> None:
    kps1 = ctx.ring["kps1"]
    impostor = GuardianKeys(kps1.guardian, ctx.ring["rogue-kps"].signing_key, kps1.encryption_key)
    with pytest.raises(NotAuthorizedError):
        rekey(load_key_protector(ctx.base), impostor)


def test_grant_adds_a_guardian_with_the_same_key(ctx: Ctx) -> None:
    granted = load_key_protector(
        grant(load_key_protector(ctx.egress), ctx.ring["owner"], ctx.ring.doc("kps2")),
        expected_owner=ctx.owner_id,
    )
    assert granted.generation == 2
    assert granted.signer == ctx.owner_id
    assert ctx.guardian("kps2").id in granted.guardian_ids
    assert granted.unwrap(ctx.ring["kps2"]) == ctx.egress_key


def test_revoke_removes_a_guardian_and_keeps_the_key(ctx: Ctx) -> None:
    revoked = load_key_protector(
        revoke(load_key_protector(ctx.base), ctx.ring["owner"], ctx.guardian("cotenant").id)
    )
    assert revoked.generation == 1
    assert ctx.guardian("cotenant").id not in revoked.guardian_ids
    assert revoked.unwrap(ctx.ring["kps1"]) == ctx.key
    with pytest.raises(NotAuthorizedError):
        revoked.unwrap(ctx.ring["cotenant"])


@pytest.mark.parametrize("name", ["kps1", "cotenant", "mallory"])
def test_grant_and_revoke_need_the_owners_keys(ctx: Ctx, name: str) -> None:
    kp = load_key_protector(ctx.base)
    with pytest.raises(NotAuthorizedError):
        grant(kp, ctx.ring[name], ctx.ring.doc("kps2"))
    with pytest.raises(NotAuthorizedError):
        revoke(kp, ctx.ring[name], ctx.guardian("cotenant").id)


def test_revoke_refuses_the_owner_the_last_guardian_and_strangers(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    owner = ctx.ring["owner"]
    with pytest.raises(UsageError):
        revoke(kp, owner, ctx.owner_id)
    with pytest.raises(NotAuthorizedError):
        revoke(kp, owner, ctx.guardian("mallory").id)
    single = load_key_protector(revoke(kp, owner, ctx.guardian("cotenant").id))
    with pytest.raises(UsageError):
        revoke(single, owner, ctx.guardian("kps1").id)


def test_grant_refuses_a_guardian_already_there(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    with pytest.raises(UsageError):
        grant(kp, ctx.ring["owner"], ctx.ring.doc("kps1"))
    # the same guardian (same signing key, same id) with a new encryption key
    kps1 = ctx.ring["kps1"]
    fresh = new_guardian_keys("kps1", KeyAlgorithm.EC_P256).encryption_key
    again = dataclasses.replace(
        kps1.guardian,
        encryption_key=jose.import_public_jwk(jose.public_jwk(fresh), what="test"),
    )
    with pytest.raises(UsageError):
        grant(kp, ctx.ring["owner"], sign_guardian_document(again, kps1.signing_key))


def test_unwrap_refuses_a_wrapped_key_of_the_wrong_length(ctx: Ctx) -> None:
    """Only reachable past the loader (which fixes the ciphertext size): still refused."""
    kp = load_key_protector(ctx.base)
    kps1 = ctx.guardian("kps1")
    short = jose.encrypt_to_recipients(
        bytes(16), [(kps1.encryption_kid, kps1.encryption_key)], aad=kp.aad()
    )
    with pytest.raises(VerificationError):
        dataclasses.replace(kp, wrapping=short).unwrap(ctx.ring["kps1"])


# --- create ---------------------------------------------------------------------------


def test_create_protects_the_key_given() -> None:
    ring = keyring()
    key = TransportKey.generate()
    data, same = create_key_protector(ring["owner"], [ring.doc("kps2")], key)
    assert same is key
    kp = load_key_protector(data)
    assert (kp.generation, kp.owner, kp.signer) == (0, kp.owner, ring["owner"].guardian.id)
    assert kp.unwrap(ring["kps2"]) == key


@pytest.mark.parametrize(
    ("owner", "others"),
    [
        ("owner", []),  # nobody besides the owner
        ("owner", ["kps1", "kps1"]),  # listed twice
        ("owner", ["owner"]),  # the owner as its own fabric guardian
        ("kps1", ["kps2"]),  # a KPS cannot own a KP
    ],
)
def test_create_refuses_bad_guardian_lists(owner: str, others: list[str]) -> None:
    ring = keyring()
    with pytest.raises(UsageError):
        create_key_protector(ring[owner], [ring.doc(n) for n in others])


def test_create_refuses_a_tampered_guardian_document() -> None:
    ring = keyring()
    header, body, signature = ring.doc("kps1").decode().split(".")
    with pytest.raises(VerificationError):
        create_key_protector(ring["owner"], [f"{header}.{body}.{flip_b64(signature)}".encode()])


def test_guardian_cap_is_enforced_when_making() -> None:
    ring = keyring()
    extra = [new_guardian_keys(f"fabric-{i}", KeyAlgorithm.EC_P256) for i in range(MAX_GUARDIANS)]
    documents = [sign_guardian_document(k.guardian, k.signing_key) for k in extra]
    with pytest.raises(UsageError):
        create_key_protector(ring["owner"], documents)
    full, key = create_key_protector(ring["owner"], documents[1:])
    kp = load_key_protector(full)
    assert len(kp.guardians) == MAX_GUARDIANS
    assert kp.unwrap(extra[-1]) == key
    with pytest.raises(UsageError):
        grant(kp, ring["owner"], documents[0])


# --- secrets stay secret --------------------------------------------------------------


def test_transport_key_never_shows() -> None:
    key = TransportKey.generate()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert key.reveal().hex() not in text
        assert "redacted" in text
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        hash(key)


def test_transport_key_compares_by_value() -> None:
    key = TransportKey.generate()
    assert key == TransportKey(key.reveal())
    assert key != TransportKey.generate()
    assert key != key.reveal()
    with pytest.raises(FormatError):
        TransportKey(b"short")


def test_key_protector_repr_has_no_wrapping(ctx: Ctx) -> None:
    kp: KeyProtector = load_key_protector(ctx.base)
    text = repr(kp) + json.dumps(kp.summary())
    assert kp.wrapping["ciphertext"] not in text
    assert "encrypted_key" not in text
    assert_no_secret(text, ctx.key)
