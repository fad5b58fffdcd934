"""End to end: a shielded VM provisioned from a signed template and a PDK, started through KPS.

The HGS and KPS are real processes, the host attested for real (host-key mode),
the disks are LUKS images, the vTPM a swtpm, QEMU real (TCG, OVMF secure boot).
The VM boots its template disk through the firmware (ADR 0013): shim, grub and
the kernel from the disk's EFI system partition, each verified before it runs.

* One good boot: the guest's page shows secure boot on, the template's marker
  (read from the disk's root partition) and the hostname from the PDK's answer
  file; nothing the host wrote holds the marker, the answer file, the password
  or the served file in clear.
* One refused boot: a template whose kernel was changed, signed by the
  publisher all the same (so provisioning accepts it), never runs that kernel:
  grub, through shim, refuses it. The VM has no console to show grub's error, so
  the test watches its disk: the firmware and grub read it past the kernel, but
  nothing ever mounts it, and the page never answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vm_fabric_harness
import vm_harness
from guardfab.errors import UsageError
from guardfab.formats.key_protector import load_key_protector
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.power import power_on, running_pid
from guardfab.hypervisor.provision import LOCAL_ROOT_BOOT, provision
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultStore
from guardfab.hypervisor.vm import QemuVm, VmRuntime
from vm_fabric_harness import TenantVm, VmFabric
from vm_harness import Guest, fetch, find_in_files, parse_page, process_cmdline

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@dataclass
class Booted:
    tenant: TenantVm
    vm_dir: Path
    vm: QemuVm
    port: int
    timings: dict[str, float]


@pytest.fixture(scope="module")
def booted(
    vm_fabric: VmFabric,
    guest: Guest,
    accelerator: Accelerator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Booted]:
    tenant = vm_fabric.tenant_vm("shielded-1")
    vms = tmp_path_factory.mktemp("vms")
    port = vm_harness.free_port()
    timings: dict[str, float] = {}
    mark = time.monotonic()
    provision(
        tenant.request(host_port=port),  # no kernel: the firmware boots the template disk
        vms,
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    timings["provision"] = time.monotonic() - mark
    made: list[QemuVm] = []

    def factory(spec: VmSpec, state_dir: Path) -> VmRuntime:
        made.append(QemuVm(spec, state_dir, accel=accelerator, die_with_parent=True))
        return made[-1]

    try:
        mark = time.monotonic()
        power_on(vms / tenant.name, vm_fabric.key_source(), runtime_factory=factory)
        timings["power on (release, re-key, QEMU running)"] = time.monotonic() - mark
        fetch(port)
        timings["power on to page"] = time.monotonic() - mark
        print(f"\nshielded VM through KPS on {accelerator.name}: {timings}")
        yield Booted(tenant, vms / tenant.name, made[0], port, timings)
    finally:
        for vm in made:
            vm.stop()


def test_the_shielded_vm_serves_its_page_from_the_template_and_pdk(booted: Booted) -> None:
    page = parse_page(fetch(booted.port))
    assert page["marker"] == booted.tenant.marker
    assert page["hostname"] == booted.tenant.hostname
    assert page["tpm"].startswith("present"), page
    assert page["secure_boot"] == "enabled", page
    assert "[integrity]" in page["lockdown"], page  # the signed kernel locked itself down
    assert page["os_device"] == "/dev/vda2", page  # the root partition of the template disk
    assert fetch(booted.port, "/files/tenant.txt").encode() == booted.tenant.file_content
    assert "-kernel" not in booted.vm.argv()


def test_nothing_in_clear_in_the_vm_directory(booted: Booted) -> None:
    written = {p.name for p in vm_harness.files_under([booted.vm_dir])}
    assert {"os.qcow2", "spec.qcow2", "vault.jwe", "kp.jws", "vm.json"} <= written
    assert "tpm2-00.permall" in written
    assert find_in_files([booted.vm_dir], booted.tenant.needles()) == []


def test_no_secret_on_the_command_lines(booted: Booted) -> None:
    assert booted.vm.pid is not None
    assert booted.vm.swtpm_pid is not None
    for pid in (booted.vm.pid, booted.vm.swtpm_pid):
        joined = " ".join(process_cmdline(pid)).encode()
        assert [n for n, s in booted.tenant.needles().items() if s in joined] == []


def test_the_egress_kp_is_committed_and_the_previous_pair_kept(booted: Booted) -> None:
    store = VaultStore(booted.vm_dir / "keys")
    assert store.pending() is None
    committed = load_key_protector(store.committed().kp)
    last = store.previous()
    assert last is not None
    # The tenant's KP was generation 0: provisioning re-keyed once, power-on once more.
    assert (load_key_protector(last.kp).generation, committed.generation) == (1, 2)
    assert running_pid(booted.vm_dir) == booted.vm.pid


def test_a_running_vm_is_not_started_twice_and_spends_no_kp(
    vm_fabric: VmFabric, booted: Booted
) -> None:
    store = VaultStore(booted.vm_dir / "keys")
    before = store.numbers()
    with pytest.raises(UsageError, match="already running"):
        power_on(booted.vm_dir, vm_fabric.key_source())
    assert store.numbers() == before


#: Seconds after grub read the kernel by which a good kernel has mounted its root
#: partition (it serves its page about 10 s after grub under TCG on a busy machine).
KERNEL_GRACE = 30.0


def _wait_for_reads(vm: QemuVm, device_id: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (read := vm_harness.disk_stats(vm, device_id)["rd_bytes"]) < at_least:
        assert time.monotonic() < deadline, f"the firmware read only {read} bytes of {device_id}"
        time.sleep(0.5)
    return read


def _answers(port: int, seconds: float) -> bool:
    try:
        fetch(port, timeout=seconds)
    except AssertionError:
        return False
    return True


def test_a_signed_template_with_a_changed_kernel_does_not_boot(
    vm_fabric: VmFabric, guest: Guest, booted: Booted, tmp_path: Path
) -> None:
    """The point of the signed chain: the publisher's signature alone does not make a kernel run."""
    tenant = vm_fabric.tenant_vm("shielded-bad-kernel")
    kernel = vm_harness.kernel_with_four_bytes_changed(guest.kernel, tmp_path / "vmlinuz")
    tenant.template, tenant.template_sig = vm_fabric.template(tenant.marker, kernel=kernel)
    port = vm_harness.free_port()
    provision(  # accepted: the disk is what its publisher signed
        tenant.request(host_port=port),
        tmp_path / "vms",
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    made: list[QemuVm] = []

    def factory(spec: VmSpec, state_dir: Path) -> VmRuntime:
        made.append(QemuVm(spec, state_dir, accel=booted.vm.accel, die_with_parent=True))
        return made[-1]

    try:
        power_on(tmp_path / "vms" / tenant.name, vm_fabric.key_source(), runtime_factory=factory)
        vm = made[0]
        # shim and grub came off the disk, then grub read the kernel ...
        chain = (guest.chain.shim, guest.chain.grub, kernel)
        _wait_for_reads(vm, "os", sum(p.stat().st_size for p in chain), vm_harness.PAGE_TIMEOUT)
        # ... and refused it: the guest never mounts its root or serves its page.
        assert not _answers(port, KERNEL_GRACE)
        assert vm.running
        assert vm.status() == "running"  # no crash, no reset loop: it waits at grub's prompt
        stats = vm_harness.disk_stats(vm, "os")
        print(f"\nrefused kernel: os disk read {stats['rd_bytes']} bytes, never written")
        assert stats["wr_operations"] == 0
    finally:
        for made_vm in made:
            made_vm.stop()
    # The good VM of this module, from a template with the signed kernel, wrote to its root.
    assert vm_harness.disk_stats(booted.vm, "os")["wr_operations"] > 0
