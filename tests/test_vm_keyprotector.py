"""Restoring a VM's last known good key protector, on real store files (no KPS here).

The pairs are real: KPs re-keyed by a KPS guardian (a chain of generations of
one ``kp_id``, as the KPS makes them) and vaults sealed under their transport
keys. test_vm_restore_and_console.py takes the same steps through a real KPS.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardfab.errors import UsageError
from guardfab.formats.key_protector import TransportKey, create_key_protector, load_key_protector
from guardfab.formats.key_protector import rekey as kps_rekey
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.hypervisor.keyprotector import (
    NoLastKnownGoodError,
    PairState,
    choose_last_known_good,
    inspect_pairs,
    restore_last_known_good,
)
from guardfab.hypervisor.provision import VmRecord, write_record
from guardfab.hypervisor.vault import VaultContents, VaultError, VaultStore, seal_vault
from test_key_protector_keyring import keyring
from test_vm_settings import wait_for_cmdline

NAME = "vm-lkg"


@dataclass
class Chain:
    """Generations of one KP as the KPS issues them, each with its transport key."""

    kps: list[tuple[bytes, TransportKey]]

    def pair(self, index: int, contents: VaultContents, *, name: str = NAME) -> tuple[bytes, bytes]:
        """(vault, KP) of generation ``index``: the vault sealed under that KP's key."""
        kp, key = self.kps[index]
        return seal_vault(contents, key, vm_name=name), kp


def _chain(length: int) -> Chain:
    ring = keyring()
    kp, key = create_key_protector(ring["owner"], [ring.doc("kps1")])
    out = [(kp, key)]
    for _ in range(length - 1):
        egress, _old, new = kps_rekey(load_key_protector(out[-1][0]), ring["kps1"])
        out.append((egress, new))
    return Chain(out)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return _chain(5)


@pytest.fixture
def contents() -> VaultContents:
    return VaultContents.generate(["os", "spec"])


def _vm_dir(tmp_path: Path) -> Path:
    vm_dir = tmp_path / NAME
    vm_dir.mkdir()
    record = VmRecord(
        name=NAME,
        policy=SecurityPolicy.SHIELDED,
        pdk_id="pdk-1",
        template="t.img",
        host_port=None,
        memory_mib=256,
        created_at=0,
    )
    write_record(vm_dir, record)
    return vm_dir


def _store(
    vm_dir: Path, chain: Chain, contents: VaultContents, committed: int, *pending: int
) -> VaultStore:
    """A store that went through generations 1..``committed`` and wrote ``pending`` after."""
    store = VaultStore(vm_dir / "keys")
    for index in range(1, committed + 1):
        store.commit(store.write_pending(*chain.pair(index, contents)).number)
    for index in pending:
        store.write_pending(*chain.pair(index, contents))
    return store


def _snapshot(store: VaultStore) -> dict[str, bytes]:
    return {
        str(p.relative_to(store.root)): p.read_bytes() for p in store.root.rglob("*") if p.is_file()
    }


def _generation(pair_kp: bytes) -> int:
    return load_key_protector(pair_kp).generation


def test_a_pending_pair_left_by_a_failed_start_becomes_the_committed_one(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2, 3)
    committed = store.committed()
    restored = restore_last_known_good(vm_dir)
    assert (restored.previous_pair, restored.restored_pair) == (
        committed.number,
        committed.number + 1,
    )
    assert (restored.previous_generation, restored.restored_generation) == (2, 3)
    assert restored.kp_id == load_key_protector(committed.kp).kp_id
    assert restored.damaged_pairs_set_aside == 0
    assert _generation(store.committed().kp) == 3
    assert store.pending() is None
    assert store.previous() == committed, "the replaced pair is kept, like any commit keeps it"


def test_nothing_to_restore_when_the_committed_pair_is_the_newest(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 3)
    before = _snapshot(store)
    with pytest.raises(NoLastKnownGoodError, match="already the newest intact one") as refused:
        restore_last_known_good(vm_dir)
    assert "owner" in refused.value.hint
    assert _snapshot(store) == before, "a refusal changes nothing"


@pytest.mark.parametrize("damage", ["lost", "garbage KP", "truncated vault"])
def test_a_lost_or_damaged_committed_pair_with_a_newer_pending_one_is_restored(
    tmp_path: Path, chain: Chain, contents: VaultContents, damage: str
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2, 3)
    committed = store.root / f"gen-{store.committed_number():08d}"
    if damage == "lost":
        for path in committed.iterdir():
            path.unlink()
        committed.rmdir()
    elif damage == "garbage KP":
        (committed / "kp.jws").write_bytes(b"not a key protector")
    else:
        (committed / "vault.jwe").write_bytes(b"eyJhbGciOiJkaXIi")
    restored = restore_last_known_good(vm_dir)
    assert restored.restored_generation == 3
    expected = {"lost": None, "garbage KP": None, "truncated vault": 2}[damage]
    assert restored.previous_generation == expected
    assert _generation(store.committed().kp) == 3


def test_a_damaged_pointer_is_restored_to_the_newest_intact_pair(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2, 3)
    (store.root / "committed").write_text("x\n")
    restored = restore_last_known_good(vm_dir)
    assert (restored.previous_pair, restored.restored_generation) == (None, 3)
    assert _generation(store.committed().kp) == 3


def test_the_restore_never_goes_back_to_an_older_generation(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    """The committed pair is damaged and only its predecessor (spent at the KPS) is intact."""
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 3)
    committed = store.root / f"gen-{store.committed_number():08d}"
    (committed / "kp.jws").write_bytes(b"damaged")
    before = _snapshot(store)
    with pytest.raises(NoLastKnownGoodError, match="rollback"):
        restore_last_known_good(vm_dir)
    assert _snapshot(store) == before


def test_a_damaged_pair_newer_than_the_restored_one_is_set_aside_not_deleted(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2, 3)
    newer = store.write_pending(b"half a vault", b"half a KP")
    restored = restore_last_known_good(vm_dir)
    assert (restored.restored_generation, restored.damaged_pairs_set_aside) == (3, 1)
    [aside] = store.root.glob(f"damaged-gen-{newer.number:08d}-*")
    assert (aside / "kp.jws").read_bytes() == b"half a KP"
    assert store.pending() is None, "power-on will not try the damaged pair"


def test_a_substituted_pair_of_another_kp_is_refused(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    other = _chain(4)  # another VM's KP, three generations on: it would look newest
    store.write_pending(*other.pair(3, contents))
    before = _snapshot(store)
    with pytest.raises(VaultError, match="2 different KP ids"):
        restore_last_known_good(vm_dir)
    assert _snapshot(store) == before


def test_another_vms_vault_is_not_an_intact_pair(
    tmp_path: Path, chain: Chain, contents: VaultContents
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2)
    store.write_pending(*chain.pair(3, contents, name="another-vm"))
    states = inspect_pairs(store, NAME)
    assert [s.intact for s in states] == [True, True, False]
    assert "another VM" in (states[-1].problem or "")
    with pytest.raises(NoLastKnownGoodError, match="already the newest"):
        restore_last_known_good(vm_dir)


def test_the_decision_table() -> None:
    """The pure choice, row by row."""
    good = [PairState(1, 1, "k", None), PairState(2, 2, "k", None)]
    assert choose_last_known_good(good, 1, "v").number == 2
    assert choose_last_known_good(good, None, "v").number == 2
    with pytest.raises(NoLastKnownGoodError, match="already the newest"):
        choose_last_known_good(good, 2, "v")
    with pytest.raises(NoLastKnownGoodError, match="rollback"):
        choose_last_known_good([*good, PairState(3, None, None, "damaged")], 3, "v")
    with pytest.raises(NoLastKnownGoodError, match="lost"):
        choose_last_known_good(good, 3, "v")  # the committed pair vanished
    with pytest.raises(NoLastKnownGoodError, match="no intact key pair"):
        choose_last_known_good([PairState(1, None, None, "damaged")], 1, "v")
    owned = [PairState(1, 1, "k", None, "owner"), PairState(2, 2, "k", None, "owner")]
    forged = PairState(3, 1000, "k", None, "mallory")  # the VM's kp_id, another owner
    with pytest.raises(VaultError, match="2 owners: a pair was substituted"):
        choose_last_known_good([*owned, forged], 2, "v")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Path]:
    """The VM directory of a VM whose recorded QEMU runs (a real process naming its run dir)."""
    vm_dir = _vm_dir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process = subprocess.Popen(["sh", "-c", "sleep 60; :", str(run_dir)])  # $0 = the run dir
    wait_for_cmdline(process.pid, run_dir)
    (vm_dir / "run.json").write_text(f'{{"pid": {process.pid}, "run_dir": "{run_dir}"}}\n')
    try:
        yield vm_dir
    finally:
        process.kill()
        process.wait()


def test_a_running_vm_is_refused(running: Path, chain: Chain, contents: VaultContents) -> None:
    store = _store(running, chain, contents, 2, 3)
    before = _snapshot(store)
    with pytest.raises(UsageError, match="is running"):
        restore_last_known_good(running)
    assert _snapshot(store) == before


def test_a_crash_before_the_pointer_moves_leaves_the_old_commit(
    tmp_path: Path, chain: Chain, contents: VaultContents, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm_dir = _vm_dir(tmp_path)
    store = _store(vm_dir, chain, contents, 2, 3)
    committed = store.committed()
    real_rename = Path.rename

    def crash_on_pointer(self: Path, target: Path) -> Path:
        if self.name == "committed.tmp":
            raise OSError("simulated crash at the rename")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        restore_last_known_good(vm_dir)
    monkeypatch.undo()
    after_crash = VaultStore(vm_dir / "keys")
    assert after_crash.committed() == committed
    assert [p.kp for p in after_crash.candidates()] == [committed.kp, chain.kps[3][0]]
    assert restore_last_known_good(vm_dir).restored_generation == 3, "a retry completes it"
    assert not any(p.name.endswith(".tmp") for p in after_crash.root.iterdir())
