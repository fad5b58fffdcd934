"""Checkpoints: the encrypted chunk stream (attacks on it), a real save and restore of a VM."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import vm_fabric_harness
import vm_harness
from guardfab.errors import PolicyError, UsageError, VerificationError
from guardfab.host.keyrequest import ReleasedKeys
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
from guardfab.hypervisor.power import INCOMING_FILE, PowerOnRefusedError, power_on, running_pid
from guardfab.hypervisor.provision import (
    DISK_IDS,
    LOCAL_ROOT_BOOT,
    load_record,
    provision,
    write_record,
)
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultContents, VaultStore
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
        direct_boot_dir=LOCAL_ROOT_BOOT,
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


# ------------------------------------------------------------- restore refused before any release


class CountingKeys:
    """A key source that counts releases and must never be asked here."""

    def __init__(self) -> None:
        self.releases = 0

    def release(self, kp: bytes) -> ReleasedKeys:
        self.releases += 1
        raise AssertionError("restore asked the KPS for keys before its checks")


def _never_started(spec: VmSpec, state_dir: Path) -> VmRuntime:
    raise AssertionError("restore made a runtime before its checks")


def _with_process_holding(vm_dir: Path) -> subprocess.Popen[bytes]:
    """A real process whose argv names the VM's run directory, as its QEMU's does."""
    run_dir = vm_dir / "run-test"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(run_dir)])
    (vm_dir / "run.json").write_text(json.dumps({"pid": process.pid, "run_dir": str(run_dir)}))
    deadline = time.monotonic() + 10  # /proc/PID/cmdline is empty for a moment after exec
    while running_pid(vm_dir) != process.pid and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running_pid(vm_dir) == process.pid
    return process


def _console_on(vm_dir: Path) -> None:
    write_record(vm_dir, replace(load_record(vm_dir), console=True))  # vm.json edited by hand


def _incoming(vm_dir: Path) -> None:
    (vm_dir / INCOMING_FILE).write_text("{}")


@pytest.fixture(scope="module")
def restorable(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provisioned shielded VM (never booted) with a checkpoint file beside it."""
    vms = tmp_path_factory.mktemp("vms")
    tenant = vm_fabric.tenant_vm("ckpt-refused")
    provision(
        tenant.request(),
        vms,
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    (vms / tenant.name / CHECKPOINT_FILE).write_bytes(b"never read: refused before")
    return vms / tenant.name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("running", UsageError, "is running"),
        ("incoming", UsageError, "unfinished incoming migration"),
        ("policy", PolicyError, "console"),
    ],
)
def test_restore_refuses_before_any_release(
    restorable: Path, case: str, error: type[Exception], reason: str
) -> None:
    vm_dir = restorable
    record_before = (vm_dir / "vm.json").read_bytes()
    store = VaultStore(vm_dir / "keys")
    numbers = store.numbers()
    keys = CountingKeys()
    process = _with_process_holding(vm_dir) if case == "running" else None
    try:
        if case == "incoming":
            _incoming(vm_dir)
        if case == "policy":
            _console_on(vm_dir)
        with pytest.raises(error, match=reason):
            restore_vm(vm_dir, keys, _never_started)
    finally:
        if process is not None:
            process.kill()
            process.wait()
        (vm_dir / "run.json").unlink(missing_ok=True)
        (vm_dir / INCOMING_FILE).unlink(missing_ok=True)
        (vm_dir / "vm.json").write_bytes(record_before)
    assert keys.releases == 0  # no KP generation spent
    assert store.numbers() == numbers
    assert (vm_dir / CHECKPOINT_FILE).exists()
