"""LUKS-encrypted VM disks in QEMU's native format, opened with keys that never touch argv.

Images are qcow2 files with QEMU's built-in LUKS encryption
(``encrypt.format=luks``). Each disk has its own random 256-bit key; its
passphrase is the key's hex (LUKS passphrases must be valid UTF-8). Because
the key is random, the key-derivation cost can be minimal
(``encrypt.iter-time=10`` ms: unlocking takes 0.01 s instead of about 2 s);
PBKDF stretching protects guessable passwords, and these are not guessable.

Secrets reach the tools as file descriptors only:

* ``qemu-img`` reads the passphrase from an inherited pipe
  (``--object secret,file=/proc/self/fd/N``);
* a running QEMU receives the pipe over its QMP socket (``add-fd`` with
  SCM_RIGHTS), reads it with ``object-add secret``, opens the disk with
  ``blockdev-add``, and the secret object is deleted at once;
* plaintext content (a specialization disk's answer file) goes to ``qemu-img``
  from a memfd, so no plaintext file ever exists on the host's disks.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from guardfab.errors import UsageError
from guardfab.hypervisor.argv import root_port_id
from guardfab.hypervisor.errors import DiskKeyError, HypervisorError, QmpCommandError
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.secretfd import secret_pipe
from guardfab.hypervisor.spec import DiskSpec

KEY_SIZE = 32
#: Milliseconds of PBKDF2 per unlock: minimal, because the keys are random 256-bit values.
LUKS_ITER_TIME_MS = 10
QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT = 600.0
#: QEMU 7.2 benchmarks PBKDF2 when it creates a LUKS header and gives up when its
#: first round measured 0 ms of the thread's user time (millisecond resolution,
#: tick-based accounting). On a busy 2-core host that happened in 8 of 12 runs;
#: a failed run costs about 40 ms, so the runtime simply tries again, many times.
_FLAKY_BENCHMARK = "Unable to get accurate CPU usage"
_ATTEMPTS = 40
#: Sector size: raw images handed to qemu-img are padded to a multiple of it.
_SECTOR = 512


class DiskKey:
    """A disk's 256-bit key. Its ``repr`` never shows the key."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if len(material) != KEY_SIZE:
            raise ValueError(f"a disk key is {KEY_SIZE} bytes")
        self._material = bytes(material)

    @classmethod
    def generate(cls) -> DiskKey:
        """A fresh random key."""
        return cls(secrets.token_bytes(KEY_SIZE))

    @property
    def material(self) -> bytes:
        """The raw key, for the VM's key vault."""
        return self._material

    def passphrase(self) -> bytes:
        """The LUKS passphrase: the key in lowercase hex (valid UTF-8, as LUKS needs)."""
        return self._material.hex().encode()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiskKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(("DiskKey", id(self)))

    def __repr__(self) -> str:
        return "DiskKey(<redacted>)"


def _luks_options() -> str:
    return f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={LUKS_ITER_TIME_MS}"


def _run_qemu_img(args: list[str], key: DiskKey, *, extra_fds: tuple[int, ...] = ()) -> None:
    """Run ``qemu-img`` with ``key`` as secret ``sec0`` from a pipe; retry a flaky benchmark.

    Raises:
        HypervisorError: qemu-img failed (its message holds paths, never the key).
    """
    message = ""
    for _attempt in range(_ATTEMPTS):
        with secret_pipe(key.passphrase()) as fd:
            secret = f"secret,id=sec0,file=/proc/self/fd/{fd}"
            argv = [QEMU_IMG, args[0], "--object", secret, *args[1:]]
            try:
                result = subprocess.run(  # noqa: S603 -- fixed argv, no shell
                    argv,
                    pass_fds=(fd, *extra_fds),
                    umask=0o077,  # qemu-img recreates the image: keep it 0600
                    capture_output=True,
                    timeout=QEMU_IMG_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HypervisorError(f"qemu-img {args[0]} did not run: {exc}") from exc
        if result.returncode == 0:
            return
        message = result.stderr.decode(errors="replace").strip()
        if _FLAKY_BENCHMARK not in message:
            break
    raise HypervisorError(f"qemu-img {args[0]} failed: {message or 'no message'}")


@contextlib.contextmanager
def _new_image(dest: Path) -> Iterator[Path]:
    """Reserve ``dest`` as an empty 0600 file; remove it if the block fails."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise UsageError(f"disk image {dest} already exists") from exc
    except OSError as exc:
        raise UsageError(f"cannot create disk image {dest}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield dest
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def create_encrypted_copy(template: Path, dest: Path, key: DiskKey) -> None:
    """Copy a raw template disk into a new LUKS qcow2 image under ``key``.

    The template is read as raw on purpose: probing the format of an image
    could let a crafted file name a backing file elsewhere on the host.
    """
    if not template.is_file():
        raise UsageError(f"template disk {template} does not exist")
    with _new_image(dest):
        args = ["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", _luks_options()]
        _run_qemu_img([*args, str(template), str(dest)], key)


def copy_template_privately(template: Path, dest: Path) -> None:
    """Copy ``template`` once into ``dest`` (new, 0600) for verifying and converting.

    Whoever can write the template's location could otherwise swap the file
    between its verification and the copy QEMU reads: verifying and converting
    this private copy closes that window. The source is opened without following
    a final symlink and must be a regular file (not a FIFO or device that reads
    differently twice). ``dest`` is removed if the copy fails.

    Raises:
        UsageError: the template is missing, a symlink, not a regular file or unreadable.
    """
    try:
        source_fd = os.open(template, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot open template disk {template}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(source_fd).st_mode):
        os.close(source_fd)
        raise UsageError(f"template disk {template} is not a regular file")
    # The source is a file descriptor; dest was reserved 0600 by _new_image.
    with (
        open(source_fd, "rb") as source,  # noqa: PTH123
        _new_image(dest),
        open(dest, "wb") as copy,  # noqa: PTH123
    ):
        try:
            shutil.copyfileobj(source, copy, 1024 * 1024)
            copy.flush()
        except OSError as exc:
            raise UsageError(f"cannot copy template disk {template}: {exc.strerror}") from exc


def create_encrypted_blank(dest: Path, size: int, key: DiskKey) -> None:
    """Create an empty LUKS qcow2 image of ``size`` bytes (a data disk)."""
    with _new_image(dest):
        args = ["create", "-q", "-f", "qcow2", "-o", _luks_options(), str(dest), str(size)]
        _run_qemu_img(args, key)


def create_encrypted_from_bytes(data: bytes, dest: Path, key: DiskKey) -> None:
    """Write ``data`` (padded to whole sectors) as a new LUKS qcow2 image.

    The plaintext lives only in a memfd (anonymous memory) that qemu-img reads
    as ``/proc/self/fd/N``: it never reaches a file system.
    """
    padded = data.ljust(max(_SECTOR, -(-len(data) // _SECTOR) * _SECTOR), b"\0")
    memfd = os.memfd_create("guardfab-disk-content", os.MFD_CLOEXEC)
    try:
        view = memoryview(padded)
        while view:
            view = view[os.write(memfd, view) :]
        with _new_image(dest):
            args = ["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", _luks_options()]
            _run_qemu_img([*args, f"/proc/self/fd/{memfd}", str(dest)], key, extra_fds=(memfd,))
    finally:
        os.close(memfd)


def node_name(device_id: str) -> str:
    """The block node behind a disk device."""
    return f"node-{device_id}"


def secret_id(device_id: str) -> str:
    """The QEMU secret object that holds a disk's passphrase while QEMU needs it."""
    return f"sec-{device_id}"


def _add_secret(qmp: QmpClient, object_id: str, data: bytes) -> None:
    """Create secret object ``object_id`` in QEMU from a pipe passed over QMP."""
    with secret_pipe(data) as fd:
        added = qmp.execute("add-fd", {"opaque": f"guardfab {object_id}"}, fds=[fd])
    try:
        secret = {"qom-type": "secret", "id": object_id, "file": f"/proc/self/fd/{added['fd']}"}
        qmp.execute("object-add", secret)
    finally:
        qmp.execute("remove-fd", {"fdset-id": added["fdset-id"]})


def remove_disk_secret(qmp: QmpClient, device_id: str) -> None:
    """Delete a disk's secret object from QEMU (a missing one is fine)."""
    with contextlib.suppress(QmpCommandError):
        qmp.execute("object-del", {"id": secret_id(device_id)})


@contextlib.contextmanager
def disk_secrets(
    qmp: QmpClient, disks: Sequence[DiskSpec], keys: Mapping[str, DiskKey]
) -> Iterator[None]:
    """Lend QEMU the encrypted disks' secrets for an operation that reopens the images.

    QEMU reopens a qcow2 image (and so needs its LUKS secret again) when it
    re-activates the disks: on a live-migration source whose migration failed
    late, and on the destination when the guest takes over.
    """
    lent = []
    try:
        for disk in disks:
            if disk.encrypted:
                _add_secret(qmp, secret_id(disk.device_id), keys[disk.device_id].passphrase())
                lent.append(disk.device_id)
        yield
    finally:
        for device_id in lent:
            remove_disk_secret(qmp, device_id)


def _open_encrypted(
    qmp: QmpClient, disk: DiskSpec, blockdev: dict[str, Any], key: DiskKey, *, keep_secret: bool
) -> None:
    object_id = secret_id(disk.device_id)
    _add_secret(qmp, object_id, key.passphrase())
    opened = False
    try:
        encrypt = {"format": "luks", "key-secret": object_id}
        qmp.execute("blockdev-add", {**blockdev, "encrypt": encrypt})
        opened = True
    except QmpCommandError as exc:
        reason = exc.description.lower()
        if "password" in reason or "keyslot" in reason:
            message = f"the key does not open disk {disk.device_id} ({disk.path})"
            raise DiskKeyError(message) from None
        raise
    finally:
        if not (opened and keep_secret):
            remove_disk_secret(qmp, disk.device_id)


def blockdev_options(disk: DiskSpec) -> dict[str, Any]:
    """``blockdev-add``'s arguments for ``disk`` (without its encryption).

    ``"backing": None``: guardfab never makes an image with a backing file, and
    one named in a header edited on shared storage would have QEMU (root) open
    that file -- any file of the host -- for the guest to read.
    """
    return {
        "driver": "qcow2",
        "node-name": node_name(disk.device_id),
        "file": {"driver": "file", "filename": str(disk.path)},
        "backing": None,
    }


def attach_disk(
    qmp: QmpClient, disk: DiskSpec, key: DiskKey | None, *, keep_secret: bool = False
) -> None:
    """Open ``disk`` in a QEMU (paused or running) and plug it into its root port.

    The secret object is deleted as soon as the image is open, unless
    ``keep_secret`` (a migration destination, which reopens the image when it
    takes over: remove it afterwards with :func:`remove_disk_secret`).

    Raises:
        DiskKeyError: ``key`` does not open the LUKS image.
        UsageError: an encrypted disk came without a key.
        HypervisorError: QEMU refused the disk for another reason (missing, locked, damaged).
    """
    blockdev = blockdev_options(disk)
    if disk.encrypted:
        if key is None:
            raise UsageError(f"disk {disk.device_id} is encrypted and no key was given")
        _open_encrypted(qmp, disk, blockdev, key, keep_secret=keep_secret)
    else:
        qmp.execute("blockdev-add", blockdev)
    device = {
        "driver": "virtio-blk-pci",
        "id": disk.device_id,
        "drive": node_name(disk.device_id),
        "bus": root_port_id(disk.device_id),
    }
    qmp.execute("device_add", device)
