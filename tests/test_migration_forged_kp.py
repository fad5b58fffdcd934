"""Attacks on what enters a VM's key store through a migration (security review, issue 6).

Real KPs and vaults (a chain of generations re-keyed by a KPS guardian, as the
KPS makes them), real store files; no QEMU and no KPS: every refusal here comes
before a key release, which the key source below would record. The paths that
do release run end to end in test_vm_migrate.py.

* A KP anyone can make: Mallory signs a KP of her own with the VM's ``kp_id``
  copied and a generation far ahead. Taken back, it would become the pending
  pair, and a restore would commit it: the VM could never start again.
* The same forged KP in an offer to a host that holds an abandoned incoming
  migration (the only copy of the VM's newest pair) must not make that host
  delete it -- nor may anything offered before the KPS granted a release.
* An offer whose record boots a host file (``/etc/...``) as its initrd:
  QEMU runs as root and would read it into the guest.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from guardfab.errors import GuardfabError, NotAuthorizedError, UsageError
from guardfab.formats.key_protector import (
    TransportKey,
    _Draft,
    _Member,
    _member_from_document,
    _mint_as_owner,
    _with_member,
    load_key_protector,
    sign_guardian_document,
)
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor import incoming
from guardfab.hypervisor.bootpaths import DirectBootRefusedError
from guardfab.hypervisor.keyprotector import NoLastKnownGoodError, restore_last_known_good
from guardfab.hypervisor.migrate import MigrationOffer, SealedPair, take_back
from guardfab.hypervisor.provision import DISK_IDS, LOCAL_ROOT_BOOT, load_record
from guardfab.hypervisor.spec import DirectKernel
from guardfab.hypervisor.vault import VaultContents, VaultError, VaultStore, seal_vault
from test_key_protector_keyring import keyring
from test_vm_keyprotector import NAME, Chain, _chain, _snapshot, _store, _vm_dir


def _forged(kp_id: str, generation: int) -> tuple[bytes, TransportKey]:
    """Mallory's own KP: the VM's KPS as a guardian, any kp_id, any generation."""
    ring = keyring()
    mallory = ring["mallory"]
    document = sign_guardian_document(mallory.guardian, mallory.signing_key).decode("ascii")
    members = _with_member(
        [_Member(mallory.guardian, document)], _member_from_document(ring.doc("kps1"))
    )
    key = TransportKey.generate()
    draft = _Draft(kp_id, generation, mallory.guardian.id, members)
    return _mint_as_owner(draft, mallory, key), key


def _forged_pair(kp_id: str, generation: int, contents: VaultContents) -> SealedPair:
    kp, key = _forged(kp_id, generation)
    return SealedPair(kp, seal_vault(contents, key, vm_name=NAME))


class RecordingKeys:
    """A key source that must not be asked: it records every KP it is sent."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def release(self, kp: bytes) -> ReleasedKeys:
        self.asked.append(kp)
        raise NotAuthorizedError("this test's KPS refuses every release")


@pytest.fixture(scope="module")
def chain() -> Chain:
    return _chain(4)


@pytest.fixture
def contents() -> VaultContents:
    return VaultContents.generate(list(DISK_IDS))


def _kp_id(chain: Chain) -> str:
    return load_key_protector(chain.kps[0][0]).kp_id


def test_a_forged_kp_with_the_vms_kp_id_is_not_taken_back(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    before = _snapshot(store)
    forged = _forged_pair(_kp_id(chain), 1000, contents)
    assert load_key_protector(forged.kp).kp_id == _kp_id(chain), "it does verify on its own"
    with pytest.raises(NotAuthorizedError, match=f"not VM {NAME!r}'s.*expected owner"):
        take_back(vm_dir, forged)
    assert _snapshot(store) == before, "nothing written"
    with pytest.raises(NoLastKnownGoodError, match="already the newest"):
        restore_last_known_good(vm_dir)  # the honest committed pair stays the one
    assert _snapshot(store) == before


def test_a_forged_kp_of_another_kp_id_is_not_taken_back(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    before = _snapshot(store)
    other, key = _forged("A" * 21 + "w", 1000)
    # Signed by the VM's own owner would still need its kp_id: the owner's other KP.
    honest_other = _chain(2).kps[1]
    for kp, vault in (
        (other, seal_vault(contents, key, vm_name=NAME)),
        (honest_other[0], seal_vault(contents, honest_other[1], vm_name=NAME)),
    ):
        with pytest.raises(NotAuthorizedError, match=f"not VM {NAME!r}'s"):
            take_back(vm_dir, SealedPair(kp, vault))
    assert _snapshot(store) == before


def test_the_honest_hand_back_is_taken_once_and_a_replay_writes_nothing(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    vault, kp = chain.pair(3, contents)
    first = take_back(vm_dir, SealedPair(kp, vault))
    assert (first.generation, first.new) == (3, True)
    after = _snapshot(store)
    again = take_back(vm_dir, SealedPair(kp, vault))
    assert (again.number, again.new) == (first.number, False), "the retry path writes nothing"
    assert _snapshot(store) == after


def test_restore_refuses_a_store_holding_a_forged_pair(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    forged = _forged_pair(_kp_id(chain), 1000, contents)
    store.write_pending(forged.vault, forged.kp)  # written by someone with the files
    before = _snapshot(store)
    with pytest.raises(VaultError, match="2 owners: a pair was substituted"):
        restore_last_known_good(vm_dir)
    assert _snapshot(store) == before


def _abandoned_destination(tmp_path: Path, chain: Chain, contents: VaultContents) -> Path:
    """A destination's directory of an abandoned incoming migration: the newest pair (3)."""
    vm_dir = _vm_dir(tmp_path)
    VaultStore(vm_dir / "keys").write_pending(*chain.pair(3, contents))
    incoming._mark(vm_dir, incoming.ABANDONED)
    return vm_dir


def _offer(vm_dir: Path, pairs: list[SealedPair], disks_dir: Path) -> MigrationOffer:
    return MigrationOffer.from_dict({
        "record": json.loads((vm_dir / "vm.json").read_text()),
        "pairs": [pair.to_dict() for pair in pairs],
        "nvram": None,
        "disks_dir": str(disks_dir),
    })  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kp_id", ["copied", "A" * 21 + "w"])
def test_a_forged_offer_does_not_remove_an_abandoned_migrations_pair(
    tmp_path: Path, chain: Chain, contents: VaultContents, kp_id: str
) -> None:
    vm_dir = _abandoned_destination(tmp_path, chain, contents)
    before = _files(vm_dir)
    forged = _forged_pair(_kp_id(chain) if kp_id == "copied" else kp_id, 10**6, contents)
    keys = RecordingKeys()
    with pytest.raises(UsageError, match="unfinished incoming migration here holds"):
        incoming.receive(
            _offer(vm_dir, [forged], Path("/nonexistent")),
            tmp_path, keys, address="127.0.0.1", port=1, direct_boot_dir=LOCAL_ROOT_BOOT,
        )  # fmt: skip
    assert keys.asked == [], "no release asked"
    assert _files(vm_dir) == before, "the only copy of the newest pair stays"


def test_an_honest_newer_offer_removes_nothing_until_the_kps_grants(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    """The source took the pair back: its offer may replace it, but only after a grant."""
    vm_dir = _abandoned_destination(tmp_path, chain, contents)
    disks = tmp_path / "shared"
    disks.mkdir()
    for device_id in DISK_IDS:
        (disks / f"{device_id}.qcow2").write_bytes(b"")
    before = _files(vm_dir)
    vault, kp = chain.pair(3, contents)
    keys = RecordingKeys()
    with pytest.raises(GuardfabError, match="got no keys from the KPS"):
        incoming.receive(
            _offer(vm_dir, [SealedPair(kp, vault)], disks),
            tmp_path, keys, address="127.0.0.1", port=1, direct_boot_dir=LOCAL_ROOT_BOOT,
        )  # fmt: skip
    assert keys.asked == [kp], "the release was asked for the pair the source holds"
    assert _files(vm_dir) == before, "refused: the pair here stays"


def test_an_offer_booting_a_host_file_is_refused_before_any_release(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    (tmp_path / "a").mkdir()
    source = _vm_dir(tmp_path / "a")
    store = _store(source, chain, contents, 1)
    boot_dir = tmp_path / "boot"
    boot_dir.mkdir()
    (boot_dir / "vmlinuz").write_bytes(b"kernel")
    disks = tmp_path / "shared"
    disks.mkdir()
    for device_id in DISK_IDS:
        (disks / f"{device_id}.qcow2").write_bytes(b"")
    record = dataclasses.replace(
        load_record(source),
        policy=SecurityPolicy.ENCRYPTION_SUPPORTED,  # a shielded VM boots no host kernel at all
        boot=DirectKernel(boot_dir / "vmlinuz", Path("/etc/shadow"), "console=ttyS0"),
    )
    offer = MigrationOffer(record, (SealedPair.of(store.committed()),), None, disks)
    dest = tmp_path / "b"
    keys = RecordingKeys()
    for allowed, error in ((boot_dir, "initrd '/etc/shadow'.*outside"), (None, "not enabled")):
        with pytest.raises(DirectBootRefusedError, match=error):
            incoming.receive(
                offer, dest, keys, address="127.0.0.1", port=1, direct_boot_dir=allowed
            )
    assert keys.asked == [], "no release asked"
    assert not dest.exists(), "nothing written"


def test_an_offer_mixing_owners_is_refused_before_any_release(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    """A forged 'pending' pair beside the VM's honest committed one: not one VM's keys."""
    (tmp_path / "a").mkdir()
    source = _vm_dir(tmp_path / "a")
    store = _store(source, chain, contents, 1)
    forged = _forged_pair(_kp_id(chain), 1000, contents)
    disks = tmp_path / "shared"
    disks.mkdir()
    for device_id in DISK_IDS:
        (disks / f"{device_id}.qcow2").write_bytes(b"")
    offer = _offer(source, [SealedPair.of(store.committed()), forged], disks)
    dest = tmp_path / "b"
    keys = RecordingKeys()
    with pytest.raises(VaultError, match="2 different owners or KP ids"):
        incoming.receive(
            offer, dest, keys, address="127.0.0.1", port=1, direct_boot_dir=LOCAL_ROOT_BOOT
        )
    assert keys.asked == [], "no release asked"
    assert not dest.exists(), "nothing written"
