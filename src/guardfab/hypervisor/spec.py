"""What a VM is, as the VM runtime sees it: a typed, secret-free specification.

A :class:`VmSpec` says how much memory and how many vCPUs a VM has, how it
boots, which disks it opens and which host port reaches its web page, and which
security level governs it. It never holds a key: keys travel separately
(:class:`guardfab.hypervisor.vm.VmKeys`) and reach QEMU and swtpm only through
file descriptors and the QMP socket, so anything built from a spec -- above all
QEMU's command line -- is safe to show in ``ps`` and in logs.

The rules that a security level imposes live in :mod:`guardfab.hypervisor.policy`.
This module is pure: no processes, no files are touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from guardfab.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DEVICE_ID = re.compile(r"[a-z][a-z0-9-]{0,30}")
#: Bounds that keep a typo from asking QEMU for a terabyte.
MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 256
#: Guest RAM unless a VM asks for more. Debian's signed grub loads the kernel into
#: one buffer below 4 GiB: with 256 MiB it cannot allocate it, 384 MiB boots (ADR 0013).
DEFAULT_MEMORY_MIB = 384


class SecurityLevel(StrEnum):
    """The reference's three kinds of VM.

    * ``shielded``: secure boot firmware booting the VM's own disk (no kernel
      handed to QEMU), vTPM, encrypted disks, state and migration, and no
      console, serial port, debugger or guest agent -- none of it changeable by
      the fabric administrator.
    * ``encryption-supported``: the same defaults, but the fabric administrator
      may enable a console (a serial port).
    * ``normal``: plain QEMU.
    """

    SHIELDED = "shielded"
    ENCRYPTION_SUPPORTED = "encryption-supported"
    NORMAL = "normal"


class Firmware(StrEnum):
    """The firmware QEMU runs first."""

    #: SeaBIOS, QEMU's default: fast (a TCG boot in about 5 s), no secure boot.
    BIOS = "bios"
    #: OVMF built with secure boot, the Microsoft keys enrolled and SMM on.
    OVMF_SECURE_BOOT = "ovmf-secboot"


@dataclass(frozen=True)
class DirectKernel:
    """A kernel and initramfs that QEMU loads itself (``-kernel``/``-initrd``).

    OVMF does *not* check a kernel loaded this way against the secure boot keys
    (ADR 0008), so a shielded VM may not have one: it boots its own disk through
    the signed chain (shim -> grub -> kernel, ADR 0013). Encryption-supported and
    normal VMs, and tests of the layers below, may.
    """

    kernel: Path
    initrd: Path
    cmdline: str = ""


@dataclass(frozen=True)
class DiskSpec:
    """One virtio disk, attached over QMP before the guest runs.

    Attributes:
        device_id: the QEMU device id; the node name and PCIe root port derive from it.
        path: the qcow2 image.
        encrypted: whether the image is LUKS-encrypted (it then needs a key to open).
    """

    device_id: str
    path: Path
    encrypted: bool = True


@dataclass(frozen=True)
class DebugDevices:
    """Channels into a VM that bypass the tenant's own access control.

    Each is a way for whoever runs the host to read or drive the guest, which is
    why a shielded VM may have none of them (:mod:`guardfab.hypervisor.policy`).
    """

    #: A serial port on a Unix socket (the guest's console); nothing of it is logged.
    console: bool = False
    #: QEMU's gdb stub on a Unix socket: full read/write access to guest memory.
    gdbstub: bool = False
    #: A virtio-serial channel for qemu-guest-agent (runs commands in the guest).
    guest_agent: bool = False


@dataclass(frozen=True)
class VmSpec:
    """A VM's hardware and security settings (no secrets).

    Attributes:
        name: a short name used for QEMU's ``-name`` and log lines.
        level: the security level whose policy the runtime enforces.
        memory_mib: guest RAM in MiB.
        vcpus: number of virtual CPUs.
        firmware: SeaBIOS or OVMF with secure boot.
        kernel: a directly loaded kernel, or ``None`` to let the firmware boot the first
            disk (what a shielded VM must do).
        disks: the disks, in the order the guest sees them (vda, vdb, ...).
        host_port: the 127.0.0.1 port forwarded to the guest's port ``guest_port``.
        guest_port: the guest's TCP port that ``host_port`` reaches (its web page).
        vtpm: whether the VM gets a vTPM (a swtpm of its own).
        debug: console, debugger and guest-agent channels.
    """

    name: str
    level: SecurityLevel
    memory_mib: int = DEFAULT_MEMORY_MIB
    vcpus: int = 1
    firmware: Firmware = Firmware.OVMF_SECURE_BOOT
    kernel: DirectKernel | None = None
    disks: tuple[DiskSpec, ...] = ()
    host_port: int | None = None
    guest_port: int = 80
    vtpm: bool = True
    debug: DebugDevices = field(default_factory=DebugDevices)

    def __post_init__(self) -> None:
        problems = _shape_problems(self)
        if problems:
            raise UsageError(
                f"invalid VM specification {self.name!r}: " + "; ".join(problems),
                hint="fix the listed fields",
            )


def _shape_problems(spec: VmSpec) -> list[str]:
    """Every field that is out of range, so one error can name them all."""
    problems = []
    if not _NAME.fullmatch(spec.name):
        problems.append("name must be 1-63 letters, digits, '.', '_' or '-'")
    if not 16 <= spec.memory_mib <= MAX_MEMORY_MIB:
        problems.append(f"memory_mib must be 16..{MAX_MEMORY_MIB}")
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        problems.append(f"vcpus must be 1..{MAX_VCPUS}")
    for port, what in ((spec.host_port, "host_port"), (spec.guest_port, "guest_port")):
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"{what} must be 1..65535")
    ids = [disk.device_id for disk in spec.disks]
    if len(set(ids)) != len(ids):
        problems.append("disk device ids must be distinct")
    problems.extend(
        f"disk id {device_id!r} must be lowercase letters, digits and '-'"
        for device_id in ids
        if not _DEVICE_ID.fullmatch(device_id)
    )
    if spec.kernel is not None and any(c in spec.kernel.cmdline for c in "\n\0"):
        problems.append("kernel command line must be one line")
    return problems
