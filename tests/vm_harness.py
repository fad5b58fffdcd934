"""Test helper (not a test module): the real test guest, its disks, and VMs that always stop.

The guest (a Debian kernel and a busybox initramfs) and Debian's signed boot
chain (shim, grub) are built by ``scripts/build-guest.sh`` once per session and
cached under ``cache/guest``; if their packages cannot be fetched the fixture
fails loudly -- a VM test never passes by skipping its VM. Template disks are
what a shielded VM boots through its firmware (ADR 0013): GPT, an EFI system
partition with the signed chain, the kernel and the initramfs, and an ext4
root holding the marker. :class:`VmLab` provisions VMs the way the fabric will
(a template, a LUKS copy of it, an encrypted specialization disk, random keys)
and stops every QEMU and swtpm it started at teardown.

Fixtures are imported explicitly by the test modules that use them::

    import vm_harness

    guest = vm_harness.guest
    vm_lab = vm_harness.vm_lab
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guardfab.hypervisor.accel import Accelerator, choose_accelerator
from guardfab.hypervisor.disk import DiskKey, create_encrypted_copy, create_encrypted_from_bytes
from guardfab.hypervisor.efi_disk import (
    MARKER_FILE,
    BootChain,
    GuestBoot,
    build_boot_disk,
    load_boot_chain,
)
from guardfab.hypervisor.spec import DirectKernel, DiskSpec, SecurityLevel, VmSpec
from guardfab.hypervisor.specialize import AnswerFile
from guardfab.hypervisor.vm import QemuVm, VmKeys

REPO = Path(__file__).resolve().parent.parent
#: Seconds a freshly started guest may take to serve its page (TCG + OVMF: 12-25 s).
PAGE_TIMEOUT = 90.0
#: A provisioning request's ``boot`` for a VM whose firmware boots its own disk.
FIRMWARE_BOOT: DirectKernel | None = None


@dataclass(frozen=True)
class Guest:
    """The built guest: kernel, initramfs, the signed boot chain and the build's manifest."""

    kernel: Path
    initrd: Path
    chain: BootChain
    manifest: str
    build_seconds: float

    def boot(self) -> DirectKernel | None:
        """How a VM provisioned from one of :meth:`template`'s disks boots: ``None``.

        Its firmware boots the template disk through the signed chain; no kernel
        is handed to QEMU (a shielded VM may not have one). For a kernel QEMU
        loads itself (encryption-supported and normal VMs only), see :meth:`direct`.
        """
        return FIRMWARE_BOOT

    def direct(self, cmdline: str = "quiet") -> DirectKernel:
        """Direct-boot settings (``-kernel``): not for shielded VMs (policy ``firmware-boot``)."""
        return DirectKernel(self.kernel, self.initrd, cmdline)

    def template(self, dest: Path, marker: str, *, kernel: Path | None = None) -> Path:
        """Build the template disk ``dest`` whose root's marker.txt holds ``marker``.

        ``kernel`` replaces the guest's signed kernel on the ESP (a tampered one, say).
        """
        boot = GuestBoot(self.kernel if kernel is None else kernel, self.initrd)
        build_boot_disk(dest, self.chain, boot, {MARKER_FILE: marker.encode() + b"\n"})
        return dest


def kernel_with_four_bytes_changed(kernel: Path, dest: Path) -> Path:
    """The kernel with its setup header's version string changed (hashed, never executed).

    Its signature no longer verifies, yet it still boots where nothing checks it
    (test_vm_secure_boot_chain.py shows both).
    """
    data = bytearray(kernel.read_bytes())
    at = data.find(b"debian-kernel@")
    assert 0 < at < 0x8000, "no version string in the kernel's setup code"
    data[at : at + 4] = b"DEBI"
    dest.write_bytes(data)
    return dest


def guest_dir() -> Path:
    """Where ``scripts/build-guest.sh`` leaves the guest (``GUARDFAB_GUEST_DIR`` or the cache)."""
    return Path(os.environ.get("GUARDFAB_GUEST_DIR", REPO / "cache" / "guest"))


@functools.cache
def built_guest() -> Guest:
    """Build (or reuse) the test guest once per process; fail -- never skip -- if impossible.

    A plain function as well as the :func:`guest` fixture: harnesses whose
    fixtures are used by modules without the ``guest`` fixture call it directly.
    """
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "scripts" / "build-guest.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            "scripts/build-guest.sh failed: the VM tests need the guest built from Debian "
            f"packages.\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    out = guest_dir()
    chain = load_boot_chain(out / "efi")
    return Guest(
        out / "vmlinuz",
        out / "initramfs.gz",
        chain,
        result.stdout,
        time.monotonic() - started,
    )


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The test guest and its boot chain (built once; see :func:`built_guest`)."""
    return built_guest()


@pytest.fixture(scope="session")
def accelerator() -> Accelerator:
    """KVM if it really boots a guest here, else TCG (probed once per test process)."""
    accel = choose_accelerator()
    print(f"\nVM accelerator: {accel.name} ({accel.reason})")
    return accel


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(port: int, path: str = "/status.txt", *, timeout: float = PAGE_TIMEOUT) -> str:
    """GET a guest page through its port forward, retrying until it answers or ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                body: bytes = reply.read()
                return body.decode()
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"the guest on port {port} did not serve {path} in {timeout} s: {last}")


def parse_page(text: str) -> dict[str, str]:
    """The guest's ``status.txt`` as a dict."""
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def files_under(roots: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under ``roots`` (what the runtime wrote)."""
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def find_in_files(roots: Iterable[Path], needles: dict[str, bytes]) -> list[str]:
    """``file: what`` for every file under ``roots`` that contains one of ``needles``."""
    return [
        f"{path}: {name}"
        for path in files_under(roots)
        for name, needle in needles.items()
        if needle in path.read_bytes()
    ]


@dataclass
class ProvisionedVm:
    """A VM's spec, keys and secrets as the test knows them (the fabric will get them from KPS)."""

    spec: VmSpec
    keys: VmKeys
    marker: str
    answer: AnswerFile
    host_dir: Path
    vm: QemuVm | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def needles(self) -> dict[str, bytes]:
        """Everything that must never be found in clear in the host's files."""
        found = {
            "template marker": self.marker.encode(),
            "answer file": self.answer.to_bytes()[:40],
            "served file": self.answer.file_content,
            "vTPM state key": self.keys.vtpm_state,
            "vTPM state key (hex)": self.keys.vtpm_state.hex().encode(),
        }
        if self.answer.admin_password_hash:
            found["password hash"] = self.answer.admin_password_hash.encode()
        for device_id, key in self.keys.disks.items():
            found[f"{device_id} disk passphrase"] = key.passphrase()
        return found


class VmLab:
    """Provision and run VMs under one directory; stop them all at teardown."""

    def __init__(self, root: Path, guest: Guest, accel: Accelerator) -> None:
        self.root = root
        self.guest = guest
        self.accel = accel
        self._vms: list[QemuVm] = []

    def template(self, marker: str) -> Path:
        """A template disk holding ``marker`` (outside every host directory: it is the input)."""
        return self.guest.template(self.root / f"template-{secrets.token_hex(4)}.img", marker)

    def provision(
        self, name: str, *, level: SecurityLevel = SecurityLevel.SHIELDED
    ) -> ProvisionedVm:
        """Make the disks of a new VM: a LUKS copy of a fresh template, a LUKS answer disk.

        The VM boots that disk through OVMF with secure boot (no direct kernel).
        """
        marker = f"guardfab-marker-{secrets.token_hex(8)}"
        answer = AnswerFile(
            hostname=f"{name}-{secrets.token_hex(3)}",
            admin_password_hash=f"$y$j9T${secrets.token_hex(8)}${secrets.token_hex(16)}",
            file_name="tenant.txt",
            file_content=f"tenant-secret-{secrets.token_hex(12)}".encode(),
        )
        host_dir = self.root / name
        (host_dir / "disks").mkdir(parents=True, mode=0o700)
        keys = VmKeys(
            disks={"os": DiskKey.generate(), "spec": DiskKey.generate()},
            vtpm_state=secrets.token_bytes(32),
            vtpm_migration=secrets.token_bytes(32),
        )
        timings: dict[str, float] = {}
        mark = time.monotonic()
        create_encrypted_copy(self.template(marker), host_dir / "disks/os.qcow2", keys.disks["os"])
        timings["os disk"] = time.monotonic() - mark
        mark = time.monotonic()
        spec_disk = host_dir / "disks/spec.qcow2"
        create_encrypted_from_bytes(answer.to_bytes(), spec_disk, keys.disks["spec"])
        timings["specialization disk"] = time.monotonic() - mark
        spec = VmSpec(
            name=name,
            level=level,
            disks=(DiskSpec("os", host_dir / "disks/os.qcow2"), DiskSpec("spec", spec_disk)),
            host_port=free_port(),
        )
        return ProvisionedVm(spec, keys, marker, answer, host_dir, timings=timings)

    def vm(self, spec: VmSpec, work_dir: Path) -> QemuVm:
        """A VM object whose processes are stopped at teardown."""
        vm = QemuVm(spec, work_dir, accel=self.accel, die_with_parent=True)
        self._vms.append(vm)
        return vm

    def stop_all(self) -> None:
        """Stop every VM this lab created (idempotent)."""
        for vm in self._vms:
            vm.stop()


@pytest.fixture(scope="session")
def vm_lab(
    tmp_path_factory: pytest.TempPathFactory, guest: Guest, accelerator: Accelerator
) -> Iterator[VmLab]:
    """The session's lab (one per xdist worker); all its VMs stop at the end.

    Session-scoped on purpose: a worker may run other modules' tests between
    this module's, and pytest tears module fixtures down at every such switch --
    a module-scoped booted VM would boot again.
    """
    lab = VmLab(tmp_path_factory.mktemp("vmlab"), guest, accelerator)
    try:
        yield lab
    finally:
        lab.stop_all()


def disk_stats(vm: QemuVm, device_id: str) -> dict[str, int]:
    """QEMU's I/O counters of one attached disk (``rd_bytes``, ``wr_operations``, ...)."""
    for entry in vm.qmp.execute("query-blockstats"):
        if str(entry.get("qdev", "")).startswith(f"/machine/peripheral/{device_id}/"):
            return {k: v for k, v in entry["stats"].items() if isinstance(v, int)}
    raise AssertionError(f"no disk {device_id!r} in QEMU's block statistics")


def process_cmdline(pid: int) -> list[str]:
    """Another process's argv as the kernel shows it to every user (``ps``)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
