"""``guardfab vm`` end to end, through the agents' management API over HTTPS.

Three host-key hosts, each with its agent (scheduler, Unix socket, management
API) running in this process: A and B registered at the HGS, C never. The CLI
reaches each API with its host configuration (URL, CA, admin token file). Two
real boots: a shielded VM (page, console refused, migration refused to C and
done to B, checkpoint and restore on B), and an encryption-supported VM whose
console the administrator turns on and attaches to.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import vm_fabric_harness
import vm_harness
from guardfab.cli.main import cli
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.power import power_off, running_pid
from guardfab.hypervisor.provision import LOCAL_ROOT_BOOT, provision
from guardfab.hypervisor.vault import VaultStore
from manage_harness import ManagedHost, managed_host
from vm_fabric_harness import TenantVm, VmFabric
from vm_harness import Guest, fetch, find_in_files, parse_page

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@dataclass
class Hosts:
    """The three hosts by name."""

    a: ManagedHost
    b: ManagedHost
    c: ManagedHost

    def all(self) -> tuple[ManagedHost, ...]:
        """Every host."""
        return (self.a, self.b, self.c)


@pytest.fixture(scope="module")
def hosts(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """A and B registered, C not; every agent stops at the end, every VM is powered off."""
    root = tmp_path_factory.mktemp("vmcli")
    with (
        managed_host(root / "a", vm_fabric, "cli-a") as a,
        managed_host(root / "b", vm_fabric, "cli-b") as b,
        managed_host(root / "c", vm_fabric, "cli-c", registered=False) as c,
    ):
        running = Hosts(a, b, c)
        try:
            yield running
        finally:
            for host in running.all():
                for vm_dir in host.config.vms_dir.glob("*"):
                    power_off(vm_dir)


def _vm(host: ManagedHost, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(
        cli, ["vm", *args, "--config", str(host.config_file)], catch_exceptions=False
    )
    assert result.exit_code == code, result.output
    return result.output


def _new(host: ManagedHost, tenant: TenantVm, files: Path, *extra: str, code: int = 0) -> str:
    for name, data in {"pdk": tenant.pdk, "kp": tenant.kp, "sig": tenant.template_sig}.items():
        (files / name).write_bytes(data)
    return _vm(host, "new", tenant.name, "--template", str(tenant.template),
               "--template-sig", str(files / "sig"), "--pdk", str(files / "pdk"),
               "--kp", str(files / "kp"), *extra, code=code)  # fmt: skip


def _operations(host: ManagedHost, vm: str) -> list[tuple[str, str, str]]:
    assert host.service.management is not None
    records = host.service.management.context.audit.records()
    return [(r.actor, r.details["operation"], r.outcome) for r in records if r.subject == vm]


def test_a_shielded_vm_from_provisioning_to_migration_and_restore(
    vm_fabric: VmFabric, hosts: Hosts, guest: Guest, accelerator: Accelerator, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("cli-vm")
    port = vm_harness.free_port()
    _new(hosts.a, tenant, tmp_path, "--port", str(port))  # the firmware boots its disk
    assert "cli-vm\tshielded\toff" in _vm(hosts.a, "list")
    assert "shielded: attaching a console refused" in _vm(hosts.a, "console", "cli-vm", code=1)
    assert "console=on refused" in _vm(hosts.a, "settings", "cli-vm", "--console", code=1)

    _vm(hosts.a, "start", "cli-vm")
    assert "running: True" in _vm(hosts.a, "show", "cli-vm")
    page = parse_page(fetch(port))
    assert (page["marker"], page["hostname"]) == (tenant.marker, tenant.hostname)

    # The CLI drives both agents, each with its own admin token (from --to-config for B).
    refused = _vm(hosts.a, "migrate", "cli-vm", "--to-config", str(hosts.c.config_file), code=1)
    assert "got no keys" in refused
    assert not (hosts.c.config.vms_dir / "cli-vm").exists()
    assert "running: True" in _vm(hosts.a, "show", "cli-vm")

    _vm(hosts.a, "migrate", "cli-vm", "--to-config", str(hosts.b.config_file))
    assert parse_page(fetch(port))["boot_id"] == page["boot_id"]
    assert "cli-vm\tshielded\trunning" in _vm(hosts.b, "list")
    assert not (hosts.a.config.vms_dir / "cli-vm" / "vm.json").exists()  # its disks stay there

    assert "checkpointed" in _vm(hosts.b, "checkpoint", "cli-vm")
    assert "cli-vm\tshielded\toff" in _vm(hosts.b, "list")
    assert "restored" in _vm(hosts.b, "restore", "cli-vm")
    assert parse_page(fetch(port))["boot_id"] == page["boot_id"]

    reviewer = ("--token-file", str(hosts.b.files.token_file("reviewer")))
    assert "cli-vm\tshielded\trunning" in _vm(hosts.b, "list", *reviewer)
    assert "reviewer role may not" in _vm(hosts.b, "stop", "cli-vm", *reviewer, code=1)
    pid = running_pid(hosts.b.config.vms_dir / "cli-vm")
    assert pid is not None
    assert "was running: True" in _vm(hosts.b, "stop", "cli-vm")
    assert running_pid(hosts.b.config.vms_dir / "cli-vm") is None

    assert _operations(hosts.a, "cli-vm") == [
        ("admin", "provision", "granted"),
        ("admin", "console", "refused"),
        ("admin", "settings", "refused"),
        ("admin", "start", "granted"),
        ("admin", "migrate-offer", "granted"),  # to C, refused there
        ("admin", "migrate-offer", "granted"),
        ("admin", "migrate-send", "granted"),
        ("admin", "migrate-leave", "granted"),
    ]
    assert _operations(hosts.c, "cli-vm") == [("admin", "migrate-receive", "refused")]
    assert _operations(hosts.b, "cli-vm") == [
        ("admin", "migrate-receive", "granted"),
        ("admin", "migrate-finish", "granted"),
        ("admin", "migrate-forward", "granted"),
        ("admin", "checkpoint", "granted"),
        ("admin", "restore", "granted"),
        ("reviewer", "stop", "refused"),
        ("admin", "stop", "granted"),
    ]
    roots = [h.config_file.parent for h in hosts.all()]
    assert find_in_files(roots, tenant.needles()) == []


def test_a_template_with_a_changed_byte_is_refused_by_vm_new(
    vm_fabric: VmFabric, hosts: Hosts, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("cli-bad")
    data = bytearray(tenant.template.read_bytes())
    data[4096] ^= 0xFF
    tenant.template.write_bytes(bytes(data))
    out = _new(hosts.a, tenant, tmp_path, code=1)
    assert "does not match the signed digest" in out
    assert not (hosts.a.config.vms_dir / "cli-bad").exists()


def test_a_shielded_vm_with_a_direct_kernel_is_refused_by_vm_new(
    vm_fabric: VmFabric, hosts: Hosts, guest: Guest, tmp_path: Path
) -> None:
    """A kernel given by the host is not verified by the firmware: policy rule firmware-boot."""
    tenant = vm_fabric.tenant_vm("cli-direct")
    out = _new(hosts.a, tenant, tmp_path, "--kernel", str(guest.kernel),
               "--initrd", str(guest.initrd), code=1)  # fmt: skip
    assert "firmware-boot: a shielded VM boots its own disk" in out
    assert not (hosts.a.config.vms_dir / "cli-direct").exists()
    assert list(hosts.a.config.vms_dir.glob(".cli-direct*")) == []
    assert _operations(hosts.a, "cli-direct") == [("admin", "provision", "refused")]


def test_a_host_that_fails_attestation_cannot_start_the_vm(
    vm_fabric: VmFabric, hosts: Hosts
) -> None:
    tenant = vm_fabric.tenant_vm("cli-rogue")
    vms = hosts.c.config.vms_dir
    provision(  # set-up only: the VM's files as another host left them
        tenant.request(),
        vms,
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    before = VaultStore(vms / "cli-rogue" / "keys").numbers()
    out = _vm(hosts.c, "start", "cli-rogue", code=1)
    assert "cannot start on this host" in out
    assert "no valid health certificate" in out
    assert "not registered" in out
    assert running_pid(vms / "cli-rogue") is None
    assert VaultStore(vms / "cli-rogue" / "keys").numbers() == before
    assert _operations(hosts.c, "cli-rogue") == [("admin", "start", "refused")]


def test_an_encryption_supported_vm_console_is_allowed(
    vm_fabric: VmFabric, hosts: Hosts, guest: Guest, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("cli-es", policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    port = vm_harness.free_port()
    _new(hosts.a, tenant, tmp_path, "--port", str(port), "--kernel", str(guest.kernel),
         "--initrd", str(guest.initrd), "--cmdline", "guardfab.debug=1")  # fmt: skip
    assert "console off" in _vm(hosts.a, "console", "cli-es", code=1)
    assert "console on" in _vm(hosts.a, "settings", "cli-es", "--console")
    assert "not running" in _vm(hosts.a, "console", "cli-es", code=2)
    _vm(hosts.a, "start", "cli-es")
    fetch(port)  # booted: its shell is on the console
    output = _console(hosts.a, "cli-es", b"echo relay-$((6*7))\n")
    assert b"relay-42" in output
    _vm(hosts.a, "stop", "cli-es")
    assert _operations(hosts.a, "cli-es")[-3:] == [
        ("admin", "start", "granted"),
        ("admin", "console", "granted"),
        ("admin", "stop", "granted"),
    ]


def _console(host: ManagedHost, name: str, command: bytes, tries: int = 10) -> bytes:
    """Run ``guardfab vm console NAME`` with ``command`` typed a few times; its output."""
    guardfab = Path(sys.executable).parent / "guardfab"
    argv = [str(guardfab), "vm", "console", name, "--config", str(host.config_file)]
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None
    for _ in range(tries):
        process.stdin.write(command)
        process.stdin.flush()
        time.sleep(1)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode(errors="replace")
    return out
