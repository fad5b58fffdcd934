"""``guardfab vm`` end to end: the real host agent (host-key mode) gets the keys from a real KPS.

The agent runs in this process (its scheduler thread and its Unix socket) and
attests on its own; the CLI talks to it through ``--config``. One real boot:
``vm start`` leaves QEMU running after the command returns, ``vm stop`` stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import vm_fabric_harness
import vm_harness
from guardfab.cli.main import cli
from guardfab.files import PRIVATE, PUBLIC
from guardfab.formats import keyfiles
from guardfab.formats.guardian import GuardianKind, sign_guardian_document
from guardfab.host.config import HostMode, save_config
from guardfab.host.keys import load_or_create_key
from guardfab.host.service import AgentService, build_agent
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.power import power_off, running_pid
from guardfab.hypervisor.provision import provision
from guardfab.hypervisor.vault import VaultStore
from guardfab.tenant import guardians
from guardfab.tenant.guardians import GuardianStore
from host_agent_harness import host_config, register_host_key
from vm_fabric_harness import VmFabric
from vm_harness import Guest, fetch, parse_page

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host_home(
    vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """A configured host-key host with its agent running, and a home holding the KPS guardian."""
    root = tmp_path_factory.mktemp("clihost")
    config = host_config(root / "host", vm_fabric.hgs, mode=HostMode.HOST_KEY)
    assert config.signing_key is not None
    register_host_key(vm_fabric.hgs.directory, "host-cli", load_or_create_key(config.signing_key))
    save_config(root / "host.json", config)
    service = AgentService(build_agent(config)).start()
    home = root / "home"
    assert vm_fabric.kps.guardian.kind is GuardianKind.KPS
    _store_guardian_keys(home, "fabric", vm_fabric)  # stands in for the KPS's PDK unwrap
    try:
        yield root / "host.json", home
    finally:
        service.stop()


def _store_guardian_keys(home: Path, name: str, fabric: VmFabric) -> None:
    """Put the KPS guardian with its private keys into a guardian store (test set-up only)."""
    keys = fabric.kps
    files = {
        guardians._SIGNING_KEY: (keyfiles.private_key_pem(keys.signing_key), PRIVATE),
        guardians._ENCRYPTION_KEY: (keyfiles.private_key_pem(keys.encryption_key), PRIVATE),
        guardians._DOCUMENT: (sign_guardian_document(keys.guardian, keys.signing_key), PUBLIC),
    }
    GuardianStore(home)._write_new(name, files)


def _vm(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["vm", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_new_start_show_stop_through_the_agent(
    vm_fabric: VmFabric,
    host_home: tuple[Path, Path],
    guest: Guest,
    accelerator: Accelerator,
    tmp_path: Path,
) -> None:
    config, home = host_home
    tenant = vm_fabric.tenant_vm("cli-vm")
    files = {"pdk": tenant.pdk, "kp": tenant.kp, "sig": tenant.template_sig}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    vms = tmp_path / "vms"
    port = vm_harness.free_port()
    _vm("new", "cli-vm", "--template", str(tenant.template), "--template-sig",
        str(tmp_path / "sig"), "--pdk", str(tmp_path / "pdk"), "--kp", str(tmp_path / "kp"),
        "--guardian", "fabric", "--home", str(home), "--port", str(port),
        "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--vms", str(vms), "--config", str(config))  # fmt: skip
    assert "cli-vm\tshielded\toff" in _vm("list", "--vms", str(vms))
    refused = _vm("console", "cli-vm", "--vms", str(vms), code=1)
    assert "shielded: it has no console" in refused
    try:
        _vm("start", "cli-vm", "--vms", str(vms), "--config", str(config))
        assert "running: True" in _vm("show", "cli-vm", "--vms", str(vms))
        page = parse_page(fetch(port))
        assert (page["marker"], page["hostname"]) == (tenant.marker, tenant.hostname)
        pid = running_pid(vms / "cli-vm")
        assert pid is not None
        assert "stopped" in _vm("stop", "cli-vm", "--vms", str(vms))
        assert running_pid(vms / "cli-vm") is None
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
    finally:
        power_off(vms / "cli-vm")


def test_a_template_with_a_changed_byte_is_refused_by_vm_new(
    vm_fabric: VmFabric, host_home: tuple[Path, Path], tmp_path: Path
) -> None:
    config, home = host_home
    tenant = vm_fabric.tenant_vm("cli-bad")
    data = bytearray(tenant.template.read_bytes())
    data[4096] ^= 0xFF
    tenant.template.write_bytes(bytes(data))
    for name, content in {"pdk": tenant.pdk, "kp": tenant.kp, "sig": tenant.template_sig}.items():
        (tmp_path / name).write_bytes(content)
    out = _vm("new", "cli-bad", "--template", str(tenant.template), "--template-sig",
              str(tmp_path / "sig"), "--pdk", str(tmp_path / "pdk"), "--kp", str(tmp_path / "kp"),
              "--guardian", "fabric", "--home", str(home), "--vms", str(tmp_path / "vms"),
              "--config", str(config), code=1)  # fmt: skip
    assert "does not match the signed digest" in out
    assert not (tmp_path / "vms").exists() or list((tmp_path / "vms").iterdir()) == []


def test_a_host_that_fails_attestation_cannot_start_the_vm(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("cli-rogue")
    vms = tmp_path / "vms"
    provision(
        tenant.request(),
        vms,
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
    )
    before = VaultStore(vms / "cli-rogue" / "keys").numbers()
    rogue = host_config(tmp_path / "rogue", vm_fabric.hgs, mode=HostMode.HOST_KEY)  # unregistered
    save_config(tmp_path / "rogue.json", rogue)
    service = AgentService(build_agent(rogue)).start()
    try:
        out = _vm("start", "cli-rogue", "--vms", str(vms), "--config", str(tmp_path / "rogue.json"),
                  code=1)  # fmt: skip
    finally:
        service.stop()
    assert "cannot start on this host" in out
    assert "no valid health certificate" in out
    assert "not registered" in out
    assert running_pid(vms / "cli-rogue") is None
    assert VaultStore(vms / "cli-rogue" / "keys").numbers() == before
