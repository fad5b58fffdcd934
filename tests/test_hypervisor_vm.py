"""A real shielded VM under QEMU: LUKS disks, a vTPM, secure boot firmware, TLS migration.

The VM boots its (LUKS-encrypted copy of the) template disk through OVMF with
secure boot: shim, grub and the kernel from the disk's EFI system partition
(ADR 0013), the root from its second partition.

One guest boot (TCG with OVMF takes 15-30 s) serves the whole module, through a
session fixture (see ``vm_harness.vm_lab``): the tests below read its page, look
for secrets on the host's disks and command lines, check the vTPM state, and
finally migrate it to a second QEMU over TLS-PSK.

Each xdist worker that runs some of these tests boots its own VM: tests run in
file order within a worker, and nothing depends on another worker. (The
``xdist_group`` mark below is meant to keep them on one worker and save a boot;
pytest-xdist 3.8 does not apply it under pytest 9, whose node ids no longer come
from ``_nodeid``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import vm_harness
from guardfab.hypervisor import migration
from guardfab.hypervisor.disk import DiskKey, create_encrypted_copy
from guardfab.hypervisor.errors import DiskKeyError
from guardfab.hypervisor.spec import DiskSpec, Firmware, SecurityLevel, VmSpec
from guardfab.hypervisor.template_image import build_marker_template
from guardfab.hypervisor.vm import VmKeys
from guardfab.hypervisor.vtpm import Swtpm
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import EventLog, parse_event_log
from guardfab.tpm.events import EventType
from vm_harness import ProvisionedVm, VmLab, fetch, find_in_files, parse_page, process_cmdline

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_lab = vm_harness.vm_lab

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hypervisor-vm")]


@pytest.fixture(scope="session")
def shielded(vm_lab: VmLab) -> ProvisionedVm:
    """A shielded VM provisioned from a fresh template, booted until its page answers."""
    provisioned = vm_lab.provision("shielded")
    vm = vm_lab.vm(provisioned.spec, provisioned.host_dir / "vm")
    started = time.monotonic()
    vm.start(provisioned.keys)
    provisioned.timings.update({f"start: {k}": v for k, v in vm.timings.items()})
    assert provisioned.spec.host_port is not None
    fetch(provisioned.spec.host_port)
    provisioned.timings["start to page"] = time.monotonic() - started
    provisioned.vm = vm
    print(f"\nshielded VM on {vm.accel.name}: {provisioned.timings}")
    return provisioned


def _page(vm: ProvisionedVm, path: str = "/status.txt") -> str:
    assert vm.spec.host_port is not None
    return fetch(vm.spec.host_port, path)


def test_shielded_vm_boots_from_its_encrypted_template_copy(shielded: ProvisionedVm) -> None:
    page = parse_page(_page(shielded))
    assert page["marker"] == shielded.marker
    assert page["hostname"] == shielded.answer.hostname
    assert page["tpm"].startswith("present"), page
    assert page["secure_boot"] == "enabled", page
    assert "[integrity]" in page["lockdown"], page  # Debian's kernel locks down under secure boot
    assert page["os_device"] == "/dev/vda2", "the root partition of the GPT template disk"
    assert _page(shielded, "/files/tenant.txt").encode() == shielded.answer.file_content
    assert "marker: " + shielded.marker in _page(shielded, "/cgi-bin/disk")


def _fetch_bytes(vm: ProvisionedVm, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{vm.spec.host_port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
        return body


def _started(log: EventLog, path: str) -> list[int]:
    """Where in the log an EFI application with ``path`` in its device path was started."""
    needle = path.encode("utf-16-le")
    return [
        index
        for index, e in enumerate(log.events)
        if e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION and needle in e.data
    ]


def test_the_firmware_log_shows_secure_boot_and_the_signed_chain_that_ran(
    shielded: ProvisionedVm, vm_lab: VmLab
) -> None:
    """The guest's own event log: secure boot on, shim then grub started, the kernel measured."""
    log = parse_event_log(_fetch_bytes(shielded, "/cgi-bin/eventlog"))
    secure_boot = [
        e
        for e in log.events
        if e.pcr == 7
        and e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG
        and "SecureBoot".encode("utf-16-le") in e.data
    ]
    assert len(secure_boot) == 1
    assert secure_boot[0].data.endswith(b"\x01")  # the variable's value: enabled
    # The firmware started shim from the disk's ESP, and shim (having verified it) grub.
    [shim] = _started(log, "\\EFI\\BOOT\\BOOTX64.EFI")
    [grub] = _started(log, "\\EFI\\BOOT\\grubx64.efi")
    assert shim < grub
    # grub measured the kernel it loaded (and shim verified) into PCR 9.
    kernel = hashlib.sha256(vm_lab.guest.kernel.read_bytes()).digest()
    measured = [
        e.digests.get(TpmAlg.SHA256)
        for e in log.events
        if e.pcr == 9 and e.event_type == EventType.EV_IPL and e.data.rstrip(b"\0") == b"/vmlinuz"
    ]
    assert measured == [kernel]


def test_no_secret_on_any_command_line(shielded: ProvisionedVm) -> None:
    vm = shielded.vm
    assert vm is not None
    assert vm.pid is not None
    assert vm.swtpm_pid is not None
    qemu_argv, swtpm_argv = process_cmdline(vm.pid), process_cmdline(vm.swtpm_pid)
    for argv in (qemu_argv, swtpm_argv):
        joined = " ".join(argv).encode()
        leaked = [name for name, needle in shielded.needles().items() if needle in joined]
        assert leaked == [], leaked
    assert any(arg.startswith("fd=") and "aes-256-cbc" in arg for arg in swtpm_argv)
    assert not any("secret" in arg for arg in qemu_argv)
    assert qemu_argv == vm.argv()


def test_nothing_in_clear_in_the_files_the_runtime_wrote(shielded: ProvisionedVm) -> None:
    written = {path.name for path in vm_harness.files_under([shielded.host_dir])}
    # The grep means something only if the disks, NVRAM and vTPM state are there.
    assert {"os.qcow2", "spec.qcow2", "OVMF_VARS.fd", "tpm2-00.permall"} <= written
    assert find_in_files([shielded.host_dir], shielded.needles()) == []
    loose = [p for p in vm_harness.files_under([shielded.host_dir]) if p.stat().st_mode & 0o077]
    assert loose == [], "readable by others"


def _ptm_init(ctrl_socket: Path) -> int:
    """Send swtpm's control command CMD_INIT; return the TPM result (0 = state loaded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(ctrl_socket))
        sock.sendall(struct.pack(">II", 2, 0))
        (result,) = struct.unpack(">I", sock.recv(4))
        return int(result)


@contextlib.contextmanager
def _swtpm_on_copy(state: Path, tmp: Path, key: bytes) -> Iterator[Swtpm]:
    shutil.copytree(state, tmp / "state")
    tpm = Swtpm(tmp / "state", tmp / "ctrl.sock", tmp / "swtpm.log")
    tpm.start(key)
    try:
        yield tpm
    finally:
        tpm.stop()
        shutil.rmtree(tmp / "state")


def test_vtpm_state_opens_only_with_its_key(shielded: ProvisionedVm, tmp_path: Path) -> None:
    state = shielded.host_dir / "vm" / "tpm"
    with _swtpm_on_copy(state, tmp_path, secrets.token_bytes(32)) as tpm:
        assert _ptm_init(tpm.ctrl_socket) != 0
    assert "HMAC" in (tmp_path / "swtpm.log").read_text()
    with _swtpm_on_copy(state, tmp_path, shielded.keys.vtpm_state) as tpm:
        assert _ptm_init(tpm.ctrl_socket) == 0


def test_wrong_disk_key_is_refused_and_nothing_keeps_running(
    shielded: ProvisionedVm, vm_lab: VmLab, tmp_path: Path
) -> None:
    disk = tmp_path / "other.qcow2"
    create_encrypted_copy(vm_lab.template("other"), disk, DiskKey.generate())
    spec = replace(
        shielded.spec,
        name="wrong-key",
        disks=(DiskSpec("os", disk),),
        host_port=vm_harness.free_port(),
    )
    vm = vm_lab.vm(spec, tmp_path / "vm")
    keys = VmKeys({"os": DiskKey.generate()}, secrets.token_bytes(32))
    with pytest.raises(DiskKeyError, match="does not open disk os"):
        vm.start(keys)
    assert not vm.running
    assert vm.pid is None
    assert vm.swtpm_pid is None


def test_pause_resume_and_status_over_qmp(shielded: ProvisionedVm) -> None:
    vm = shielded.vm
    assert vm is not None
    boot_id = parse_page(_page(shielded))["boot_id"]
    vm.pause()
    assert vm.status() == "paused"
    with pytest.raises(OSError):  # the port forward accepts, the stopped guest never answers
        urllib.request.urlopen(f"http://127.0.0.1:{shielded.spec.host_port}/", timeout=2)
    vm.resume()
    assert vm.status() == "running"
    assert parse_page(_page(shielded))["boot_id"] == boot_id


def test_a_destination_with_another_vtpm_migration_key_cannot_take_the_vm(
    shielded: ProvisionedVm, vm_lab: VmLab
) -> None:
    source = shielded.vm
    assert source is not None
    boot_id = parse_page(_page(shielded))["boot_id"]
    wrong = replace(shielded.keys, vtpm_migration=secrets.token_bytes(32))
    dest = vm_lab.vm(shielded.spec, vm_lab.root / "host-c" / "vm")
    dest.start(wrong, incoming=True)
    psk = migration.new_migration_psk()
    incoming = migration.IncomingMigration(dest, psk, vm_harness.free_port())
    incoming.listen()
    # The destination refuses the vTPM state either while the stream runs (the
    # source sees the migration fail) or after it (it does not take over): which
    # one depends on timing; in both the VM must go on at the source.
    with pytest.raises(migration.MigrationError, match=r"failed|did not take over"):
        migration.live_migrate(source, incoming, psk, shielded.keys.disks, timeout=60)
    dest.stop()
    assert source.status() == "running"
    assert parse_page(_page(shielded))["boot_id"] == boot_id
    assert "marker: " + shielded.marker in _page(shielded, "/cgi-bin/disk")


def _send_plaintext_stream(uri: str) -> None:
    """Open the migration port and speak QEMU's plain migration header, as a non-TLS source."""
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"QEVM\0\0\0\x03" + b"\0" * 64)
        with contextlib.suppress(OSError):
            sock.recv(16)


def _wait_for_log(path: Path, text: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_live_migration_over_tls_keeps_the_vm_and_its_boot(
    shielded: ProvisionedVm, vm_lab: VmLab
) -> None:
    source = shielded.vm
    assert source is not None
    boot_id = parse_page(_page(shielded))["boot_id"]
    dest = vm_lab.vm(shielded.spec, vm_lab.root / "host-b" / "vm")
    dest.start(shielded.keys, incoming=True)
    psk = migration.new_migration_psk()
    incoming = migration.IncomingMigration(dest, psk, vm_harness.free_port())
    incoming.listen()

    # A source without TLS is refused at the handshake; the destination keeps waiting.
    _send_plaintext_stream(incoming.uri)
    assert _wait_for_log(dest.work_dir / "qemu.log", "TLS handshake failed")
    assert dest.status() == "inmigrate"

    # A wrong key fails before any memory leaves; the VM runs on where it was.
    with pytest.raises(migration.MigrationError, match="TLS handshake failed"):
        migration.send_migration(
            source, migration.new_migration_psk(), incoming.uri, shielded.keys.disks
        )
    assert source.status() == "running"
    assert parse_page(_page(shielded))["boot_id"] == boot_id

    started = time.monotonic()
    stats = migration.live_migrate(source, incoming, psk, shielded.keys.disks)
    shielded.vm = dest  # the VM lives on B now, for any test that runs after this one
    page = parse_page(_page(shielded))
    print(f"\nmigration: {stats}, page again after {time.monotonic() - started:.2f} s")
    assert page["boot_id"] == boot_id
    assert page["marker"] == shielded.marker
    assert "marker: " + shielded.marker in _page(shielded, "/cgi-bin/disk")
    assert not source.running
    assert dest.status() == "running"
    assert dest.qmp.execute("query-migrate-parameters")["tls-creds"] == migration.TLS_OBJECT_ID
    # Every host directory of this lab (A, B, the refused C); the templates are input.
    hosts = [path for path in vm_lab.root.iterdir() if path.is_dir()]
    assert {shielded.host_dir, vm_lab.root / "host-b", vm_lab.root / "host-c"} <= set(hosts)
    assert find_in_files(hosts, shielded.needles()) == []


def test_below_shielded_a_bare_ext4_template_boots_with_a_direct_kernel(
    vm_lab: VmLab, tmp_path: Path
) -> None:
    """A disk without partitions (no boot loader): the guest mounts the whole disk, /dev/vda."""
    marker = f"bare-marker-{secrets.token_hex(6)}"
    build_marker_template(tmp_path / "bare.img", marker)
    os_disk = tmp_path / "os.qcow2"
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
    subprocess.run([*convert, str(tmp_path / "bare.img"), str(os_disk)], check=True)
    port = vm_harness.free_port()
    spec = VmSpec(
        "bare",
        SecurityLevel.NORMAL,
        firmware=Firmware.BIOS,  # SeaBIOS: the quickest boot, and no secure boot to claim
        vtpm=False,
        kernel=vm_lab.guest.direct(),
        disks=(DiskSpec("os", os_disk, encrypted=False),),
        host_port=port,
    )
    vm = vm_lab.vm(spec, tmp_path / "vm")
    vm.start(VmKeys())
    page = parse_page(fetch(port))
    vm.stop()
    assert (page["marker"], page["os_device"]) == (marker, "/dev/vda")
    assert page["secure_boot"] == "no UEFI"
