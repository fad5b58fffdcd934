"""Secure boot through a signed chain on the template disk: OVMF -> shim -> grub -> kernel.

The disks are built by :mod:`guardfab.hypervisor.efi_disk` from Debian's signed
shim and grub (``scripts/build-boot-chain.sh``) and the test guest's kernel and
initramfs (``scripts/build-guest.sh``). The boots are real QEMU processes (KVM
if it works here, else TCG) with OVMF's secure-boot build and Microsoft's keys
enrolled, reading the guest's serial output from a file:

* the intact chain reaches the guest's init (its ``guardfab.probe=1`` switch
  powers the VM off, so QEMU exits by itself);
* a kernel with four bytes changed is refused by grub (shim's verifier);
* a grub with one byte changed is refused by shim;
* the same two tampered files boot to init on OVMF without secure boot: the
  refusals come from the signature checks, not from broken binaries;
* what is not verified (grub.cfg, the command line, the initramfs) is measured
  by grub into PCRs 8 and 9 (read from the guest's event log, with a vTPM).

The fast tests check the disk's layout and contents and that bad input leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vm_harness
from guardfab.errors import UsageError, VerificationError
from guardfab.hypervisor import efi_disk
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.argv import OVMF_CODE, OVMF_VARS_TEMPLATE
from guardfab.hypervisor.efi_disk import (
    BootChain,
    DiskToolError,
    GuestBoot,
    PartitionLayout,
    build_boot_disk,
    build_esp,
    grub_config,
    load_boot_chain,
)
from guardfab.hypervisor.procs import spawn, stop_group
from guardfab.hypervisor.vtpm import Swtpm
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import EventLog, parse_event_log
from guardfab.tpm.events import EventType
from vm_harness import REPO, Guest, fetch, free_port, kernel_with_four_bytes_changed, parse_page

guest = vm_harness.guest
accelerator = vm_harness.accelerator

#: grub loads the kernel into memory below 4 GiB in one piece: with 256 MiB it
#: fails ("cannot allocate kernel buffer"), 512 MiB boots.
GUEST_MIB = 512
#: Seconds a boot may take to show what the test waits for (TCG, two busy cores).
BOOT_TIMEOUT = 120.0
PROBE_CMDLINE = "console=ttyS0 guardfab.probe=1"
#: What the serial console shows once the guest's init ran and powered off.
INIT_STARTED = "Run /init as init process"
POWERED_OFF = "reboot: Power down"
#: Seconds QEMU may take to exit after the guest's kernel powered off.
QEMU_EXIT_GRACE = 15.0


@dataclass(frozen=True)
class Firmware:
    """An OVMF build and the variable store it starts from."""

    code: Path
    vars_template: Path
    secure_boot: bool


SECURE_BOOT = Firmware(OVMF_CODE, OVMF_VARS_TEMPLATE, secure_boot=True)
#: OVMF without secure boot and without any keys enrolled.
PLAIN = Firmware(
    Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    secure_boot=False,
)


@pytest.fixture(scope="module")
def boot_chain() -> BootChain:
    """Debian's signed shim and grub; fail -- never skip -- if they cannot be fetched."""
    result = subprocess.run(
        [str(REPO / "scripts" / "build-boot-chain.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-boot-chain.sh failed:\n{result.stderr[-3000:]}", pytrace=False)
    return load_boot_chain(
        Path(os.environ.get("GUARDFAB_GUEST_DIR", REPO / "cache" / "guest")) / "efi"
    )


def _grub_with_one_byte_changed(grub: Path, dest: Path) -> Path:
    """grub whose greeting says 'Welcome to GRUB?': visible proof that this binary ran."""
    data = bytearray(grub.read_bytes())
    at = data.find(b"Welcome to GRUB!")
    assert at > 0, "no greeting in grubx64.efi"
    data[at + 15] = ord("?")
    dest.write_bytes(data)
    return dest


@dataclass(frozen=True)
class Boot:
    """What one boot showed: the serial output and QEMU's exit status (None: stopped by us)."""

    serial: str
    exit_status: int | None
    seconds: float


def _qemu_argv(
    disk: Path, firmware: Firmware, vars_copy: Path, serial: Path, accel: Accelerator
) -> list[str]:
    machine = f"q35,accel={accel.name}" + (",smm=on" if firmware.secure_boot else "")
    argv = ["qemu-system-x86_64", "-machine", machine, "-m", str(GUEST_MIB)]
    if accel.cpu:
        argv += ["-cpu", accel.cpu]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if firmware.secure_boot:
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return [
        *argv,
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive",
        f"if=none,id=disk0,format=raw,readonly=on,file={disk}",
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=0",
        "-serial",
        f"file:{serial}",
    ]


@contextlib.contextmanager
def running(
    disk: Path, firmware: Firmware, accel: Accelerator, extra: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """QEMU booting ``disk`` (with its serial output file); stopped when the block ends."""
    vars_copy = disk.with_suffix(".vars.fd")
    serial = disk.with_suffix(".serial.log")
    shutil.copyfile(firmware.vars_template, vars_copy)
    serial.touch()
    with disk.with_suffix(".qemu.log").open("wb") as log:
        qemu = spawn(
            [*_qemu_argv(disk, firmware, vars_copy, serial, accel), *extra],
            stdout=log.fileno(),
            die_with_parent=True,
        )
    try:
        yield qemu, serial
    finally:
        stop_group(qemu, timeout=1)


def boot(disk: Path, firmware: Firmware, accel: Accelerator, *, until: str) -> Boot:
    """Boot ``disk`` until the serial output shows ``until`` or QEMU exits; always stop QEMU."""
    started = time.monotonic()
    with running(disk, firmware, accel) as (qemu, serial):
        deadline = started + BOOT_TIMEOUT
        while qemu.poll() is None and until not in _read(serial) and time.monotonic() < deadline:
            time.sleep(0.2)
        if POWERED_OFF in _read(serial):
            # The guest powered off: QEMU (-no-reboot) exits, a moment after the kernel says so.
            with contextlib.suppress(subprocess.TimeoutExpired):
                qemu.wait(timeout=QEMU_EXIT_GRACE)
        exit_status = qemu.poll()
    seconds = time.monotonic() - started
    print(f"\n{disk.name}: {seconds:.1f} s, exit {exit_status}")
    return Boot(_read(serial), exit_status, seconds)


def _read(serial: Path) -> str:
    return serial.read_bytes().decode(errors="replace")


def _disk(tmp_path: Path, chain: BootChain, kernel: Path, initramfs: Path, cmdline: str) -> Path:
    disk = tmp_path / "disk.img"
    build_boot_disk(disk, chain, GuestBoot(kernel, initramfs, cmdline), {"marker.txt": b"m\n"})
    return disk


# ---------------------------------------------------------------------------
# Boots (real QEMU, OVMF)


@pytest.mark.slow
def test_the_signed_chain_boots_to_the_guest_init(
    tmp_path: Path, boot_chain: BootChain, guest: Guest, accelerator: Accelerator
) -> None:
    token = secrets.token_hex(6)
    cmdline = f"{PROBE_CMDLINE} guardfab.chain={token}"
    disk = _disk(tmp_path, boot_chain, guest.kernel, guest.initrd, cmdline)

    result = boot(disk, SECURE_BOOT, accelerator, until=POWERED_OFF)

    # grub.cfg's command line reached the kernel: grub started it from this disk.
    assert f"Command line: BOOT_IMAGE=/vmlinuz {cmdline}" in result.serial
    assert "EFI stub: UEFI Secure Boot is enabled." in result.serial
    assert "Kernel is locked down from EFI Secure Boot" in result.serial
    # The guest's init ran: only it powers the VM off (guardfab.probe=1), and QEMU exits.
    assert INIT_STARTED in result.serial
    assert POWERED_OFF in result.serial
    assert result.exit_status == 0


@pytest.mark.slow
def test_a_kernel_with_four_bytes_changed_is_refused_by_grub(
    tmp_path: Path, boot_chain: BootChain, guest: Guest, accelerator: Accelerator
) -> None:
    kernel = kernel_with_four_bytes_changed(guest.kernel, tmp_path / "vmlinuz")
    disk = _disk(tmp_path, boot_chain, kernel, guest.initrd, PROBE_CMDLINE)

    result = boot(disk, SECURE_BOOT, accelerator, until="grub> ")

    assert "error: bad shim signature." in result.serial
    assert "grub> " in result.serial, "grub should have given up and shown its prompt"
    assert "Linux version" not in result.serial
    assert INIT_STARTED not in result.serial
    assert result.exit_status is None


@pytest.mark.slow
def test_a_grub_not_signed_by_debian_is_refused_by_shim(
    tmp_path: Path, boot_chain: BootChain, guest: Guest, accelerator: Accelerator
) -> None:
    grub = _grub_with_one_byte_changed(boot_chain.grub, tmp_path / "grubx64.efi")
    chain = BootChain(boot_chain.shim, grub, manifest="")
    disk = _disk(tmp_path, chain, guest.kernel, guest.initrd, PROBE_CMDLINE)

    result = boot(disk, SECURE_BOOT, accelerator, until="Security Violation")

    assert "Verification failed: (0x1A) Security Violation" in result.serial
    assert "Welcome to GRUB" not in result.serial
    assert "Linux version" not in result.serial
    assert result.exit_status is None


@pytest.mark.slow
def test_without_secure_boot_the_same_tampered_files_boot(
    tmp_path: Path, boot_chain: BootChain, guest: Guest, accelerator: Accelerator
) -> None:
    """The control: the changed bytes break no code, only the signatures."""
    grub = _grub_with_one_byte_changed(boot_chain.grub, tmp_path / "grubx64.efi")
    kernel = kernel_with_four_bytes_changed(guest.kernel, tmp_path / "vmlinuz")
    chain = BootChain(boot_chain.shim, grub, manifest="")
    disk = _disk(tmp_path, chain, kernel, guest.initrd, PROBE_CMDLINE)

    result = boot(disk, PLAIN, accelerator, until=POWERED_OFF)

    assert "Welcome to GRUB?" in result.serial  # the tampered grub ran
    assert "Secure Boot is enabled" not in result.serial
    assert INIT_STARTED in result.serial
    assert result.exit_status == 0


def _guest_event_log(
    disk: Path, accel: Accelerator, vtpm_dir: Path
) -> tuple[dict[str, str], EventLog]:
    """Boot ``disk`` with a vTPM and the network; the guest's page and its firmware event log."""
    swtpm = Swtpm(
        vtpm_dir / "state", vtpm_dir / "ctrl.sock", vtpm_dir / "swtpm.log", die_with_parent=True
    )
    swtpm.start(secrets.token_bytes(32))
    port = free_port()
    extra = (
        *("-chardev", f"socket,id=chrtpm,path={swtpm.ctrl_socket}"),
        *("-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"),
        *("-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:80"),
        *("-device", "virtio-net-pci,netdev=net0"),
    )
    try:
        with running(disk, SECURE_BOOT, accel, extra):
            page = parse_page(fetch(port, timeout=BOOT_TIMEOUT))
            url = f"http://127.0.0.1:{port}/cgi-bin/eventlog"
            with urllib.request.urlopen(url, timeout=10) as reply:
                raw: bytes = reply.read()
    finally:
        swtpm.stop()
    return page, parse_event_log(raw)


def _grub_file_events(log: EventLog) -> dict[bytes, bytes]:
    """PCR 9 as grub extends it: the path of each file it read -> the file's SHA-256."""
    return {
        e.data.rstrip(b"\0"): e.digests[TpmAlg.SHA256]
        for e in log.events
        if e.pcr == 9 and e.event_type == EventType.EV_IPL and TpmAlg.SHA256 in e.digests
    }


@pytest.mark.slow
def test_grub_measures_what_it_does_not_verify(
    tmp_path: Path, boot_chain: BootChain, guest: Guest, accelerator: Accelerator
) -> None:
    """ADR 0013: grub.cfg, the command line and the initramfs are measured into PCRs 8 and 9."""
    cmdline = f"console=ttyS0 quiet guardfab.chain={secrets.token_hex(6)}"
    # Copies: the digests must be of exactly the bytes on the disk.
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initramfs.gz"
    shutil.copyfile(guest.kernel, kernel)
    shutil.copyfile(guest.initrd, initrd)
    disk = _disk(tmp_path, boot_chain, kernel, initrd, cmdline)

    page, log = _guest_event_log(disk, accelerator, tmp_path / "vtpm")

    assert page["secure_boot"] == "enabled", page
    assert page["tpm"].startswith("present"), page
    commands = [e.data for e in log.events if e.pcr == 8 and e.event_type == EventType.EV_IPL]
    assert f"grub_cmd: linux /vmlinuz {cmdline}\0".encode() in commands
    assert f"kernel_cmdline: /vmlinuz {cmdline}\0".encode() in commands
    sha256 = hashlib.sha256
    assert _grub_file_events(log) == {
        b"(hd0,gpt1)/EFI/debian/grub.cfg": sha256(grub_config(cmdline)).digest(),
        b"/vmlinuz": sha256(kernel.read_bytes()).digest(),
        b"/initramfs.gz": sha256(initrd.read_bytes()).digest(),
    }
    # PCR 4: shim, started by the firmware, measured grub when it started it.
    started = [e for e in log.events if e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION]
    assert any("\\EFI\\BOOT\\grubx64.efi".encode("utf-16-le") in e.data for e in started)


# ---------------------------------------------------------------------------
# The disk (no boot)


def _partition(disk: Path, offset: int, size: int, dest: Path) -> Path:
    with disk.open("rb") as src:
        src.seek(offset)
        dest.write_bytes(src.read(size))
    return dest


def _fat_file(image: Path, name: str, dest: Path) -> bytes:
    subprocess.run(
        ["mcopy", "-n", "-i", str(image), f"::/{name}", str(dest)],
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    )
    return dest.read_bytes()


def test_the_disk_holds_the_chain_the_config_and_the_root_files(
    tmp_path: Path, boot_chain: BootChain, guest: Guest
) -> None:
    disk = tmp_path / "disk.img"
    guest_boot = GuestBoot(guest.kernel, guest.initrd, "console=ttyS0 quiet")
    layout = build_boot_disk(
        disk, boot_chain, guest_boot, {"marker.txt": b"hello\n", "etc/x": b"y"}
    )

    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True).stdout
    )
    parts = table["partitiontable"]["partitions"]
    assert table["partitiontable"]["label"] == "gpt"
    assert [(p["start"] * 512, p["size"] * 512, p["type"]) for p in parts] == [
        (layout.esp_offset, layout.esp_size, efi_disk.ESP_TYPE),
        (layout.root_offset, layout.root_size, efi_disk.LINUX_FS_TYPE),
    ]
    assert disk.stat().st_size == layout.disk_size

    esp = _partition(disk, layout.esp_offset, layout.esp_size, tmp_path / "esp.img")
    assert _fat_file(esp, "EFI/BOOT/BOOTX64.EFI", tmp_path / "shim") == boot_chain.shim.read_bytes()
    assert _fat_file(esp, "EFI/BOOT/grubx64.efi", tmp_path / "grub") == boot_chain.grub.read_bytes()
    assert _fat_file(esp, "vmlinuz", tmp_path / "k") == guest.kernel.read_bytes()
    assert _fat_file(esp, "initramfs.gz", tmp_path / "i") == guest.initrd.read_bytes()
    config = _fat_file(esp, "EFI/debian/grub.cfg", tmp_path / "cfg").decode()
    assert "linux /vmlinuz console=ttyS0 quiet\n" in config

    root = _partition(disk, layout.root_offset, layout.root_size, tmp_path / "root.img")
    for name, content in (("/marker.txt", "hello\n"), ("/etc/x", "y")):
        shown = subprocess.run(
            ["debugfs", "-R", f"cat {name}", str(root)], capture_output=True, check=True, text=True
        )
        assert shown.stdout == content


def test_the_command_line_cannot_inject_grub_commands() -> None:
    config = grub_config("quiet\ninsmod evil  console=ttyS0").decode()
    assert "linux /vmlinuz quiet insmod evil console=ttyS0\n" in config
    assert [line.split()[0] for line in config.splitlines() if not line.startswith("#")] == [
        "set",
        "linux",
        "initrd",
        "boot",
    ]


@pytest.mark.parametrize(
    "cmdline", ["quiet; boot", "root=$evil", "a'b", 'a"b', "x # y", "a{b}", "a\\b", "a|b", "a&b"]
)
def test_a_command_line_with_grub_syntax_is_refused(cmdline: str) -> None:
    with pytest.raises(UsageError, match="kernel command line holds"):
        grub_config(cmdline)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("esp_mib", "root_mib", "root_files", "tool"),
    [
        (4, 16, {"marker.txt": b"m"}, "mcopy"),  # the kernel alone is 8 MiB
        (64, 1, {"big": secrets.token_bytes(3 * 1024 * 1024)}, "mke2fs"),
    ],
)
def test_a_failing_tool_is_named_and_leaves_nothing(
    tmp_path: Path,
    boot_chain: BootChain,
    guest: Guest,
    esp_mib: int,
    root_mib: int,
    root_files: dict[str, bytes],
    tool: str,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    guest_boot = GuestBoot(guest.kernel, guest.initrd)
    with pytest.raises(DiskToolError) as caught:
        build_boot_disk(
            out / "disk.img", boot_chain, guest_boot, root_files, esp_mib=esp_mib, root_mib=root_mib
        )
    assert caught.value.tool == tool
    assert str(caught.value).startswith(f"{tool} failed")
    assert _leftovers(out) == []


def test_an_esp_holds_the_files_given(tmp_path: Path) -> None:
    files = {"EFI/BOOT/a.efi": b"a" * 5000, "efi/boot/B.txt": b"b", "top.cfg": b"c"}
    build_esp(tmp_path / "esp.img", files, size_mib=2)
    for name, content in files.items():
        assert _fat_file(tmp_path / "esp.img", name, tmp_path / "x") == content


def test_names_that_fat_would_merge_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="same file on FAT"):
        build_esp(tmp_path / "esp.img", {"EFI/a.efi": b"1", "efi/A.EFI": b"2"})
    assert _leftovers(tmp_path) == []


def test_a_missing_tool_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DiskToolError, match=r"mkfs\.fat is not installed"):
        build_esp(tmp_path / "esp.img", {"a.txt": b"a"})
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("root_files", "cmdline", "message"),
    [
        ({"../escape": b"x"}, "quiet", "relative path inside it"),
        ({"/etc/passwd": b"x"}, "quiet", "relative path inside it"),
        ({"a": b"x"}, "quiet $x", r"kernel command line holds '\$'"),
    ],
)
def test_bad_disk_input_is_refused_before_anything_is_written(
    tmp_path: Path,
    boot_chain: BootChain,
    guest: Guest,
    root_files: dict[str, bytes],
    cmdline: str,
    message: str,
) -> None:
    guest_boot = GuestBoot(guest.kernel, guest.initrd, cmdline)
    with pytest.raises(UsageError, match=message):
        build_boot_disk(tmp_path / "d.img", boot_chain, guest_boot, root_files)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["EFI/../x", "EFI/a b", "/EFI/x", "EFI/x;y"])
def test_a_bad_esp_file_name_is_refused_before_anything_is_written(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(UsageError, match="relative path of letters"):
        build_esp(tmp_path / "esp.img", {name: b"x"})
    assert _leftovers(tmp_path) == []


def test_an_existing_destination_is_left_alone(
    tmp_path: Path, boot_chain: BootChain, guest: Guest
) -> None:
    dest = tmp_path / "disk.img"
    dest.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        build_boot_disk(dest, boot_chain, GuestBoot(guest.kernel, guest.initrd), {})
    assert dest.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == ["disk.img"]


def test_a_boot_chain_that_differs_from_its_manifest_is_refused(
    tmp_path: Path, boot_chain: BootChain
) -> None:
    copy = tmp_path / "efi"
    copy.mkdir()
    for path in (boot_chain.shim, boot_chain.grub, boot_chain.shim.parent / "manifest"):
        shutil.copyfile(path, copy / path.name)
    assert load_boot_chain(copy).manifest == boot_chain.manifest
    _grub_with_one_byte_changed(copy / "grubx64.efi", copy / "grubx64.efi")
    with pytest.raises(VerificationError, match=r"grubx64\.efi does not match grub_sha256"):
        load_boot_chain(copy)
    (copy / "BOOTX64.EFI").unlink()
    with pytest.raises(UsageError, match=r"BOOTX64\.EFI is missing"):
        load_boot_chain(copy)


def test_the_command_line_entry_builds_a_disk(
    tmp_path: Path, boot_chain: BootChain, guest: Guest
) -> None:
    dest = tmp_path / "tpl.img"
    status = efi_disk.main(
        [
            str(dest),
            "--boot-chain",
            str(boot_chain.shim.parent),
            "--kernel",
            str(guest.kernel),
            "--initramfs",
            str(guest.initrd),
            "--marker",
            "cli-marker",
        ]
    )
    assert status == 0
    layout: PartitionLayout = efi_disk.plan_layout(
        efi_disk.DEFAULT_ESP_MIB, efi_disk.DEFAULT_ROOT_MIB
    )
    root = _partition(dest, layout.root_offset, layout.root_size, tmp_path / "root.img")
    shown = subprocess.run(
        ["debugfs", "-R", "cat /marker.txt", str(root)], capture_output=True, check=True
    )
    assert shown.stdout == b"cli-marker\n"
