"""End to end: the last known good KP through a real KPS, and a real QEMU's serial console.

The HGS and its KPS are real processes, the host attested for real (host-key
mode), the disks LUKS images, QEMU real (TCG). Two VMs, one guest boot:

* restore: a start that really fails (QEMU cannot bind the VM's port) leaves a
  pending pair; the committed pair is then lost and power-on stops at the
  damaged store; the restore commits the pending pair and the VM powers on.
  Neither the restore nor a hand-edited pointer can take the VM back to a
  generation the KPS already moved past;
* console: an encryption-supported VM with its console on boots; the guest's
  output arrives on the console socket, a wrong password is refused at its
  login prompt, the answer file's password logs in and a command typed there
  runs in the guest. Nothing of it is written on the host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vm_fabric_harness
import vm_harness
from guardfab.errors import UsageError
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.key_protector import create_key_protector, load_key_protector
from guardfab.formats.shielding_data import SecurityPolicy, create_shielding_data
from guardfab.formats.shielding_secrets import (
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    ShieldingSecrets,
)
from guardfab.host.keyrelease import KeyReleaseRefusedError
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.console import console_socket, relay
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.keyprotector import NoLastKnownGoodError, restore_last_known_good
from guardfab.hypervisor.power import power_on, running_pid
from guardfab.hypervisor.provision import LOCAL_ROOT_BOOT, load_record, provision
from guardfab.hypervisor.settings import change_settings
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultError, VaultStore
from guardfab.hypervisor.vm import QemuVm, VmRuntime
from guardfab.tenant.guardians import new_guardian_keys
from test_kps_fixtures import kps_document
from test_vm_settings import Collector
from vm_fabric_harness import TenantVm, VmFabric
from vm_harness import Guest, find_in_files

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow

#: Seconds for the guest to boot to its console shell under TCG with OVMF.
BOOT_TIMEOUT = 120.0


def encryption_supported_tenant(fabric: VmFabric, name: str) -> TenantVm:
    """A tenant whose PDK asks for an encryption-supported VM (the harness makes shielded ones)."""
    owner = new_guardian_keys("owner", KeyAlgorithm.EC_P256)
    document = kps_document(fabric.hgs)
    marker = f"guardfab-marker-{secrets.token_hex(8)}"
    hostname = f"{name}-{secrets.token_hex(3)}"
    password = f"pw-{secrets.token_hex(12)}"
    content = f"tenant-secret-{secrets.token_hex(12)}".encode()
    answer = f"#cloud-config\nhostname: {hostname}\n".encode()
    pdk = create_shielding_data(
        owner,
        [document],
        policy=SecurityPolicy.ENCRYPTION_SUPPORTED,
        secrets=ShieldingSecrets(
            admin=AdminCredentials("root", password),
            answer_file=AnswerFile(AnswerFileKind.CLOUD_INIT, answer),
            files={"tenant.txt": content},
        ),
        qualifiers=[fabric.qualifier()],
        name=name,
        created_at=int(time.time()),
    )
    kp, _ = create_key_protector(owner, [document])
    template, signature = fabric.template(marker)
    return TenantVm(name, template, signature, pdk, kp, marker, hostname, password, content, answer)


@dataclass
class Lab:
    """Provisions VMs on the fabric's attested host; stops every QEMU it started."""

    fabric: VmFabric
    guest: Guest
    accel: Accelerator
    vms: Path
    made: list[QemuVm]

    def provision(self, tenant: TenantVm, *, cmdline: str | None = None) -> Path:
        """``cmdline``: boot the kernel directly with it (not a shielded VM: it boots its disk)."""
        boot = self.guest.boot() if cmdline is None else self.guest.direct(cmdline)
        request = tenant.request(boot=boot, host_port=vm_harness.free_port())
        provision(
            request,
            self.vms,
            reveal_secrets=self.fabric.reveal_secrets,
            key_source=self.fabric.key_source(),
            direct_boot_dir=LOCAL_ROOT_BOOT,
        )
        return self.vms / tenant.name

    def factory(self, spec: VmSpec, state_dir: Path) -> VmRuntime:
        self.made.append(QemuVm(spec, state_dir, accel=self.accel, die_with_parent=True))
        return self.made[-1]

    def power_on(self, vm_dir: Path) -> QemuVm:
        vm = power_on(vm_dir, self.fabric.key_source(), runtime_factory=self.factory)
        assert isinstance(vm, QemuVm)
        return vm


@pytest.fixture(scope="module")
def lab(
    vm_fabric: VmFabric,
    guest: Guest,
    accelerator: Accelerator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lab]:
    made: list[QemuVm] = []
    try:
        yield Lab(vm_fabric, guest, accelerator, tmp_path_factory.mktemp("vms"), made)
    finally:
        for vm in made:
            vm.stop()


def _generation(store: VaultStore) -> int:
    return load_key_protector(store.committed().kp).generation


@contextlib.contextmanager
def _port_taken(port: int) -> Iterator[None]:
    """Someone else holds the VM's port: QEMU cannot set up its forward and exits."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        yield


def test_after_a_failed_start_and_a_lost_kp_the_restore_lets_the_vm_power_on(lab: Lab) -> None:
    tenant = lab.fabric.tenant_vm("lkg-vm")
    vm_dir = lab.provision(tenant)
    store = VaultStore(vm_dir / "keys")
    first = store.committed()
    assert _generation(store) == 1  # the tenant's 0, re-keyed once by provisioning

    with (
        _port_taken(_record_port(vm_dir)),
        pytest.raises(HypervisorError, match="exited at start-up"),
    ):
        lab.power_on(vm_dir)  # a real QEMU failure, after the release and the re-key
    pending = store.pending()
    assert pending is not None
    assert load_key_protector(pending.kp).generation == 2, "the KPS's floor is now 2"

    shutil.rmtree(vm_dir / "keys" / f"gen-{first.number:08d}")  # the committed KP is lost
    with pytest.raises(VaultError, match="incomplete") as damaged:
        lab.power_on(vm_dir)  # power-on stops at a damaged store: it does not guess
    assert "--restore-last-known-good" in damaged.value.hint

    restored = restore_last_known_good(vm_dir)
    assert (restored.previous_pair, restored.previous_generation) == (first.number, None)
    assert (restored.restored_pair, restored.restored_generation) == (pending.number, 2)

    vm = lab.power_on(vm_dir)
    assert vm.running
    assert running_pid(vm_dir) == vm.pid
    assert _generation(store) == 3, "the failed attempt spent nothing: 2 was released once"
    vm.stop()


def test_the_restore_cannot_take_a_vm_back_past_the_kps_refusal(lab: Lab) -> None:
    vm_dir = lab.provision(lab.fabric.tenant_vm("lkg-rollback"))
    store = VaultStore(vm_dir / "keys")
    lab.power_on(vm_dir).stop()  # generation 1 released: 2 committed, 1 kept as previous
    spent = store.previous()
    assert spent is not None
    assert load_key_protector(spent.kp).generation == 1

    with pytest.raises(NoLastKnownGoodError, match="already the newest"):
        restore_last_known_good(vm_dir)
    with pytest.raises(KeyReleaseRefusedError) as refused:
        lab.fabric.key_source().release(spent.kp)  # the kept pair is spent at the KPS
    assert refused.value.reason == "rollback"

    # Past the restore: the pointer written back by hand. The KPS refuses the old
    # generation and power-on goes on with the newest pair; nothing rolled back.
    (store.root / "committed").write_text(f"{spent.number}\n")
    lab.power_on(vm_dir).stop()
    assert _generation(store) == 3

    # The committed KP damaged, only spent pairs left: refused, nothing changed.
    (store.root / f"gen-{store.committed_number():08d}" / "kp.jws").write_bytes(b"damaged")
    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(NoLastKnownGoodError, match="rollback"):
        restore_last_known_good(vm_dir)
    assert sorted(p.name for p in store.root.iterdir()) == before


def _record_port(vm_dir: Path) -> int:
    port = load_record(vm_dir).host_port
    assert port is not None
    return port


# --- the console ---------------------------------------------------------------------


@dataclass
class Attached:
    """A relay attached to a VM's console: its input pipe and what it printed."""

    out: Collector
    input_fd: int
    thread: threading.Thread

    def type(self, data: bytes) -> None:
        """Type into the console."""
        os.write(self.input_fd, data)


@contextlib.contextmanager
def _attach(path: Path) -> Iterator[Attached]:
    read_end, write_end = os.pipe()
    out = Collector()
    stdin = os.fdopen(read_end, "rb")
    thread = threading.Thread(target=relay, args=(path, stdin, out), daemon=True)
    thread.start()
    try:
        yield Attached(out, write_end, thread)
    finally:
        os.close(write_end)
        thread.join(10)
        stdin.close()


def test_an_encryption_supported_vm_with_its_console_on_speaks_on_the_socket(lab: Lab) -> None:
    tenant = encryption_supported_tenant(lab.fabric, "console-vm")
    vm_dir = lab.provision(tenant)  # its firmware boots the signed template disk
    assert change_settings(vm_dir, console=True).console
    with pytest.raises(UsageError, match="not running"):
        console_socket(vm_dir)
    vm = lab.power_on(vm_dir)
    argv = vm.argv()
    assert "-kernel" not in argv  # the console needs no say in the (signed) command line
    assert any(arg.startswith("socket,id=console") for arg in argv), argv
    path = console_socket(vm_dir)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with _attach(path) as console:
        console.out.wait_for(b"console login (root", timeout=BOOT_TIMEOUT)  # the guest's init
        console.out.wait_for(f"{tenant.hostname} login:".encode(), timeout=BOOT_TIMEOUT)
        console.type(b"root\n")
        console.out.wait_for(b"Password:")
        console.type(b"not-the-password\n")
        console.out.wait_for(b"Login incorrect", timeout=30)
        _wait_count(console, b"login:", 2)
        console.type(b"root\n")
        _wait_count(console, b"Password:", 2)
        console.type(tenant.password.encode() + b"\n")  # the answer file's credential
        _type_until(console, b"echo relay-$((6*7))\n", b"relay-42")
        vm.stop()
        console.thread.join(10)
        assert not console.thread.is_alive(), "the relay ends when QEMU closes the console"
    seen = {**tenant.needles(), "console output": b"relay-42", "login": b"Login incorrect"}
    assert find_in_files([vm_dir], seen) == [], "the console's traffic is not kept on the host"


def _wait_count(console: Attached, needle: bytes, count: int, timeout: float = 30) -> None:
    with console.out.changed:
        assert console.out.changed.wait_for(
            lambda: console.out.data.count(needle) >= count, timeout
        ), console.out.data[-2000:]


def _type_until(console: Attached, command: bytes, answer: bytes, timeout: float = 60) -> None:
    """Type ``command`` until the shell (started just after the page) evaluates it."""
    deadline = time.monotonic() + timeout
    while answer not in console.out.data:
        assert time.monotonic() < deadline, console.out.data[-2000:]
        console.type(command)
        with console.out.changed:
            console.out.changed.wait_for(lambda: answer in console.out.data, 5)
