"""Choose KVM or TCG by trying, not by looking for ``/dev/kvm``.

Some hosts have a ``/dev/kvm`` that opens but cannot run an ordinary guest: on
a PVM host (KVM nested in a VM with pagetable-based virtualization) ``-cpu
host`` aborts QEMU and other CPU models hang once the Linux boot code leaves
real mode. So the runtime asks KVM to do what a guest kernel does first: a
512-byte boot sector (:data:`PROBE_BOOT_SECTOR`) switches from real mode
straight to 64-bit long mode with paging and then writes to QEMU's
``isa-debug-exit`` port, which makes QEMU exit with status
:data:`PROBE_EXIT_STATUS`. A working KVM runs it in well under a second (QEMU's
own start-up dominates); on a host where it fails, aborts or takes longer than
:data:`PROBE_TIMEOUT` -- the PVM host measured here needs 4.8 s, slower than TCG
boots a whole Linux -- the runtime uses TCG (``-machine q35,accel=tcg``), which
always works, only slower. Never skip: a VM always runs, on one or the other.

The answer is cached for the life of the process. ``GUARDFAB_ACCEL=kvm|tcg``
forces a choice (a host known to be good, or a test run that wants TCG).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from guardfab.errors import UsageError

#: The probe, assembled from this source (GNU as, linked at 0x7c00, raw binary):
#:
#: .. code-block:: asm
#:
#:        .code16
#:        cli; xor %ax,%ax; mov %ax,%ds; mov %ax,%es; mov %ax,%ss; mov $0x7c00,%sp
#:        mov $0x1000,%di; mov $0x1800,%cx; rep stosw        # zero 0x1000-0x3fff
#:        movw $0x2003,0x1000; movw $0x3003,0x2000           # PML4 -> PDPT -> PD
#:        movw $0x0083,0x3000                                # PD[0]: 2 MiB page at 0
#:        lgdtl gdtr
#:        mov %cr4,%eax; or $0x20,%eax; mov %eax,%cr4        # PAE
#:        mov $0x1000,%eax; mov %eax,%cr3
#:        mov $0xc0000080,%ecx; rdmsr; or $0x100,%eax; wrmsr # EFER.LME
#:        mov %cr0,%eax; or $0x80000001,%eax; mov %eax,%cr0  # PG + PE at once
#:        ljmp $0x08,$long_mode
#:        .code64
#:    long_mode:
#:        mov $0x31,%al; out %al,$0xf4                       # isa-debug-exit
#:    1:  hlt; jmp 1b
#:        .p2align 3
#:    gdt: .quad 0, 0x00af9a000000ffff, 0x00cf92000000ffff
#:    gdtr: .word gdtr - gdt - 1; .long gdt
#:        .org 510; .byte 0x55, 0xaa
PROBE_BOOT_SECTOR = (
    bytes.fromhex(
        "fa31c08ed88ec08ed0bc007cbf0010b90018f3abc70600100320c70600200330"
        "c70600308300660f0116807c0f20e06683c8200f22e066b8001000000f22d866"
        "b9800000c00f32660d000100000f300f20c0660d010000800f22c0ea607c0800"
        "b031e6f4f4ebfd90"
        "0000000000000000ffff0000009aaf00ffff00000092cf001700687c0000"
    ).ljust(510, b"\0")
    + b"\x55\xaa"
)
#: QEMU's exit status when the probe writes 0x31 to isa-debug-exit: (0x31 << 1) | 1.
PROBE_EXIT_STATUS = 99
#: Seconds the KVM probe may take before KVM counts as unusable.
PROBE_TIMEOUT = 2.0
#: SeaBIOS boots only from a disk of a sensible size, not from a bare 512-byte file.
_PROBE_DISK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Accelerator:
    """The accelerator QEMU uses, and why it was chosen.

    Attributes:
        name: ``"kvm"`` or ``"tcg"``, as QEMU's ``accel=`` option spells it.
        cpu: the ``-cpu`` model, or ``None`` for QEMU's default.
        reason: one line for people: what the probe found.
    """

    name: str
    cpu: str | None
    reason: str


TCG_CPU: str | None = None  # QEMU's default qemu64 model: what every test here boots with.
KVM_CPU = "host"


def _probe_argv(disk: Path, cpu: str | None) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-m", "16"]
    if cpu:
        argv += ["-cpu", cpu]
    return [
        *argv,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-drive",
        f"file={disk},format=raw,if=ide",
    ]


def probe_kvm(cpu: str | None = None, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Boot the probe under KVM; return ``None`` if KVM works, else why not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="guardfab-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(PROBE_BOOT_SECTOR.ljust(_PROBE_DISK_SIZE, b"\0"))
        started = time.monotonic()
        try:
            result = subprocess.run(  # noqa: S603 -- fixed argv, no shell
                _probe_argv(disk, cpu),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"a long-mode boot probe did not finish within {timeout:.1f} s under KVM"
        except OSError as exc:
            return f"cannot run qemu-system-x86_64: {exc.strerror}"
    if result.returncode != PROBE_EXIT_STATUS:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else "no message"
        return f"the KVM boot probe failed (exit {result.returncode}: {detail})"
    elapsed = time.monotonic() - started
    return None if elapsed <= timeout else f"the KVM probe took {elapsed:.1f} s"


@functools.cache
def _detect() -> Accelerator:
    for cpu in (KVM_CPU, None):
        problem = probe_kvm(cpu)
        if problem is None:
            return Accelerator("kvm", cpu, f"KVM runs a long-mode probe (cpu {cpu or 'default'})")
    return Accelerator("tcg", TCG_CPU, f"TCG, because {problem}")


def choose_accelerator() -> Accelerator:
    """The accelerator for this process's VMs: forced by ``GUARDFAB_ACCEL``, else probed once.

    Raises:
        UsageError: ``GUARDFAB_ACCEL`` holds something other than auto, kvm or tcg.
    """
    forced = os.environ.get("GUARDFAB_ACCEL", "auto").strip().lower()
    if forced == "tcg":
        return Accelerator("tcg", TCG_CPU, "TCG, forced by GUARDFAB_ACCEL")
    if forced == "kvm":
        return Accelerator("kvm", KVM_CPU, "KVM, forced by GUARDFAB_ACCEL")
    if forced != "auto":
        raise UsageError(
            f"GUARDFAB_ACCEL={forced!r} is not understood", hint="use auto, kvm or tcg"
        )
    return _detect()
