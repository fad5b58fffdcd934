"""Build a template disk that boots through the signed UEFI chain (shim -> grub -> kernel).

Direct kernel boot (``-kernel``) is not verified by OVMF even with secure boot
on. A disk built here is: GPT; partition 1 an EFI system partition (FAT)
holding Debian's shim as ``EFI/BOOT/BOOTX64.EFI`` (signed by Microsoft's UEFI
CA, which OVMF's ``.ms`` variables trust), Debian's grub as
``EFI/BOOT/grubx64.efi`` (signed by Debian's key, built into that shim), the
``EFI/debian/grub.cfg`` that Debian's signed grub reads, and the guest's
Debian-signed kernel and initramfs; partition 2 an ext4 root filesystem with
the template's files. Who verifies what is in docs/adr (secure boot chain).

The tools are Debian's ``mkfs.fat`` and ``mmd``/``mcopy`` (dosfstools,
mtools), ``sfdisk`` (fdisk) and ``mke2fs`` (e2fsprogs), run without a shell.
A disk is built in a scratch directory next to ``dest`` and renamed into place
only when complete: on any failure nothing is left behind.

Run as ``python -m guardfab.hypervisor.efi_disk OUT --boot-chain DIR --kernel
VMLINUZ --initramfs INITRD --marker TEXT``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from guardfab.errors import UsageError, VerificationError
from guardfab.hypervisor.errors import HypervisorError

#: GPT partition type GUIDs: the EFI system partition and a Linux filesystem.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SECTOR = 512
MIB = 1024 * 1024
#: Partitions start on MiB boundaries; the first MiB holds the protective MBR and
#: the GPT, the last MiB leaves room for the backup GPT.
ALIGN_SECTORS = MIB // SECTOR
DEFAULT_ESP_MIB = 64
DEFAULT_ROOT_MIB = 16
DEFAULT_CMDLINE = "quiet"
MARKER_FILE = "marker.txt"

#: Where firmware looks on removable media: shim, which then loads grubx64.efi
#: from its own directory (no fbx64.efi is present, so no fallback dance).
SHIM_PATH = "EFI/BOOT/BOOTX64.EFI"
GRUB_PATH = "EFI/BOOT/grubx64.efi"
#: Debian's signed grub has the prefix /EFI/debian built in.
GRUB_CFG_PATH = "EFI/debian/grub.cfg"
KERNEL_PATH = "vmlinuz"
INITRAMFS_PATH = "initramfs.gz"

#: Characters a kernel command line word may hold. grub.cfg is parsed like a
#: shell ($, quotes, ;, braces, #, backslash mean something), so anything else
#: is refused rather than quoted.
_CMDLINE_WORD = re.compile(r"[A-Za-z0-9._,:=/+@%-]+")
_FAT_NAME = re.compile(r"[A-Za-z0-9._-]+")
_TOOL_TIMEOUT = 120


class DiskToolError(HypervisorError):
    """A disk tool (mkfs.fat, mmd, mcopy, sfdisk, mke2fs) failed or did not run.

    Attributes:
        tool: the program's name, e.g. ``mcopy``.
    """

    hint = "install dosfstools, mtools, fdisk and e2fsprogs; check the free space and sizes"

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(f"{tool} {message}")
        self.tool = tool


@dataclass(frozen=True)
class BootChain:
    """Debian's signed shim and grub, as ``scripts/build-boot-chain.sh`` leaves them.

    Attributes:
        shim: shimx64.efi.signed (becomes ``EFI/BOOT/BOOTX64.EFI``).
        grub: grubx64.efi.signed (becomes ``EFI/BOOT/grubx64.efi``).
        manifest: the build's manifest text (package versions, SHA-256s).
    """

    shim: Path
    grub: Path
    manifest: str


@dataclass(frozen=True)
class GuestBoot:
    """What grub starts: the guest's kernel, its initramfs and the kernel command line."""

    kernel: Path
    initramfs: Path
    cmdline: str = DEFAULT_CMDLINE


@dataclass(frozen=True)
class PartitionLayout:
    """Where the partitions of a built disk are, in bytes (for tools that read one of them)."""

    esp_offset: int
    esp_size: int
    root_offset: int
    root_size: int
    disk_size: int


def _manifest_fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def load_boot_chain(directory: Path) -> BootChain:
    """The boot chain in ``directory``, its files checked against the manifest's SHA-256s.

    Raises:
        UsageError: the directory, a binary or the manifest is missing.
        VerificationError: a binary differs from the one the manifest recorded.
    """
    manifest_path = directory / "manifest"
    chain = BootChain(directory / "BOOTX64.EFI", directory / "grubx64.efi", "")
    for path in (manifest_path, chain.shim, chain.grub):
        if not path.is_file():
            raise UsageError(f"{path} is missing", hint="run scripts/build-boot-chain.sh")
    manifest = manifest_path.read_text()
    fields = _manifest_fields(manifest)
    for key, path in (("shim_sha256", chain.shim), ("grub_sha256", chain.grub)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if fields.get(key) != digest:
            raise VerificationError(
                f"{path} does not match {key} in {manifest_path}",
                hint="run scripts/build-boot-chain.sh --force",
            )
    return BootChain(chain.shim, chain.grub, manifest)


def grub_config(cmdline: str) -> bytes:
    """The grub.cfg that boots ``/vmlinuz`` with ``cmdline`` at once.

    Raises:
        UsageError: a word of ``cmdline`` holds a character grub.cfg would interpret.
    """
    for word in cmdline.split():
        if not _CMDLINE_WORD.fullmatch(word):
            bad = sorted({c for c in word if not _CMDLINE_WORD.fullmatch(c)})
            raise UsageError(
                f"the kernel command line holds {''.join(bad)!r}, which grub.cfg would interpret",
                hint="use letters, digits and . _ , : = / + @ % - in kernel parameters",
            )
    lines = [
        "# Written by guardfab.hypervisor.efi_disk: boot the guest at once.",
        "set timeout=0",
        " ".join(["linux", f"/{KERNEL_PATH}", *cmdline.split()]),
        f"initrd /{INITRAMFS_PATH}",
        "boot",
    ]
    return ("\n".join(lines) + "\n").encode()


def _relative(name: str, what: str, *, fat: bool = False) -> PurePosixPath:
    path = PurePosixPath(name)
    bad_part = any(part == ".." or (fat and not _FAT_NAME.fullmatch(part)) for part in path.parts)
    if path.is_absolute() or not path.parts or bad_part:
        rule = "of letters, digits and . _ -" if fat else "inside it"
        raise UsageError(f"{what} file name {name!r} must be a relative path {rule}")
    return path


def _run(tool: str, args: list[str], *, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
    try:
        result = subprocess.run(  # noqa: S603 -- fixed argv, no shell
            [tool, *args],
            input=b"" if stdin is None else stdin,  # a tool that asks gets EOF, never our stdin
            capture_output=True,
            check=False,
            timeout=_TOOL_TIMEOUT,
            env=env,
        )
    except FileNotFoundError as exc:
        raise DiskToolError(tool, "is not installed") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskToolError(tool, f"did not run: {exc}") from exc
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
        raise DiskToolError(tool, f"failed: {message}")
    return result.stdout


@contextlib.contextmanager
def _building(dest: Path) -> Iterator[Path]:
    """A scratch directory next to ``dest``; its ``out`` file becomes ``dest`` on success."""
    exists = UsageError(f"{dest} already exists", hint="choose another path or remove it first")
    if dest.exists():
        raise exists
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise UsageError(f"cannot write in {dest.parent}: {exc.strerror}") from exc
    try:
        yield work
        try:
            # A hard link, not a rename: it never replaces a file made meanwhile.
            dest.hardlink_to(work / "out")
        except FileExistsError:
            raise exists from None
    except OSError as exc:  # staging files, the copy into the disk (disk full, say)
        raise HypervisorError(f"cannot build {dest}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _esp_paths(files: Mapping[str, bytes]) -> dict[str, PurePosixPath]:
    """Each ESP file's path, checked: relative, FAT-safe, unique on a case-blind FAT."""
    paths: dict[str, PurePosixPath] = {}
    seen: dict[str, str] = {}
    for name in files:
        paths[name] = _relative(name, "ESP", fat=True)
        first = seen.setdefault(str(paths[name]).lower(), name)
        if first != name:
            raise UsageError(f"ESP file names {first!r} and {name!r} are the same file on FAT")
    return paths


def _make_esp(image: Path, files: Mapping[str, bytes], size_mib: int, staging: Path) -> None:
    paths = _esp_paths(files)
    _run("mkfs.fat", ["-C", "-n", "EFI", str(image), str(size_mib * 1024)])
    # FAT is case-blind: one mmd per directory, whatever spellings the files use.
    by_case = {str(p).lower(): str(p) for path in paths.values() for p in path.parents if p.parts}
    dirs = sorted(by_case.values(), key=len)
    if dirs:
        _run("mmd", ["-i", str(image), *[f"::/{d}" for d in dirs]])
    staging.mkdir()
    for index, (name, content) in enumerate(files.items()):
        source = staging / str(index)
        source.write_bytes(content)
        _run("mcopy", ["-i", str(image), str(source), f"::/{paths[name]}"])


def _make_ext4(image: Path, files: Mapping[str, bytes], size_mib: int, staging: Path) -> None:
    staging.mkdir()
    for name, content in files.items():
        path = staging.joinpath(*_relative(name, "root partition").parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    args = ["-q", "-t", "ext4", "-L", "guardfab-root", "-E", "root_owner=0:0", "-d", str(staging)]
    _run("mke2fs", [*args, str(image), f"{size_mib}M"])


def build_esp(dest: Path, files: Mapping[str, bytes], *, size_mib: int = DEFAULT_ESP_MIB) -> None:
    """Create the FAT image ``dest`` of ``size_mib`` MiB holding ``files`` (ESP path -> bytes).

    Raises:
        UsageError: ``dest`` exists or a file name is not a plain relative FAT path.
        DiskToolError: mkfs.fat, mmd or mcopy failed (for instance, the files do not fit).
    """
    _esp_paths(files)
    with _building(dest) as work:
        _make_esp(work / "out", files, size_mib, work / "files")


def boot_files(chain: BootChain, boot: GuestBoot) -> dict[str, bytes]:
    """The ESP's content: shim, grub, grub.cfg, the kernel and the initramfs."""
    return {
        SHIM_PATH: chain.shim.read_bytes(),
        GRUB_PATH: chain.grub.read_bytes(),
        GRUB_CFG_PATH: grub_config(boot.cmdline),
        KERNEL_PATH: boot.kernel.read_bytes(),
        INITRAMFS_PATH: boot.initramfs.read_bytes(),
    }


def plan_layout(esp_mib: int, root_mib: int) -> PartitionLayout:
    """The partitions' places: ESP after the first MiB, root right after it, one spare MiB."""
    if esp_mib < 1 or root_mib < 1:
        # Too small for the files is mcopy's or mke2fs's error (DiskToolError, naming the tool).
        raise UsageError(f"partition sizes must be at least 1 MiB, not {esp_mib} and {root_mib}")
    esp_offset = ALIGN_SECTORS * SECTOR
    root_offset = esp_offset + esp_mib * MIB
    root_size = root_mib * MIB
    return PartitionLayout(
        esp_offset, esp_mib * MIB, root_offset, root_size, root_offset + root_size + MIB
    )


def _sfdisk_script(layout: PartitionLayout) -> bytes:
    esp = f"start={layout.esp_offset // SECTOR}, size={layout.esp_size // SECTOR}"
    root = f"start={layout.root_offset // SECTOR}, size={layout.root_size // SECTOR}"
    return (
        "label: gpt\n"
        f'{esp}, type={ESP_TYPE}, name="EFI system partition"\n'
        f'{root}, type={LINUX_FS_TYPE}, name="guardfab root"\n'
    ).encode()


def _check_partition_table(disk: Path, layout: PartitionLayout) -> None:
    """Read the table back: sfdisk must have put the partitions exactly where planned."""
    table = json.loads(_run("sfdisk", ["--json", str(disk)]))["partitiontable"]
    found = [(p["start"], p["size"], p["type"].upper()) for p in table["partitions"]]
    wanted = [
        (layout.esp_offset // SECTOR, layout.esp_size // SECTOR, ESP_TYPE),
        (layout.root_offset // SECTOR, layout.root_size // SECTOR, LINUX_FS_TYPE),
    ]
    if table.get("label") != "gpt" or found != wanted:
        raise DiskToolError("sfdisk", f"wrote partitions {found}, not {wanted}")


def _copy_sparse(source: Path, disk: Path, offset: int, size: int) -> None:
    """Copy ``source`` into ``disk`` at ``offset``, skipping zero blocks (the disk is sparse)."""
    if source.stat().st_size != size:
        # mkfs.fat -C and mke2fs make images of exactly the size asked: anything else
        # would spill into the next partition.
        raise HypervisorError(f"{source.name} is {source.stat().st_size} bytes, not {size}")
    block = MIB
    zero = bytes(block)
    with source.open("rb") as src, disk.open("r+b") as out:
        position = offset
        while chunk := src.read(block):
            if chunk != zero[: len(chunk)]:
                out.seek(position)
                out.write(chunk)
            position += len(chunk)


def build_boot_disk(
    dest: Path,
    chain: BootChain,
    boot: GuestBoot,
    root_files: Mapping[str, bytes],
    *,
    esp_mib: int = DEFAULT_ESP_MIB,
    root_mib: int = DEFAULT_ROOT_MIB,
) -> PartitionLayout:
    """Create the raw GPT disk ``dest``: a bootable ESP and an ext4 root holding ``root_files``.

    Raises:
        UsageError: ``dest`` exists, a size is too small, a file name or the command line is bad.
        DiskToolError: a disk tool failed (the tool is named); ``dest`` is not created.
    """
    layout = plan_layout(esp_mib, root_mib)
    for name in root_files:
        _relative(name, "root partition")
    esp_content = boot_files(chain, boot)  # validates the command line before any work
    with _building(dest) as work:
        _make_esp(work / "esp.img", esp_content, esp_mib, work / "esp-files")
        _make_ext4(work / "root.img", root_files, root_mib, work / "root-files")
        disk = work / "out"
        with disk.open("wb") as out:
            out.truncate(layout.disk_size)
        _run(
            "sfdisk",
            ["--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
            stdin=_sfdisk_script(layout),
        )
        _check_partition_table(disk, layout)
        _copy_sparse(work / "esp.img", disk, layout.esp_offset, layout.esp_size)
        _copy_sparse(work / "root.img", disk, layout.root_offset, layout.root_size)
    return layout


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build a secure-boot template disk whose root holds a marker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dest", type=Path, help="the raw disk image to create")
    parser.add_argument(
        "--boot-chain", type=Path, required=True, help="scripts/build-boot-chain.sh's output"
    )
    parser.add_argument("--kernel", type=Path, required=True, help="the guest's signed vmlinuz")
    parser.add_argument("--initramfs", type=Path, required=True)
    parser.add_argument("--cmdline", default=DEFAULT_CMDLINE, help="the kernel command line")
    parser.add_argument("--marker", required=True, help="text of the root partition's marker.txt")
    parser.add_argument("--esp-mib", type=int, default=DEFAULT_ESP_MIB)
    parser.add_argument("--root-mib", type=int, default=DEFAULT_ROOT_MIB)
    args = parser.parse_args(argv)
    build_boot_disk(
        args.dest,
        load_boot_chain(args.boot_chain),
        GuestBoot(args.kernel, args.initramfs, args.cmdline),
        {MARKER_FILE: args.marker.encode() + b"\n"},
        esp_mib=args.esp_mib,
        root_mib=args.root_mib,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
