"""Run one VM: a swtpm and a QEMU process, disks opened over QMP, then the guest.

:class:`QemuVm` is the I/O edge of the VM runtime. A launch goes:

1. enforce the spec's security policy and build QEMU's argv
   (:func:`guardfab.hypervisor.argv.qemu_argv` -- no secrets in it);
2. start a fresh swtpm on the VM's encrypted vTPM state, its keys by pipe;
3. start QEMU paused (``-S``) in its own process group, connect to QMP;
4. open each disk over QMP with its key and plug it into its PCIe root port;
5. ``cont`` -- or, for a live-migration destination, wait for the stream.

Every process it starts is stopped by :meth:`QemuVm.stop` (also on a failed
start), so a caller needs only ``with QemuVm(...) as vm`` or a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from guardfab.hypervisor.accel import Accelerator, choose_accelerator
from guardfab.hypervisor.argv import OVMF_VARS_TEMPLATE, VmPaths, host_forward_rule, qemu_argv
from guardfab.hypervisor.disk import DiskKey, attach_disk, remove_disk_secret
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.procs import spawn, stop_group
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.spec import Firmware, VmSpec
from guardfab.hypervisor.vtpm import Swtpm

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True, repr=False)
class VmKeys:
    """The secrets one launch needs. Never printed: its ``repr`` is redacted.

    Attributes:
        disks: each encrypted disk's key, by device id.
        vtpm_state: the 32-byte key of the vTPM's state.
        vtpm_migration: the 32-byte key of the vTPM's part of a migration stream
            (the same on source and destination), or ``None`` if the VM never migrates.
    """

    disks: Mapping[str, DiskKey] = field(default_factory=dict)
    vtpm_state: bytes = b""
    vtpm_migration: bytes | None = None

    def __repr__(self) -> str:
        return "VmKeys(<redacted>)"


@runtime_checkable
class VmRuntime(Protocol):
    """What the fabric needs of one VM on a host; :class:`QemuVm` is the real one.

    The host agent's VM management is written against this interface, so its
    tests can swap in a simulator where no guest needs to boot.
    """

    spec: VmSpec

    @property
    def running(self) -> bool:
        """Whether the VM's processes are alive."""
        ...

    def start(self, keys: VmKeys, *, incoming: bool = False) -> None:
        """Start the VM (or wait for a live migration stream)."""
        ...

    def stop(self) -> None:
        """Stop the VM and everything started for it."""
        ...

    def pause(self) -> None:
        """Stop the vCPUs."""
        ...

    def resume(self) -> None:
        """Run the vCPUs again."""
        ...

    def status(self) -> str:
        """The run state as QEMU names it."""
        ...


def _prepare_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


class QemuVm:
    """One VM's processes on this host.

    Args:
        spec: the VM (checked against its policy at start).
        work_dir: the VM's files here: vTPM state, OVMF variables, logs.
        accel: KVM or TCG; probed once per process if not given.
        run_dir: where the sockets go; a fresh short temporary directory if not given.
        die_with_parent: kill QEMU and swtpm if the thread that started them dies
            (for tests; a host agent's VMs outlive the agent).
    """

    def __init__(
        self,
        spec: VmSpec,
        work_dir: Path,
        *,
        accel: Accelerator | None = None,
        run_dir: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.spec = spec
        self.die_with_parent = die_with_parent
        self.work_dir = work_dir
        self.accel = accel if accel is not None else choose_accelerator()
        self._run_dir = run_dir
        self._own_run_dir = False
        self._qemu: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._swtpm: Swtpm | None = None
        #: Seconds spent in each step of the last start (for reports and benchmarks).
        self.timings: dict[str, float] = {}

    @property
    def paths(self) -> VmPaths:
        """Socket and file locations (the run dir exists only while the VM runs)."""
        run_dir = self._run_dir if self._run_dir is not None else self.work_dir / "run"
        return VmPaths(work_dir=self.work_dir, run_dir=run_dir)

    @property
    def qmp(self) -> QmpClient:
        """The QMP session of the running QEMU."""
        if self._qmp is None:
            raise HypervisorError(f"VM {self.spec.name} is not running")
        return self._qmp

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        return self._qemu.pid if self._qemu is not None else None

    @property
    def swtpm_pid(self) -> int | None:
        """swtpm's process id while it runs."""
        return self._swtpm.pid if self._swtpm is not None else None

    def argv(self, *, incoming: bool = False) -> list[str]:
        """QEMU's command line for this VM (policy enforced; no secrets)."""
        return qemu_argv(self.spec, self.accel, self.paths, incoming=incoming)

    def start(self, keys: VmKeys, *, incoming: bool = False) -> None:
        """Start the VM; with ``incoming``, wait paused for a live migration stream.

        Raises:
            PolicyError: the spec breaks its security policy (nothing was started).
            DiskKeyError: a disk key is wrong (everything started is stopped again).
            HypervisorError: swtpm or QEMU failed.
        """
        if self._qemu is not None:
            raise HypervisorError(f"VM {self.spec.name} is already running")
        check_vm_policy(self.spec)  # before anything exists on the host
        began = time.monotonic()
        try:
            self._make_dirs()
            self._start_processes(self.argv(incoming=incoming), keys)
            mark = time.monotonic()
            for disk in self.spec.disks:
                key = keys.disks.get(disk.device_id)
                # A destination reopens its disks when it takes over: keep the secrets till then.
                attach_disk(self.qmp, disk, key, keep_secret=incoming)
            self.timings["disks"] = time.monotonic() - mark
            if not incoming:
                self.qmp.execute("cont")
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - began

    def _make_dirs(self) -> None:
        _prepare_dir(self.work_dir)
        if self._run_dir is None or self._own_run_dir:
            self._run_dir = Path(tempfile.mkdtemp(prefix="guardfab-vm-"))
            self._own_run_dir = True
        _prepare_dir(self._run_dir)
        if self.spec.firmware is Firmware.OVMF_SECURE_BOOT and not self.paths.ovmf_vars.exists():
            # The VM's NVRAM: its own copy, kept across launches.
            shutil.copyfile(OVMF_VARS_TEMPLATE, self.paths.ovmf_vars)
            self.paths.ovmf_vars.chmod(0o600)

    def _start_processes(self, argv: list[str], keys: VmKeys) -> None:
        mark = time.monotonic()
        if self.spec.vtpm:
            self._swtpm = Swtpm(
                self.work_dir / "tpm",
                self.paths.tpm_socket,
                self.work_dir / "swtpm.log",
                die_with_parent=self.die_with_parent,
            )
            self._swtpm.start(keys.vtpm_state, keys.vtpm_migration)
        self.timings["swtpm"] = time.monotonic() - mark
        mark = time.monotonic()
        log_fd = os.open(self.work_dir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._qemu = spawn(argv, stdout=log_fd, die_with_parent=self.die_with_parent)
        finally:
            os.close(log_fd)
        self._qmp = self._connect_qmp()
        self._restrict_sockets()
        self.timings["qemu"] = time.monotonic() - mark

    def _restrict_sockets(self) -> None:
        """Only the host's root (the agent) may connect to a console or debug socket.

        QEMU creates them under the process umask; the run directory is 0700
        already, the 0600 keeps them closed should it ever be opened up.
        """
        paths = self.paths
        for path in (paths.console_socket, paths.gdb_socket, paths.agent_socket):
            with contextlib.suppress(FileNotFoundError):
                path.chmod(0o600)

    def _connect_qmp(self) -> QmpClient:
        assert self._qemu is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            status = self._qemu.poll()
            if status is not None:
                raise HypervisorError(
                    f"QEMU for VM {self.spec.name} exited at start-up with status {status}: "
                    f"{self.last_log_line()}"
                )
            with contextlib.suppress(HypervisorError):
                return QmpClient.connect(self.paths.qmp_socket, wait=0.05)
            if time.monotonic() > deadline:
                raise HypervisorError(f"QEMU for VM {self.spec.name} did not open QMP in time")

    def last_log_line(self) -> str:
        """The last line QEMU wrote to its log (errors name paths, never keys)."""
        try:
            text = (self.work_dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return "no log"
        lines = text.strip().splitlines()
        return lines[-1] if lines else "no log"

    def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``..."""
        result: dict[str, Any] = self.qmp.execute("query-status")
        return str(result["status"])

    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``)."""
        self.qmp.execute("stop")

    def resume(self) -> None:
        """Run the guest's vCPUs again (QMP ``cont``)."""
        self.qmp.execute("cont")

    def forget_disk_secrets(self) -> None:
        """Delete the disks' secret objects a migration destination kept (see :meth:`start`)."""
        for disk in self.spec.disks:
            if disk.encrypted:
                remove_disk_secret(self.qmp, disk.device_id)

    def forward_host_port(self) -> None:
        """Add the spec's loopback port forward to a running VM (a migration destination)."""
        rule = host_forward_rule(self.spec)
        if rule is None:
            return
        answer = self.qmp.execute(
            "human-monitor-command", {"command-line": f"hostfwd_add net0 {rule}"}
        )
        if answer:
            raise HypervisorError(f"cannot forward {rule} to VM {self.spec.name}: {answer.strip()}")

    @property
    def running(self) -> bool:
        """Whether the QEMU process is alive."""
        return self._qemu is not None and self._qemu.poll() is None

    def stop(self) -> None:
        """Stop QEMU (QMP ``quit``, then SIGTERM/SIGKILL to its group) and its swtpm."""
        if self._qmp is not None:
            with contextlib.suppress(HypervisorError):
                self._qmp.execute("quit")
            self._qmp.close()
            self._qmp = None
        qemu, self._qemu = self._qemu, None
        if qemu is not None:
            stop_group(qemu, STOP_TIMEOUT / 2)
        if self._swtpm is not None:
            # swtpm exits by itself once its QEMU is gone (--terminate); give it a moment.
            self._swtpm.wait(STOP_TIMEOUT / 2)
            self._swtpm.stop()
            self._swtpm = None
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
