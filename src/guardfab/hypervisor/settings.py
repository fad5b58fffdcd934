"""The VM settings a fabric administrator may change, and the loosening a shielded VM refuses.

In the reference a fabric administrator runs the VMs but may not open a way
into a shielded one; an encryption-supported VM keeps the same protections by
default, and its administrator may add a console. The one setting here is that
console (a serial port on a Unix socket, :mod:`guardfab.hypervisor.console`):

==========================  =====================  =====================
request                     shielded               encryption-supported
==========================  =====================  =====================
console on                  refused (loosening)    allowed while stopped
console off                 allowed (no change)    allowed while stopped
==========================  =====================  =====================

A refusal is :class:`LooseningRefusedError`, naming the VM and what was asked;
the caller (the host agent's management API) audits it. Nothing is written on
any refusal. A change is written to ``vm.json`` atomically and takes effect at
the next power-on: while the VM runs it is refused, since QEMU's devices are
fixed at its start and a recorded setting that the running VM does not have
would mislead whoever reads it (``vm show``, :func:`console.console_socket`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from guardfab.errors import NotAuthorizedError, UsageError
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.hypervisor.power import running_pid
from guardfab.hypervisor.provision import VmRecord, load_record, write_record


class LooseningRefusedError(NotAuthorizedError):
    """A request to open a way into a shielded VM (a console or serial port).

    Attributes:
        vm: the VM's name.
        requested: what was asked, e.g. ``console=on``.
    """

    hint = (
        "a shielded VM has no console, serial port or debugger, whoever asks;"
        " reach it through its own network services (its page, SSH or RDP)"
    )

    def __init__(self, vm: str, requested: str) -> None:
        super().__init__(f"VM {vm!r} is shielded: {requested} refused (it would loosen its policy)")
        self.vm = vm
        self.requested = requested


def change_settings(vm_dir: Path, *, console: bool) -> VmRecord:
    """Set the VM's console on or off; return the record as now stored.

    Raises:
        LooseningRefusedError: the VM is shielded and the console was asked on.
        UsageError: not a VM directory, or the VM is running (stop it first).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if console and record.policy is SecurityPolicy.SHIELDED:
        raise LooseningRefusedError(record.name, "console=on")
    if record.console == console:
        return record  # nothing to change: nothing written
    if running_pid(vm_dir) is not None:
        raise UsageError(
            f"VM {record.name!r} is running: its console can change only while it is stopped",
            hint="stop the VM (guardfab vm stop), change the setting, start it again",
        )
    changed = replace(record, console=console)
    write_record(vm_dir, changed)
    return changed


__all__ = ["LooseningRefusedError", "change_settings"]
