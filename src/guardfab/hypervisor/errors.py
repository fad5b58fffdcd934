"""Errors of the VM runtime, placed in guardfab's one error tree.

A process that does not start or answer (QEMU, swtpm, qemu-img) is a
:class:`~guardfab.errors.TransportError`: trying later, or on another host, may
work. A key that does not open a disk is invalid input: the same key fails
again. Messages name the VM, disk or command, never a key or a secret's bytes.
"""

from __future__ import annotations

from guardfab.errors import TransportError, VerificationError


class HypervisorError(TransportError):
    """QEMU, swtpm or qemu-img failed, exited or did not answer in time."""

    hint = "look at the VM's qemu.log and swtpm.log in its work directory"


class QmpCommandError(HypervisorError):
    """QEMU answered a QMP command with an error.

    Attributes:
        command: the QMP command's name (its arguments are never kept: they may hold secrets).
        error_class: QEMU's error class, e.g. ``GenericError``.
        description: QEMU's own description of the error.
    """

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QEMU refused {command}: {description} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.description = description


class DiskKeyError(VerificationError):
    """The key given for a LUKS disk does not open it (wrong key, or not this disk's)."""

    hint = "use the key this disk was created with (from the VM's key vault)"
