"""QEMU's command line and the VM security policy: pure, so every attack is a table row."""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

import pytest

from guardfab.errors import PolicyError, UsageError
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.argv import VmPaths, qemu_argv
from guardfab.hypervisor.disk import DiskKey
from guardfab.hypervisor.policy import RULES, check_vm_policy, policy_violations
from guardfab.hypervisor.spec import (
    DebugDevices,
    DirectKernel,
    DiskSpec,
    Firmware,
    SecurityLevel,
    VmSpec,
)
from guardfab.hypervisor.vm import QemuVm, VmKeys

TCG = Accelerator("tcg", None, "test")
PATHS = VmPaths(work_dir=Path("/var/lib/guardfab/vms/web"), run_dir=Path("/run/gf/web"))


KERNEL = DirectKernel(Path("/boot/vmlinuz"), Path("/boot/initrd"), "quiet")


def _spec(level: SecurityLevel = SecurityLevel.SHIELDED, **changes: object) -> VmSpec:
    spec = VmSpec(
        name="web",
        level=level,
        disks=(DiskSpec("os", Path("/d/os.qcow2")), DiskSpec("spec", Path("/d/spec.qcow2"))),
        host_port=8080,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_shielded_argv_has_no_console_serial_debugger_agent_or_extra_monitor() -> None:
    argv = qemu_argv(_spec(), TCG, PATHS)
    assert _options(argv, "-serial") == ["none"]
    assert not {"-gdb", "-s", "-monitor", "-qmp", "-qmp-pretty", "-daemonize"} & set(argv)
    assert _options(argv, "-mon") == ["chardev=qmp,mode=control"]
    chardevs = [option.split(",")[0:2] for option in _options(argv, "-chardev")]
    assert chardevs == [["socket", "id=qmp"], ["socket", "id=chrtpm"]]
    assert not any("guest_agent" in arg or "virtserialport" in arg for arg in argv)
    assert "-S" in argv
    assert "-nodefaults" in argv
    assert _options(argv, "-display") == ["none"]


def test_shielded_argv_has_secure_boot_firmware_and_a_vtpm() -> None:
    argv = qemu_argv(_spec(), TCG, PATHS)
    assert _options(argv, "-machine") == ["q35,accel=tcg,smm=on"]
    assert "driver=cfi.pflash01,property=secure,value=on" in _options(argv, "-global")
    drives = _options(argv, "-drive")
    assert any("OVMF_CODE_4M.secboot.fd" in d and "readonly=on" in d for d in drives)
    assert any(str(PATHS.ovmf_vars) in d for d in drives)
    assert "tpm-crb,tpmdev=tpm0" in _options(argv, "-device")
    # The firmware boots the OS disk: nothing for QEMU to load past the signature checks.
    assert not {"-kernel", "-initrd", "-append"} & set(argv)
    assert _options(argv, "-m") == ["384"], "grub needs more than 256 MiB to load the kernel"


@pytest.mark.parametrize("level", ["encryption-supported", "normal"])
def test_below_shielded_a_direct_kernel_is_still_allowed(level: str) -> None:
    argv = qemu_argv(_spec(SecurityLevel(level), kernel=KERNEL), TCG, PATHS)
    assert _options(argv, "-kernel") == ["/boot/vmlinuz"]
    assert _options(argv, "-append") == ["quiet"]


def test_disks_are_never_on_the_command_line_only_their_root_ports() -> None:
    argv = qemu_argv(_spec(), TCG, PATHS)
    assert not any("qcow2" in arg for arg in argv)
    ports = [d for d in _options(argv, "-device") if d.startswith("pcie-root-port")]
    assert len(ports) == 2


def test_port_forward_is_on_loopback_only() -> None:
    argv = qemu_argv(_spec(), TCG, PATHS)
    (netdev,) = _options(argv, "-netdev")
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80"


def test_a_migration_destination_waits_and_takes_the_port_later() -> None:
    argv = qemu_argv(_spec(), TCG, PATHS, incoming=True)
    assert _options(argv, "-incoming") == ["defer"]
    assert _options(argv, "-netdev") == ["user,id=net0"]


def test_no_secret_reaches_the_command_line(tmp_path: Path) -> None:
    keys = VmKeys(
        disks={"os": DiskKey.generate(), "spec": DiskKey.generate()},
        vtpm_state=secrets.token_bytes(32),
        vtpm_migration=secrets.token_bytes(32),
    )
    vm = QemuVm(_spec(), tmp_path, accel=TCG)
    joined = "\0".join(vm.argv()).encode()
    for key in keys.disks.values():
        assert key.passphrase() not in joined
        assert key.material not in joined
    for key in (keys.vtpm_state, keys.vtpm_migration):
        assert key is not None
        assert key not in joined
        assert key.hex().encode() not in joined
    assert "redacted" in repr(keys)
    assert keys.vtpm_state.hex() not in repr(keys)


def test_encryption_supported_may_have_a_console() -> None:
    spec = _spec(SecurityLevel.ENCRYPTION_SUPPORTED, debug=DebugDevices(console=True))
    argv = qemu_argv(spec, TCG, PATHS)
    assert _options(argv, "-serial") == ["chardev:console0"]
    [console] = [c for c in _options(argv, "-chardev") if c.startswith("socket,id=console0,")]
    assert f"path={PATHS.console_socket}," in console
    assert "logfile" not in console, "the guest's console output is never written on the host"


def test_a_normal_vm_may_have_every_debug_channel() -> None:
    debug = DebugDevices(console=True, gdbstub=True, guest_agent=True)
    spec = _spec(SecurityLevel.NORMAL, firmware=Firmware.BIOS, vtpm=False, debug=debug)
    argv = qemu_argv(spec, TCG, PATHS)
    assert _options(argv, "-gdb") == [f"unix:{PATHS.gdb_socket},server=on,wait=off"]
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in _options(argv, "-device")
    assert _options(argv, "-machine") == ["q35,accel=tcg"]
    assert "-tpmdev" not in argv


# Every way a fabric administrator might try to loosen a protected VM, and the rule that stops it.
LOOSENINGS = [
    ("shielded", {"debug": DebugDevices(console=True)}, "no-console"),
    ("shielded", {"debug": DebugDevices(gdbstub=True)}, "no-debugger"),
    ("shielded", {"debug": DebugDevices(guest_agent=True)}, "no-guest-agent"),
    ("shielded", {"firmware": Firmware.BIOS}, "secure-boot"),
    ("shielded", {"kernel": KERNEL}, "firmware-boot"),
    ("shielded", {"vtpm": False}, "vtpm"),
    ("shielded", {"disks": (DiskSpec("os", Path("/d/os.qcow2"), encrypted=False),)}, "encrypted"),
    ("encryption-supported", {"debug": DebugDevices(gdbstub=True)}, "no-debugger"),
    ("encryption-supported", {"debug": DebugDevices(guest_agent=True)}, "no-guest-agent"),
    ("encryption-supported", {"firmware": Firmware.BIOS}, "secure-boot"),
    ("encryption-supported", {"vtpm": False}, "vtpm"),
]


@pytest.mark.parametrize(("level", "changes", "rule"), LOOSENINGS)
def test_loosening_a_protected_vm_is_refused(
    level: str, changes: dict[str, object], rule: str
) -> None:
    spec = _spec(SecurityLevel(level), **changes)
    with pytest.raises(PolicyError, match=rule):
        qemu_argv(spec, TCG, PATHS)


def test_every_broken_rule_is_reported_at_once() -> None:
    debug = DebugDevices(console=True, gdbstub=True, guest_agent=True)
    spec = _spec(firmware=Firmware.BIOS, vtpm=False, debug=debug, kernel=KERNEL)
    problems = policy_violations(spec)
    assert len(problems) == len(RULES) - 1  # every rule but encrypted-disks
    with pytest.raises(PolicyError) as caught:
        check_vm_policy(spec)
    assert all(problem in str(caught.value) for problem in problems)
    assert "cannot be loosened" in caught.value.diagnostics()


def test_options_escape_commas_in_paths() -> None:
    paths = VmPaths(work_dir=Path("/srv/a,b"), run_dir=Path("/run/x,y"))
    argv = qemu_argv(_spec(), TCG, paths)
    assert any("path=/run/x,,y/qmp.sock," in arg for arg in argv)
    assert any("file=/srv/a,,b/OVMF_VARS.fd" in arg for arg in argv)


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "bad name"},
        {"name": ""},
        {"memory_mib": 1},
        {"vcpus": 0},
        {"host_port": 70000},
        {"disks": (DiskSpec("os", Path("/a")), DiskSpec("os", Path("/b")))},
        {"disks": (DiskSpec("OS,x", Path("/a")),)},
    ],
)
def test_malformed_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="invalid VM specification"):
        _spec(**changes)


def test_a_kvm_host_gets_its_cpu_model() -> None:
    argv = qemu_argv(_spec(), Accelerator("kvm", "host", "test"), PATHS)
    assert _options(argv, "-machine") == ["q35,accel=kvm,smm=on"]
    assert _options(argv, "-cpu") == ["host"]
