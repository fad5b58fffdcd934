"""KPS key rotation without the owner (KP format 2), and the attacks it must not open.

A KPS guardian rotates by publishing a document for the same signing key with a
new encryption key and a higher ``key_generation``. A release re-keys a
version-2 KP to the KPS's current generation; the host's successor check
(``unwrap_release(ingress=...)``) refuses an egress that moves the KPS back to
an older generation, or moves anyone else's key. Version-1 KPs (the committed
fuzz seeds, made by the version-1 code) still load and release, and stay on the
key their owner signed for.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from guardfab.cli.main import cli
from guardfab.errors import NotAuthorizedError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import canonical_json
from guardfab.formats.guardian import (
    GUARDIAN_JWS_TYPE,
    Guardian,
    GuardianKind,
    KeyAlgorithm,
    load_guardian_document,
    sign_guardian_document,
)
from guardfab.formats.key_protector import (
    KpsKeys,
    create_key_protector,
    grant,
    load_key_protector,
    rekey,
    upgrade,
)
from guardfab.keyprotection import release, unwrap_release
from guardfab.tenant.guardians import GuardianKeys, GuardianStore, new_guardian_keys
from test_keyprotection_release import NOW, World, world

__all__ = ["world"]  # the fixture, imported for pytest

SEEDS = Path(__file__).parent.parent / "fuzz" / "corpus" / "key_protector"


def _generation(kps: GuardianKeys, number: int, encryption: ECKey) -> tuple[Guardian, bytes]:
    guardian = Guardian(
        name=kps.guardian.name,
        kind=GuardianKind.KPS,
        signing_key=kps.guardian.signing_key,
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="test"),
        key_generation=number,
    )
    return guardian, sign_guardian_document(guardian, kps.signing_key)


def rotated(kps: GuardianKeys, encryption: ECKey | None = None) -> KpsKeys:
    """``kps`` at key generation 1: a new encryption key, the old one still held."""
    new_key = encryption or ECKey.generate_key("P-256")
    guardian, document = _generation(kps, 1, new_key)
    held = {kps.guardian.encryption_kid: kps.encryption_key, guardian.encryption_kid: new_key}
    return KpsKeys(guardian, document, kps.signing_key, held)


def _release(world: World, kp: bytes, keys: KpsKeys | GuardianKeys) -> dict[str, object]:
    result = release(world.cert(), kp, kps_keys=[keys], trusted_signers=world.signers(), now=NOW)
    return result.to_response()


def test_a_release_moves_a_v2_kp_to_the_current_key_generation(world: World) -> None:
    ingress = world.kp()
    keys = rotated(world.kps)
    result = release(
        world.cert(), ingress, kps_keys=[keys], trusted_signers=world.signers(), now=NOW
    )
    assert (result.ingress_key_generation, result.key_generation) == (0, 1)
    got = unwrap_release(result.to_response(), world.host_a, ingress=load_key_protector(ingress))
    egress = load_key_protector(got.egress_kp, expected_owner=world.owner.guardian.id)
    mine = egress.guardian(world.kps.guardian.id)
    assert (egress.version, mine.key_generation) == (2, 1)
    assert mine.encryption_kid == keys.guardian.encryption_kid
    assert egress.unwrap(keys) == egress.unwrap(world.owner) == got.new
    with pytest.raises(NotAuthorizedError, match="key generation 1"):
        egress.unwrap(world.kps)  # the retired key alone no longer unwraps the moved KP
    again = unwrap_release(_release(world, got.egress_kp, keys), world.host_a, ingress=egress)
    assert load_key_protector(again.egress_kp).guardian(mine.id).key_generation == 1


def test_a_kps_that_holds_only_its_old_key_keeps_the_kp_where_it_is(world: World) -> None:
    keys = rotated(world.kps)
    moved = unwrap_release(_release(world, world.kp(), keys), world.host_a).egress_kp
    with pytest.raises(NotAuthorizedError):  # a node that never got generation 1's key
        rekey(load_key_protector(moved), world.kps)
    kept, _, _ = rekey(load_key_protector(world.kp()), world.kps)
    assert load_key_protector(kept).guardian(world.kps.guardian.id).key_generation == 0


def test_host_refuses_an_egress_that_rolls_the_kps_back_a_key_generation(world: World) -> None:
    """The KPS signs an egress at generation n+1 that embeds its older document."""
    made = world.kp()
    ingress = unwrap_release(_release(world, made, rotated(world.kps)), world.host_a).egress_kp
    assert load_key_protector(ingress).guardian(world.kps.guardian.id).key_generation == 1
    same_generation = upgrade(load_key_protector(made), world.owner)  # generation 1, key gen 0
    rolled_back = _release(world, same_generation, world.kps)
    with pytest.raises(VerificationError, match="rollback of its key"):
        unwrap_release(rolled_back, world.host_a, ingress=load_key_protector(ingress))


def test_host_refuses_an_egress_that_moves_another_kps_guardian(world: World) -> None:
    """Only the re-keying KPS may move, and only itself: another fabric's key stays put."""
    both = world.kp(world.kps, world.other_kps)
    ingress = upgrade(load_key_protector(both), world.owner)  # generation 1, both at key gen 0
    moved_by_other = unwrap_release(
        _release(world, both, rotated(world.other_kps)), world.host_a
    ).egress_kp  # generation 1, other_kps at key gen 1: its own, legitimate move
    by_us = _release(world, moved_by_other, world.kps)  # generation 2, signed by world.kps
    with pytest.raises(VerificationError, match="another key"):
        unwrap_release(by_us, world.host_a, ingress=load_key_protector(ingress))
    assert unwrap_release(by_us, world.host_a, ingress=load_key_protector(moved_by_other))


def test_a_kps_document_signed_by_another_key_is_refused(world: World) -> None:
    """Only the KPS's signing key (its identity) can make a new generation of it."""
    guardian, _ = _generation(world.kps, 1, ECKey.generate_key("P-256"))
    mallory = ECKey.generate_key("P-256")
    forged = jose.sign_compact(canonical_json(guardian.payload()), mallory, typ=GUARDIAN_JWS_TYPE)
    with pytest.raises(VerificationError):
        load_guardian_document(forged.encode())
    with pytest.raises(VerificationError):
        create_key_protector(world.owner, [forged.encode()])


# --- version 1: the committed seeds made by the version-1 code --------------------------


def _fixed(seed: int) -> ECKey:
    return ECKey.import_key(ec.derive_private_key(seed, ec.SECP256R1()))


def _fixed_guardian(name: str, kind: GuardianKind, seed: int) -> GuardianKeys:
    signing, encryption = _fixed(seed), _fixed(seed + 1)
    guardian = Guardian(
        name=name,
        kind=kind,
        signing_key=jose.import_public_jwk(jose.public_jwk(signing), what="test"),
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="test"),
    )
    return GuardianKeys(guardian, signing, encryption)


V1_OWNER = _fixed_guardian("owner", GuardianKind.TENANT, 0x5EED_0001)
V1_KPS = _fixed_guardian("kps", GuardianKind.KPS, 0x5EED_0003)


def _seed(name: str) -> bytes:
    return (SEEDS / name).read_bytes()[1:]  # the first byte is the fuzz target's mode


@pytest.mark.parametrize("name", ["owner-made-v1.kp", "egress-v1.kp"])
def test_version_1_kps_still_load_unwrap_and_rekey_in_place(name: str) -> None:
    kp = load_key_protector(_seed(name), expected_owner=V1_OWNER.guardian.id)
    assert kp.version == 1
    assert kp.unwrap(V1_OWNER) == kp.unwrap(V1_KPS)
    keys = rotated(V1_KPS)
    egress, old, new = rekey(kp, keys)
    loaded = load_key_protector(egress, expected_owner=V1_OWNER.guardian.id)
    assert old == kp.unwrap(V1_OWNER)
    assert (loaded.version, loaded.guardian(V1_KPS.guardian.id).key_generation) == (1, 0)
    assert loaded.unwrap(V1_OWNER) == new, "the owner's v1 statement pins the KPS's old key"


def test_the_owner_moves_a_version_1_kp_to_version_2() -> None:
    kp = load_key_protector(_seed("owner-made-v1.kp"))
    upgraded = load_key_protector(upgrade(kp, V1_OWNER))
    assert (upgraded.version, upgraded.generation) == (2, kp.generation + 1)
    assert upgraded.unwrap(V1_OWNER) == kp.unwrap(V1_OWNER)
    egress, _, _ = rekey(upgraded, rotated(V1_KPS))
    assert load_key_protector(egress).guardian(V1_KPS.guardian.id).key_generation == 1
    granted = grant(kp, V1_OWNER, sign_guardian_document(*_second_kps()))
    assert load_key_protector(granted).version == 2, "any grant re-signs in the current format"


def _second_kps() -> tuple[Guardian, jose.AsymmetricKey]:
    keys = _fixed_guardian("kps-2", GuardianKind.KPS, 0x5EED_0009)
    return keys.guardian, keys.signing_key


def test_tenant_kp_upgrade_re_signs_in_the_current_format(tmp_path: Path) -> None:
    store = GuardianStore(tmp_path / "home")
    store.create("owner", KeyAlgorithm.EC_P256)
    kps = new_guardian_keys("fabric", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    store.add_public(sign_guardian_document(kps.guardian, kps.signing_key))
    made, key = create_key_protector(store.keys("owner"), [store.document("fabric")])
    (tmp_path / "vm.kp").write_bytes(made)
    out = tmp_path / "vm-upgraded.kp"
    args = ["tenant", "kp", "upgrade", str(tmp_path / "vm.kp"), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--home", str(tmp_path / "home")])
    assert result.exit_code == 0, result.output
    assert "format version 2" in result.output
    upgraded = load_key_protector(out.read_bytes())
    assert (upgraded.version, upgraded.generation) == (2, 1)
    assert upgraded.unwrap(kps) == key
