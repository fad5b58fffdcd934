"""Provisioning and power-on against a real HGS and KPS, with a stand-in for QEMU.

The KPS, the host's attestation and the LUKS disks are real; the runtime is a
recorder (:class:`FakeVm`), so re-keying, refusals and crash recovery are
tested without booting a guest (test_vm_shielded_boot.py boots one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import guardfab.hypervisor.provision as provision_module
import vm_fabric_harness
from guardfab.errors import NotAuthorizedError, PolicyError, UsageError, VerificationError
from guardfab.formats.guardian import GuardianKind, KeyAlgorithm, sign_guardian_document
from guardfab.formats.key_protector import load_key_protector
from guardfab.formats.shielding_data import SecurityPolicy, ShieldingData
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.host.keyrelease import KeyReleaseRefusedError
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.power import PowerOnRefusedError, power_on
from guardfab.hypervisor.provision import LOCAL_ROOT_BOOT, load_record, provision, write_record
from guardfab.hypervisor.spec import DirectKernel, VmSpec
from guardfab.hypervisor.vault import VaultStore
from guardfab.hypervisor.vm import VmKeys
from guardfab.tenant.guardians import new_guardian_keys
from test_kps_fixtures import minted_certificate
from vm_fabric_harness import TenantVm, VmFabric

vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


class SimulatedCrashError(Exception):
    """The host dies between the re-key and the commit."""


@dataclass
class FakeVm:
    """Records the keys a start got; can crash instead of starting."""

    spec: VmSpec
    crash: bool = False
    keys: VmKeys | None = None
    started: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.keys is not None

    def start(self, keys: VmKeys, *, incoming: bool = False) -> None:
        if self.crash:
            raise SimulatedCrashError
        self.keys = keys

    def stop(self) -> None:
        self.keys = None

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def status(self) -> str:
        return "running"


def _fake(crash: bool = False) -> tuple[list[FakeVm], object]:
    made: list[FakeVm] = []

    def factory(spec: VmSpec, _state: Path) -> FakeVm:
        made.append(FakeVm(spec, crash))
        return made[-1]

    return made, factory


def _provision(fabric: VmFabric, tenant: TenantVm, vms: Path) -> Path:
    provision(
        tenant.request(),
        vms,
        reveal_secrets=fabric.reveal_secrets,
        key_source=fabric.key_source(),
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    return vms / tenant.name


def _kp_generation(vm_dir: Path) -> int:
    return load_key_protector(VaultStore(vm_dir / "keys").committed().kp).generation


@pytest.fixture(scope="module")
def provisioned(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tenant = vm_fabric.tenant_vm("vm-keys")
    return _provision(vm_fabric, tenant, tmp_path_factory.mktemp("vms"))


def test_every_start_rekeys_and_stores_the_egress_kp(
    vm_fabric: VmFabric, provisioned: Path
) -> None:
    before = _kp_generation(provisioned)
    made, factory = _fake()
    power_on(provisioned, vm_fabric.key_source(), runtime_factory=factory)  # type: ignore[arg-type]
    power_on(provisioned, vm_fabric.key_source(), runtime_factory=factory)  # type: ignore[arg-type]
    assert _kp_generation(provisioned) == before + 2
    first, second = (vm.keys for vm in made)
    assert first is not None
    assert second is not None
    assert first.disks == second.disks  # same vault content under a new key each time
    assert first.vtpm_state == second.vtpm_state
    last = VaultStore(provisioned / "keys").previous()
    assert last is not None
    assert load_key_protector(last.kp).generation == before + 1


def test_a_crash_between_rekey_and_commit_recovers_with_the_pending_pair(
    vm_fabric: VmFabric, provisioned: Path
) -> None:
    store = VaultStore(provisioned / "keys")
    committed = store.committed()
    _, crashing = _fake(crash=True)
    with pytest.raises(SimulatedCrashError):
        power_on(provisioned, vm_fabric.key_source(), runtime_factory=crashing)  # type: ignore[arg-type]
    pending = store.pending()
    assert pending is not None, "the re-keyed vault and egress KP were written before QEMU"
    assert store.committed() == committed
    made, factory = _fake()
    power_on(provisioned, vm_fabric.key_source(), runtime_factory=factory)  # type: ignore[arg-type]
    assert made[0].keys is not None
    # The committed KP was refused (the KPS had issued a newer one); the pending pair opened.
    assert _kp_generation(provisioned) == load_key_protector(pending.kp).generation + 1
    assert store.previous() == pending, "the pair actually used is the one kept"
    assert store.numbers() == [pending.number, store.committed().number]


def test_a_host_without_a_valid_certificate_cannot_start_the_vm(
    vm_fabric: VmFabric, provisioned: Path
) -> None:
    store = VaultStore(provisioned / "keys")
    before = store.numbers()
    expired = minted_certificate(vm_fabric.hgs, vm_fabric.host, issued=1_000_000, lifetime=3600)
    made, factory = _fake()
    with pytest.raises(PowerOnRefusedError) as refused:
        power_on(provisioned, vm_fabric.key_source(expired), runtime_factory=factory)  # type: ignore[arg-type]
    assert "cannot start on this host" in str(refused.value)
    assert "certificate" in str(refused.value)
    assert made == []
    assert store.numbers() == before


def _nothing_created(vms: Path) -> None:
    assert not vms.exists() or list(vms.iterdir()) == []


def test_a_template_with_one_changed_byte_is_refused_and_nothing_is_created(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("vm-tampered")
    data = bytearray(tenant.template.read_bytes())
    data[len(data) // 2] ^= 0x01
    tenant.template.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="does not match the signed digest"):
        _provision(vm_fabric, tenant, tmp_path / "vms")
    _nothing_created(tmp_path / "vms")


def test_a_template_the_pdk_does_not_admit_is_refused_with_the_reason(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("vm-other-template")
    other = vm_fabric_harness.VmFabric(
        vm_fabric.root,
        vm_fabric.hgs,
        vm_fabric.kps,
        vm_fabric.host,
        vm_fabric.certificate,
        vm_fabric.guest,
    )
    tenant.template, tenant.template_sig = other.template("other publisher")
    with pytest.raises(NotAuthorizedError, match="refused by every volume ID qualifier"):
        _provision(vm_fabric, tenant, tmp_path / "vms")
    _nothing_created(tmp_path / "vms")


def test_a_pdk_for_another_fabric_is_refused_and_nothing_is_created(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    other_kps = new_guardian_keys("other-kps", KeyAlgorithm.EC_P256, GuardianKind.KPS)
    document = sign_guardian_document(other_kps.guardian, other_kps.signing_key)
    tenant = vm_fabric.tenant_vm("vm-elsewhere", fabric_document=document)
    with pytest.raises(NotAuthorizedError, match="neither its owner nor one of its guardians"):
        _provision(vm_fabric, tenant, tmp_path / "vms")
    _nothing_created(tmp_path / "vms")


def test_provisioning_on_a_host_without_keys_creates_nothing(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("vm-nocert")
    expired = minted_certificate(vm_fabric.hgs, vm_fabric.host, issued=1_000_000, lifetime=3600)
    with pytest.raises(KeyReleaseRefusedError, match="certificate"):
        provision(
            tenant.request(),
            tmp_path / "vms",
            reveal_secrets=vm_fabric.reveal_secrets,
            key_source=vm_fabric.key_source(expired),
            direct_boot_dir=LOCAL_ROOT_BOOT,
        )
    _nothing_created(tmp_path / "vms")


@dataclass
class Watched:
    """The fabric's PDK opener and key source, counting what provisioning asked of them."""

    fabric: VmFabric
    calls: list[str] = field(default_factory=list)

    def reveal_secrets(self, pdk: ShieldingData) -> ShieldingSecrets:
        self.calls.append("reveal")
        return self.fabric.reveal_secrets(pdk)

    def release(self, kp: bytes) -> ReleasedKeys:
        self.calls.append("release")
        return self.fabric.key_source().release(kp)


def test_a_shielded_vm_with_a_direct_kernel_is_refused_before_anything_happens(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    """ADR 0013: OVMF does not verify a kernel given with -kernel; a shielded VM boots its disk."""
    tenant = vm_fabric.tenant_vm("vm-direct-kernel")
    guest = vm_fabric.guest
    watched = Watched(vm_fabric)
    with pytest.raises(PolicyError, match="firmware-boot: a shielded VM boots its own disk"):
        provision(
            tenant.request(boot=DirectKernel(guest.kernel, guest.initrd, "quiet")),
            tmp_path / "vms",
            reveal_secrets=watched.reveal_secrets,
            key_source=watched,
            direct_boot_dir=LOCAL_ROOT_BOOT,
        )
    assert watched.calls == [], "the PDK stays closed and no KP generation is spent"
    _nothing_created(tmp_path / "vms")


def test_an_encryption_supported_vm_may_boot_a_direct_kernel(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    tenant = vm_fabric.tenant_vm("vm-es-direct", policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    boot = DirectKernel(vm_fabric.guest.kernel, vm_fabric.guest.initrd, "quiet")
    watched = Watched(vm_fabric)
    provision(
        tenant.request(boot=boot),
        tmp_path / "vms",
        reveal_secrets=watched.reveal_secrets,
        key_source=watched,
        direct_boot_dir=LOCAL_ROOT_BOOT,
    )
    assert watched.calls == ["reveal", "release"]
    vm_dir = tmp_path / "vms" / tenant.name
    spec = load_record(vm_dir).spec(vm_dir)
    assert spec.kernel == boot
    check_vm_policy(spec)


def test_a_shielded_vm_boots_its_disk_with_the_memory_grub_needs(provisioned: Path) -> None:
    spec = load_record(provisioned).spec(provisioned)
    assert spec.kernel is None
    assert spec.memory_mib == 384  # grub cannot allocate the kernel's buffer with 256 MiB
    check_vm_policy(spec)


def test_a_shielded_record_with_a_direct_kernel_is_refused_at_start_spending_nothing(
    vm_fabric: VmFabric, tmp_path: Path
) -> None:
    """A VM provisioned before the rule (or a vm.json edited by hand) does not start."""
    tenant = vm_fabric.tenant_vm("vm-old-record")
    vm_dir = _provision(vm_fabric, tenant, tmp_path / "vms")
    guest = vm_fabric.guest
    record = replace(load_record(vm_dir), boot=DirectKernel(guest.kernel, guest.initrd, "quiet"))
    write_record(vm_dir, record)
    before = VaultStore(vm_dir / "keys").numbers()
    made, factory = _fake()
    with pytest.raises(PolicyError, match="firmware-boot"):
        power_on(vm_dir, vm_fabric.key_source(), runtime_factory=factory)  # type: ignore[arg-type]
    assert made == []
    assert VaultStore(vm_dir / "keys").numbers() == before, "no KP released, nothing written"


# ------------------------------------------------------------- template swapped after its check


def test_a_template_swapped_after_verification_does_not_reach_the_vm(
    vm_fabric: VmFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Security review, issue 6: the check and the conversion must read the same bytes."""
    tenant = vm_fabric.tenant_vm("vm-swapped")
    verified = tenant.template.read_bytes()
    swapped = bytearray(verified)
    swapped[len(swapped) // 2] ^= 0x01
    checked: list[Path] = []
    converted: list[bytes] = []

    def verify_then_swap(path: Path, *args: Any, **kwargs: Any) -> Any:
        result = real_verify(path, *args, **kwargs)
        checked.append(Path(path))
        tenant.template.write_bytes(bytes(swapped))  # the attacker's move, right after the check
        return result

    def convert_spy(template: Path, dest: Path, key: Any) -> None:
        converted.append(Path(template).read_bytes())
        real_convert(template, dest, key)

    real_verify = provision_module.verify_disk
    real_convert = provision_module.create_encrypted_copy
    monkeypatch.setattr(provision_module, "verify_disk", verify_then_swap)
    monkeypatch.setattr(provision_module, "create_encrypted_copy", convert_spy)
    vm_dir = _provision(vm_fabric, tenant, tmp_path / "vms")
    assert tenant.template.read_bytes() == bytes(swapped)  # the swap happened
    assert checked
    assert checked[0] != tenant.template
    assert checked[0].parent.parent == tmp_path / "vms"
    assert converted == [verified]  # ... and exactly the verified bytes were converted
    assert sorted(p.name for p in vm_dir.iterdir()) == ["disks", "keys", "vm.json"]
    assert sorted(p.name for p in (tmp_path / "vms").iterdir()) == ["vm-swapped"]
    assert load_record(vm_dir).template == tenant.template.name


def test_the_template_copy_is_gone_after_a_refusal(
    vm_fabric: VmFabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = vm_fabric.tenant_vm("vm-copy-refused")
    seen: list[Path] = []

    def refuse_after_copy(path: Path, *_args: Any, **_kwargs: Any) -> Any:
        seen.append(Path(path))
        assert Path(path).stat().st_mode & 0o777 == 0o600
        assert Path(path).parent.stat().st_mode & 0o777 == 0o700
        raise VerificationError("refused for the test")

    monkeypatch.setattr(provision_module, "verify_disk", refuse_after_copy)
    with pytest.raises(VerificationError, match="refused for the test"):
        _provision(vm_fabric, tenant, tmp_path / "vms")
    assert seen
    assert not seen[0].exists()
    _nothing_created(tmp_path / "vms")


def test_a_template_named_through_a_symlink_is_refused(vm_fabric: VmFabric, tmp_path: Path) -> None:
    tenant = vm_fabric.tenant_vm("vm-template-link")
    link = tmp_path / "template-link.img"
    link.symlink_to(tenant.template)
    tenant.template = link
    with pytest.raises(UsageError, match="cannot open template disk"):
        _provision(vm_fabric, tenant, tmp_path / "vms")
    _nothing_created(tmp_path / "vms")
