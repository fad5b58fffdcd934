"""Safe file output: atomic, permission-tight, never half-written.

A command that fails must leave nothing behind, so every file guardfab writes
goes to a temporary file in the destination directory first and is renamed
into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from guardfab.errors import FormatError, UsageError

#: Mode for files holding private keys or secrets.
PRIVATE = 0o600
#: Mode for public documents.
PUBLIC = 0o644


def atomic_write(path: Path, data: bytes, *, mode: int = PUBLIC, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` set before any byte is written.

    Raises:
        UsageError: ``path`` exists and ``overwrite`` is false, or its directory is missing.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UsageError(f"{path} already exists", hint="choose another path or remove it first")
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not overwrite and path.exists():
            raise UsageError(f"{path} already exists")
        Path(tmp_name).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp_name).unlink()
        raise


def read_bounded(path: Path, *, limit: int, what: str) -> bytes:
    """Read a whole file that must not exceed ``limit`` bytes.

    Raises:
        UsageError: the file is missing or unreadable.
        FormatError: the file is larger than ``limit``.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise FormatError(f"{what} {path} is larger than the limit of {limit} bytes")
    return data


def create_directory_atomically(target: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Create ``target`` holding ``files`` (name -> (data, mode)), completely or not at all.

    The files are written into a 0700 staging directory beside ``target``, which is
    renamed into place last; any failure removes the staging directory.

    Raises:
        UsageError: ``target`` already exists.
    """
    target = Path(target)
    if target.exists():
        raise UsageError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = target.parent / f".{target.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        for filename, (data, mode) in files.items():
            atomic_write(staging / filename, data, mode=mode)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
