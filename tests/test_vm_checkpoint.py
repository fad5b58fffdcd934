"""Checkpoints: the encrypted chunk stream (attacks on it), a real save and restore of a VM."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

import vm_fabric_harness
import vm_harness
from guardfab.errors import VerificationError
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.checkpoint import (
    CHECKPOINT_FILE,
    MAGIC,
    SALT_SIZE,
    checkpoint_vm,
    decrypt_stream,
    encrypt_stream,
    restore_vm,
)
from guardfab.hypervisor.power import PowerOnRefusedError, power_on, running_pid
from guardfab.hypervisor.provision import DISK_IDS, provision
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultContents
from guardfab.hypervisor.vm import QemuVm, VmRuntime
from vm_fabric_harness import VmFabric
from vm_harness import Guest, fetch, find_in_files, parse_page

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

KEYS = VaultContents.generate(DISK_IDS)
STATE = b"QEVM" + bytes(range(256)) * 9000  # a bit over two chunks


def _sealed(data: bytes = STATE, name: str = "vm1") -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, KEYS, name)
    return out.getvalue()


def _open(sealed: bytes, name: str = "vm1", keys: VaultContents = KEYS) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(sealed), keys, name))


def _frames(sealed: bytes) -> list[bytes]:
    frames, at = [], len(MAGIC) + SALT_SIZE
    while at < len(sealed):
        (length,) = struct.unpack(">I", sealed[at : at + 4])
        frames.append(sealed[at : at + 4 + length])
        at += 4 + length
    return frames


@pytest.mark.parametrize("data", [b"", b"x", STATE])
def test_round_trip_and_no_plaintext(data: bytes) -> None:
    sealed = _sealed(data)
    assert _open(sealed) == data
    assert b"QEVM" not in sealed


def _head(sealed: bytes) -> bytes:
    return sealed[: len(MAGIC) + SALT_SIZE]


ATTACKS = {
    "flipped byte": lambda s: s[:-40] + bytes([s[-40] ^ 1]) + s[-39:],
    "last chunk dropped": lambda s: _head(s) + b"".join(_frames(s)[:-1]),
    "chunks swapped": lambda s: (
        _head(s) + b"".join([_frames(s)[1], _frames(s)[0], *_frames(s)[2:]])
    ),
    "cut in a frame": lambda s: s[:-5],
    "data appended": lambda s: s + _frames(s)[-1],
    "not a checkpoint": lambda s: b"PLAIN" + s[5:],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_changed_checkpoint_is_refused(attack: str) -> None:
    with pytest.raises(VerificationError):
        _open(ATTACKS[attack](_sealed()))


def test_another_vm_or_key_cannot_open_it() -> None:
    with pytest.raises(VerificationError):
        _open(_sealed(), name="vm2")
    with pytest.raises(VerificationError):
        _open(_sealed(), keys=VaultContents.generate(DISK_IDS))


@pytest.mark.slow
def test_checkpoint_stop_restore_keeps_the_boot(
    vm_fabric: VmFabric, guest: Guest, accelerator: Accelerator, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("ckpt-1")
    port = vm_harness.free_port()
    vm_dir = tmp_path / "vms" / tenant.name
    provision(
        tenant.request(boot=guest.boot(), host_port=port),
        tmp_path / "vms",
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
    )
    made: list[QemuVm] = []

    def factory(spec: VmSpec, state_dir: Path) -> VmRuntime:
        made.append(QemuVm(spec, state_dir, accel=accelerator, die_with_parent=True))
        return made[-1]

    try:
        power_on(vm_dir, vm_fabric.key_source(), runtime_factory=factory)
        boot_id = parse_page(fetch(port))["boot_id"]
        path = checkpoint_vm(made[0], vm_dir, vm_fabric.key_source())
        assert not made[0].running
        assert running_pid(vm_dir) is None
        size = path.stat().st_size
        assert size > 1_000_000
        assert find_in_files([vm_dir], tenant.needles()) == []
        with pytest.raises(PowerOnRefusedError, match="no keys were released"):
            restore_vm(vm_dir, vm_fabric.unattested_host("ckpt-rogue"), factory)
        assert len(made) == 1
        assert (vm_dir / CHECKPOINT_FILE).exists()
        restored = restore_vm(vm_dir, vm_fabric.key_source(), factory)
        page = parse_page(fetch(port))
        print(f"\ncheckpoint {size / 1e6:.0f} MB, restored: {restored.status()}")
        assert page["boot_id"] == boot_id
        assert page["marker"] == tenant.marker
        assert not (vm_dir / CHECKPOINT_FILE).exists()
        assert running_pid(vm_dir) == restored.pid
    finally:
        for vm in made:
            vm.stop()
