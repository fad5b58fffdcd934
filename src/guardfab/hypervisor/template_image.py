"""Build a bare template disk: a raw ext4 image holding given files (``mke2fs -d``).

A disk with no boot loader: for VMs whose kernel QEMU loads itself
(encryption-supported and normal VMs) and for tests of the disk layer. A
shielded VM's template carries its signed boot chain and is built by
:mod:`guardfab.hypervisor.efi_disk` (ADR 0013). Either is what a publisher signs
with ``guardfab template protect`` and what the fabric copies into a VM's
LUKS-encrypted OS disk. The test guest reads ``marker.txt`` from it and shows it
on its page, so a test can tell that the VM really booted from this disk -- and
grep the host's files for the marker to prove the copy on the host is encrypted.

Run as ``python -m guardfab.hypervisor.template_image OUT --marker TEXT``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from guardfab.errors import UsageError
from guardfab.hypervisor.errors import HypervisorError

MKE2FS = "mke2fs"
MARKER_FILE = "marker.txt"
DEFAULT_SIZE_MIB = 16


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise UsageError(f"template file name {name!r} must be a relative path inside the disk")
    return path


def build_template(
    dest: Path,
    files: Mapping[str, bytes],
    *,
    size_mib: int = DEFAULT_SIZE_MIB,
    label: str = "guardfab-tpl",
) -> None:
    """Create the raw ext4 image ``dest`` of ``size_mib`` MiB holding ``files``.

    Raises:
        UsageError: ``dest`` exists or a file name leaves the disk's root.
        HypervisorError: mke2fs failed (for instance, the files do not fit).
    """
    if dest.exists():
        raise UsageError(f"{dest} already exists", hint="choose another path or remove it first")
    with tempfile.TemporaryDirectory(prefix="guardfab-template-") as tmp:
        root = Path(tmp)
        for name, content in files.items():
            path = root.joinpath(*_safe_relative(name).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        argv = [MKE2FS, "-q", "-t", "ext4", "-L", label, "-E", "root_owner=0:0", "-d", str(root)]
        try:
            result = subprocess.run(  # noqa: S603 -- fixed argv, no shell
                [*argv, str(dest), f"{size_mib}M"], capture_output=True, check=False, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HypervisorError(f"mke2fs did not run: {exc}") from exc
    if result.returncode != 0:
        dest.unlink(missing_ok=True)
        message = result.stderr.decode(errors="replace").strip()
        raise HypervisorError(f"mke2fs failed to build {dest}: {message}")


def build_marker_template(dest: Path, marker: str, *, size_mib: int = DEFAULT_SIZE_MIB) -> None:
    """A template whose ``marker.txt`` holds ``marker`` (what the test guest shows)."""
    build_template(dest, {MARKER_FILE: marker.encode() + b"\n"}, size_mib=size_mib)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build a marker template."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("dest", type=Path, help="the raw image to create")
    parser.add_argument("--marker", required=True, help="text of marker.txt")
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB)
    args = parser.parse_args(argv)
    build_marker_template(args.dest, args.marker, size_mib=args.size_mib)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
