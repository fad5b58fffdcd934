"""End to end: a shielded VM provisioned from a signed template and a PDK, started through KPS.

One real boot (QEMU under TCG with OVMF secure boot, the tiny guest): the HGS
and KPS are real processes, the host attested for real (host-key mode), the
disks are LUKS images, the vTPM a swtpm. The guest's page shows the template's
marker and the hostname from the PDK's answer file; nothing the host wrote
holds the marker, the answer file, the password or the served file in clear.
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
from guardfab.hypervisor.provision import provision
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
        tenant.request(boot=guest.boot(), host_port=port),
        vms,
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
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
    assert fetch(booted.port, "/files/tenant.txt").encode() == booted.tenant.file_content


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
