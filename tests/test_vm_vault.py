"""The VM key vault: sealing under the transport key, and the pending/committed store."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardfab.errors import FormatError, VerificationError
from guardfab.formats.key_protector import TransportKey
from guardfab.hypervisor.vault import (
    VaultContents,
    VaultStore,
    open_vault,
    seal_vault,
)


def test_a_vault_opens_with_its_key_and_name_only() -> None:
    contents = VaultContents.generate(["os", "spec"])
    key = TransportKey.generate()
    sealed = seal_vault(contents, key, vm_name="vm1")
    opened = open_vault(sealed, key, vm_name="vm1")
    assert opened.to_bytes() == contents.to_bytes()
    assert opened.vm_keys().disks["os"] == contents.disks["os"]
    for attack in (
        lambda: open_vault(sealed, TransportKey.generate(), vm_name="vm1"),
        lambda: open_vault(sealed, key, vm_name="vm2"),  # another VM's name: another key
        lambda: open_vault(sealed[:-3] + b"AAA", key, vm_name="vm1"),
    ):
        with pytest.raises(VerificationError):
            attack()


def test_no_key_shows_in_the_sealed_vault_or_a_repr() -> None:
    contents = VaultContents.generate(["os"])
    key = TransportKey.generate()
    sealed = seal_vault(contents, key, vm_name="vm1")
    for secret in (contents.vtpm_state, contents.disks["os"].material, key.reveal()):
        assert secret not in sealed
        assert secret.hex() not in repr(contents)
    assert contents.disks["os"].passphrase() not in sealed


def test_malformed_contents_are_refused() -> None:
    with pytest.raises(FormatError):
        VaultContents(b"short", bytes(32), {})
    with pytest.raises(FormatError):
        VaultContents.from_bytes(b'{"type": "other", "version": 1}')


def test_pending_pair_then_commit_keeps_the_previous_pair(tmp_path: Path) -> None:
    store = VaultStore(tmp_path / "keys")
    assert store.candidates() == []
    first = store.write_pending(b"v1", b"kp1")
    assert store.pending() == first
    store.commit(first.number)
    assert store.pending() is None
    assert [p.kp for p in store.candidates()] == [b"kp1"]
    second = store.write_pending(b"v2", b"kp2")
    # Crash here: the committed pair is tried first, then the pending one.
    assert [p.kp for p in VaultStore(tmp_path / "keys").candidates()] == [b"kp1", b"kp2"]
    store.commit(second.number)
    third = store.write_pending(b"v3", b"kp3")
    store.commit(third.number)
    assert store.numbers() == [second.number, third.number]
    last = store.previous()
    assert last is not None
    assert last.kp == b"kp2"
    modes = {p.stat().st_mode & 0o777 for p in store.files()}
    assert modes == {0o600}


def test_a_half_written_pair_is_not_a_pair(tmp_path: Path) -> None:
    store = VaultStore(tmp_path / "keys")
    store.commit(store.write_pending(b"v1", b"kp1").number)
    (store.root / "gen-00000002.tmp").mkdir()
    (store.root / "gen-00000002.tmp" / "vault.jwe").write_bytes(b"partial")
    assert store.pending() is None
    assert store.write_pending(b"v2", b"kp2").number == 2


def test_a_stale_pending_pair_is_dropped_when_a_newer_pair_commits(tmp_path: Path) -> None:
    store = VaultStore(tmp_path / "keys")
    store.commit(store.write_pending(b"v1", b"kp1").number)
    store.write_pending(b"v2", b"kp2")  # a crash left it; then the committed KP was accepted
    store.commit(store.write_pending(b"v3", b"kp3").number)
    last = store.previous()
    assert last is not None
    assert last.kp == b"kp1"
    assert [store.load(n).kp for n in store.numbers()] == [b"kp1", b"kp3"]
