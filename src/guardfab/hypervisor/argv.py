"""QEMU's command line for a VM spec: a pure function, so policy is testable.

:func:`qemu_argv` turns a :class:`~guardfab.hypervisor.spec.VmSpec` into the
exact argv the runtime starts. It enforces the VM's security policy first, and
it builds only from the spec and a few paths, which hold no secrets, so no key
can reach the command line (``ps`` shows it to every local user). Disks are
not on the command line at all: QEMU starts paused (``-S``) with an empty PCIe
root port per disk, and the runtime opens each disk over QMP with its key
(:mod:`guardfab.hypervisor.disk`) before the guest runs.

The only monitor is the QMP control socket the runtime itself holds. Serial
ports, the gdb stub and the guest-agent channel appear only when the spec asks
for them and its policy allows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.spec import Firmware, VmSpec

QEMU_BINARY = "qemu-system-x86_64"
#: Debian's OVMF built with secure boot and SMM (package ovmf).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
#: Variables template with Microsoft's keys enrolled: secure boot is on from the first boot.
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
#: QEMU's seccomp filter: no new privileges, no fork/exec, no obsolete syscalls.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The guest NIC's MAC address (the same for every VM: each has its own user network).
GUEST_MAC = "52:54:00:12:34:56"


@dataclass(frozen=True)
class VmPaths:
    """Where one VM's QEMU keeps its sockets and files.

    Attributes:
        work_dir: persistent files: OVMF variables, logs.
        run_dir: Unix sockets (a short path: socket names are limited to 107 bytes).
    """

    work_dir: Path
    run_dir: Path

    @property
    def qmp_socket(self) -> Path:
        """The QMP control socket (the VM's only monitor)."""
        return self.run_dir / "qmp.sock"

    @property
    def tpm_socket(self) -> Path:
        """swtpm's control socket that QEMU's tpm-emulator connects to."""
        return self.run_dir / "tpm.sock"

    @property
    def console_socket(self) -> Path:
        """The serial console's socket (only where policy allows a console)."""
        return self.run_dir / "console.sock"

    @property
    def gdb_socket(self) -> Path:
        """The gdb stub's socket (normal VMs only)."""
        return self.run_dir / "gdb.sock"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's channel (normal VMs only)."""
        return self.run_dir / "qga.sock"

    @property
    def ovmf_vars(self) -> Path:
        """This VM's own copy of the OVMF variable store (its NVRAM)."""
        return self.work_dir / "OVMF_VARS.fd"


def _opt(value: object) -> str:
    """Escape a value inside a QEMU option list (a comma is written as two)."""
    return str(value).replace(",", ",,")


def root_port_id(device_id: str) -> str:
    """The PCIe root port a disk is plugged into (q35 cannot hot-plug on pcie.0)."""
    return f"rp-{device_id}"


def _machine(spec: VmSpec, accel: Accelerator) -> list[str]:
    machine = f"q35,accel={accel.name}"
    if spec.firmware is Firmware.OVMF_SECURE_BOOT:
        machine += ",smm=on"
    argv = ["-machine", machine]
    if accel.cpu:
        argv += ["-cpu", accel.cpu]
    return argv


def _firmware(spec: VmSpec, paths: VmPaths) -> list[str]:
    argv: list[str] = []
    if spec.firmware is Firmware.OVMF_SECURE_BOOT:
        argv += [
            "-global",
            "driver=cfi.pflash01,property=secure,value=on",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(OVMF_CODE)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_opt(paths.ovmf_vars)}",
        ]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel.kernel), "-initrd", str(spec.kernel.initrd)]
        if spec.kernel.cmdline:
            argv += ["-append", spec.kernel.cmdline]
    return argv


def _root_ports(spec: VmSpec) -> list[str]:
    argv: list[str] = []
    for slot, disk in enumerate(spec.disks, start=1):
        port = f"pcie-root-port,id={root_port_id(disk.device_id)},bus=pcie.0,chassis={slot}"
        argv += ["-device", f"{port},slot={slot}"]
    return argv


def _tpm(spec: VmSpec, paths: VmPaths) -> list[str]:
    if not spec.vtpm:
        return []
    return [
        "-chardev",
        f"socket,id=chrtpm,path={_opt(paths.tpm_socket)}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-crb,tpmdev=tpm0",
    ]


def host_forward_rule(spec: VmSpec) -> str | None:
    """The user network's port forward: the host's loopback only, never other interfaces."""
    if spec.host_port is None:
        return None
    return f"tcp:127.0.0.1:{spec.host_port}-:{spec.guest_port}"


def _network(spec: VmSpec, *, incoming: bool) -> list[str]:
    netdev = "user,id=net0"
    rule = host_forward_rule(spec)
    # A migration destination takes over the port only once the source has let it
    # go (QemuVm.forward_host_port): on one host both cannot hold it at once.
    if rule is not None and not incoming:
        netdev += f",hostfwd={rule}"
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC}"]


def _debug(spec: VmSpec, paths: VmPaths) -> list[str]:
    argv: list[str] = []
    if spec.debug.console:
        # No logfile: what the guest writes on its console reaches whoever is
        # attached and nothing else, never the host's disk in clear.
        chardev = f"socket,id=console0,path={_opt(paths.console_socket)},server=on,wait=off"
        argv += ["-chardev", chardev, "-serial", "chardev:console0"]
    else:
        argv += ["-serial", "none"]
    if spec.debug.gdbstub:
        argv += ["-gdb", f"unix:{_opt(paths.gdb_socket)},server=on,wait=off"]
    if spec.debug.guest_agent:
        argv += [
            "-chardev",
            f"socket,id=qga0,path={_opt(paths.agent_socket)},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
    return argv


def qemu_argv(
    spec: VmSpec, accel: Accelerator, paths: VmPaths, *, incoming: bool = False
) -> list[str]:
    """The full QEMU command line for ``spec``, after enforcing its policy.

    Args:
        spec: the VM.
        accel: KVM or TCG (:func:`guardfab.hypervisor.accel.choose_accelerator`).
        paths: where the sockets and files go.
        incoming: start as a live-migration destination (``-incoming defer``).

    Raises:
        PolicyError: the spec breaks its security level's policy.
    """
    check_vm_policy(spec)
    argv = [QEMU_BINARY, "-name", f"guest={_opt(spec.name)},debug-threads=on"]
    argv += _machine(spec, accel)
    argv += ["-m", str(spec.memory_mib), "-smp", str(spec.vcpus)]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-parallel", "none", "-S"]
    argv += ["-sandbox", SANDBOX, "-msg", "timestamp=on"]
    argv += [
        "-chardev",
        f"socket,id=qmp,path={_opt(paths.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    argv += _firmware(spec, paths) + _root_ports(spec) + _tpm(spec, paths)
    argv += _network(spec, incoming=incoming) + _debug(spec, paths)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
