"""The VM operations the management API runs in the agent, on this host's VM directory.

Each one calls the hypervisor layer with the agent itself as the key source,
so a VM's keys are released into this process and go from here to QEMU and
swtpm only (by pipe and QMP), never to the client. One operation at a time per
VM (a lock per name): two requests on one VM would race on its key vault.

The agent keeps the vault contents of each VM it started (or restored, or
received) in memory while the VM runs: a live migration's source derives the
stream's key from them (:mod:`.migrations` holds both halves of a migration).

Loosening a shielded VM (a console, a serial port) is refused by the hypervisor
layer (:mod:`guardfab.hypervisor.settings`, :mod:`guardfab.hypervisor.console`)
before anything changes, with a :class:`LooseningRefusedError` that the API's
audit records as such; QEMU's command line for a shielded VM has no serial port
whatever its record says.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guardfab.errors import UsageError
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.host.manage.migrations import VmMigrations, let_go
from guardfab.hypervisor.bootpaths import check_direct_boot
from guardfab.hypervisor.checkpoint import checkpoint_vm, restore_started
from guardfab.hypervisor.console import console_socket
from guardfab.hypervisor.incoming import incoming_state
from guardfab.hypervisor.keyprotector import restore_last_known_good
from guardfab.hypervisor.migrate import attach
from guardfab.hypervisor.power import power_off, running_pid, start_vm
from guardfab.hypervisor.provision import (
    KeySource,
    ProvisionRequest,
    VmRecord,
    load_record,
    provision,
)
from guardfab.hypervisor.settings import LooseningRefusedError, change_settings
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultContents
from guardfab.hypervisor.vm import QemuVm, VmRuntime

#: A VM name: what provisioning accepts, and all a path parameter may be.
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_NAME = re.compile(NAME_PATTERN)

#: Opens a PDK's secrets for this host (the agent's ``open_shielding_data``).
OpenShieldingData = Callable[[bytes], ShieldingSecrets]


def summary(record: VmRecord, vm_dir: Path) -> dict[str, Any]:
    """The public facts of a VM (no secret, no key material)."""
    return {
        "name": record.name,
        "policy": record.policy.value,
        "pdk_id": record.pdk_id,
        "template": record.template,
        "host_port": record.host_port,
        "console": record.console,
        "running": running_pid(vm_dir) is not None,
        "incoming": incoming_state(vm_dir),
    }


def _qemu(spec: VmSpec, state_dir: Path) -> VmRuntime:
    return QemuVm(spec, state_dir)


class VmOperations:
    """This host's VMs under ``vms_dir``, with ``keys`` (the agent) as the key source.

    Args:
        vms_dir: one directory per VM.
        keys: releases a VM's keys for this host (the agent).
        open_pdk: has the KPS open a PDK's secrets for this host (the agent's
            ``open_shielding_data``).
        direct_boot_dir: the host configuration's ``direct_boot_dir``: the one
            directory a direct kernel/initrd may come from (``None``: direct boot refused).
    """

    def __init__(
        self,
        vms_dir: Path,
        keys: KeySource,
        open_pdk: OpenShieldingData,
        *,
        stream_address: str = "127.0.0.1",
        direct_boot_dir: Path | None = None,
    ) -> None:
        self.vms_dir = Path(vms_dir)
        #: Where a direct kernel/initrd may come from (host configuration); ``None``: nowhere.
        self.direct_boot_dir = direct_boot_dir
        self.keys = keys
        self._open_pdk = open_pdk
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: The vault contents of each VM this agent runs (memory only).
        self.held: dict[str, VaultContents] = {}
        self.migrations = VmMigrations(self, stream_address)

    @contextmanager
    def vm(self, name: str) -> Iterator[Path]:
        """The VM's directory, held for one operation at a time."""
        if not _NAME.fullmatch(name):
            raise UsageError("a VM name is 1-63 lower-case letters, digits and '-'")
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield self.vms_dir / name

    def record(self, vm_dir: Path) -> VmRecord:
        if not (vm_dir / "vm.json").is_file():
            raise UsageError(f"no VM {vm_dir.name!r} on this host")
        return load_record(vm_dir)

    # ------------------------------------------------------------------ reads

    def list(self) -> list[dict[str, Any]]:
        """Every VM on this host, by name."""
        if not self.vms_dir.is_dir():
            return []
        names = sorted(p.parent.name for p in self.vms_dir.glob("*/vm.json"))
        return [summary(load_record(self.vms_dir / n), self.vms_dir / n) for n in names]

    def show(self, name: str) -> dict[str, Any]:
        """One VM's public facts."""
        if not _NAME.fullmatch(name):
            raise UsageError("a VM name is 1-63 lower-case letters, digits and '-'")
        vm_dir = self.vms_dir / name
        return summary(self.record(vm_dir), vm_dir)

    # ------------------------------------------------------------------ lifecycle

    def provision(self, request: ProvisionRequest) -> dict[str, Any]:
        """Provision a VM; the PDK is opened for this host by the KPS (through the agent)."""
        opener = self._open_pdk
        with self.vm(request.name) as vm_dir:
            record = provision(
                request,
                self.vms_dir,
                reveal_secrets=lambda _header: opener(request.pdk),
                key_source=self.keys,
                direct_boot_dir=self.direct_boot_dir,
            )
            return summary(record, vm_dir)

    def start(self, name: str) -> dict[str, Any]:
        """Power the VM on with keys the KPS releases to this host."""
        with self.vm(name) as vm_dir:
            self._check_boot(vm_dir)
            started = start_vm(vm_dir, self.keys)
            self.held[name] = started.contents
            let_go(started.runtime)
            return {"name": name, "pid": getattr(started.runtime, "pid", None)}

    def _check_boot(self, vm_dir: Path) -> None:
        """Refuse, before any release, a direct kernel outside ``direct_boot_dir``.

        Provisioning checks it (ADR 0017), but a record written before that check, or
        since the directory was narrowed, must not make QEMU (root) read any host file.
        """
        check_direct_boot(self.record(vm_dir).boot, self.direct_boot_dir)

    def stop(self, name: str) -> dict[str, Any]:
        """Power the VM off."""
        with self.vm(name) as vm_dir:
            self.record(vm_dir)
            self.held.pop(name, None)
            return {"name": name, "was_running": power_off(vm_dir)}

    def checkpoint(self, name: str) -> dict[str, Any]:
        """Save the running VM's state, encrypted, beside it, and stop it."""
        with self.vm(name) as vm_dir:
            self.record(vm_dir)
            source = attach(vm_dir)
            try:
                path = checkpoint_vm(source, vm_dir, self.keys)
            finally:
                let_go(source)
            self.held.pop(name, None)
            return {"name": name, "checkpoint": str(path), "bytes": path.stat().st_size}

    def restore(self, name: str) -> dict[str, Any]:
        """Start the VM from its checkpoint."""
        with self.vm(name) as vm_dir:
            self._check_boot(vm_dir)
            started = restore_started(vm_dir, self.keys, _qemu)
            self.held[name] = started.contents
            let_go(started.runtime)
            return {"name": name, "pid": getattr(started.runtime, "pid", None)}

    # ------------------------------------------------------------------ policy-bound

    def change_settings(self, name: str, *, console: bool) -> dict[str, Any]:
        """Turn the VM's console (serial port) on or off, where its policy allows."""
        with self.vm(name) as vm_dir:
            self.record(vm_dir)
            changed = change_settings(vm_dir, console=console)
            return summary(changed, vm_dir)

    def console(self, name: str) -> dict[str, Any]:
        """The running VM's console socket, where its policy allows one."""
        with self.vm(name) as vm_dir:
            record = self.record(vm_dir)
            if record.policy is SecurityPolicy.SHIELDED:  # named as a loosening, for the audit
                raise LooseningRefusedError(record.name, "attaching a console")
            return {"name": name, "socket": str(console_socket(vm_dir))}

    def restore_last_known_good(self, name: str) -> dict[str, Any]:
        """Go back to the VM's last known good key protector (after a failed re-key)."""
        with self.vm(name) as vm_dir:
            self.record(vm_dir)
            return {"name": name, **_public_fields(restore_last_known_good(vm_dir))}


def _public_fields(value: object) -> dict[str, Any]:
    """The plain fields of a result dataclass (numbers, text, flags, paths; never bytes)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return {}
    out: dict[str, Any] = {}
    for item in dataclasses.fields(value):
        field_value = getattr(value, item.name)
        if isinstance(field_value, bool | int | float | str) or field_value is None:
            out[item.name] = field_value
        elif isinstance(field_value, Path):
            out[item.name] = str(field_value)
    return out
