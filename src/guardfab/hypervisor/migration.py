"""Live migration between two QEMU processes over TLS with a pre-shared key.

The memory stream is never sent in clear: both ends get a ``tls-creds-psk``
object and ``migrate-set-parameters {"tls-creds": ...}``, so a destination
refuses any stream that does not open with a TLS handshake under the same key,
and a wrong key fails at the handshake before any memory leaves the source.
The vTPM's part of the stream is encrypted once more by swtpm under the VM's
migration key (``--migration-key``, the same on both ends; see
:mod:`guardfab.hypervisor.vtpm`).

QEMU reads the key from ``DIR/keys.psk``, so the key file lives in a 0700
directory on tmpfs (never on a disk), 0600, for as short a time as QEMU allows:
the client reads it when its credentials object is created (deleted right
after); the server reads it at each handshake (deleted once the source is
connected, or when the destination gives up).

The destination is started with ``-incoming defer`` (:meth:`QemuVm.start` with
``incoming=True``), its own fresh swtpm and the same disks; the runtime opens
the disks there before the stream arrives. After a failed migration the
source is resumed if it was paused, so the VM keeps running where it was.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardfab.hypervisor.disk import DiskKey, disk_secrets
from guardfab.hypervisor.errors import HypervisorError, QmpCommandError
from guardfab.hypervisor.vm import QemuVm

PSK_SIZE = 32
PSK_USERNAME = "guardfab"
TLS_OBJECT_ID = "guardfab-migration-tls"
MIGRATION_TIMEOUT = 120.0
#: Places that are tmpfs on a typical Linux host, in order of preference.
_TMPFS_CANDIDATES = (Path("/run/user/0"), Path("/run"), Path("/dev/shm"))  # noqa: S108 -- mkdtemp inside
_POLL = 0.05


class MigrationError(HypervisorError):
    """A live migration failed; the VM still runs on the source (or was never moved)."""

    hint = "the VM keeps running on the source; check both hosts' qemu.log, then retry"


@dataclass(frozen=True)
class MigrationStats:
    """What QEMU reported for a completed migration (milliseconds, bytes)."""

    total_time_ms: int
    downtime_ms: int
    transferred_bytes: int


def _filesystem_type(path: Path) -> str | None:
    """The type of the file system that holds ``path`` (longest mount point prefix)."""
    best, fstype = "", None
    resolved = str(path.resolve())
    with Path("/proc/self/mounts").open() as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype


def tmpfs_directory() -> Path:
    """A writable directory on tmpfs for short-lived key files.

    Raises:
        HypervisorError: no tmpfs is mounted where expected.
    """
    for candidate in _TMPFS_CANDIDATES:
        if candidate.is_dir() and _filesystem_type(candidate) == "tmpfs":
            return candidate
    raise HypervisorError(
        "no tmpfs found for the migration key file (tried /run/user/0, /run, /dev/shm)",
        hint="mount a tmpfs on /run or /dev/shm",
    )


@contextlib.contextmanager
def psk_directory(psk: bytes) -> Iterator[Path]:
    """A 0700 tmpfs directory holding ``keys.psk`` (0600) for QEMU; removed on exit."""
    if len(psk) != PSK_SIZE:
        raise ValueError(f"the migration key must be {PSK_SIZE} bytes")
    directory = Path(tempfile.mkdtemp(prefix="guardfab-psk-", dir=tmpfs_directory()))
    try:
        key_file = directory / "keys.psk"
        key_file.touch(mode=0o600)
        key_file.write_text(f"{PSK_USERNAME}:{psk.hex()}\n")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def new_migration_psk() -> bytes:
    """A fresh random pre-shared key for one migration."""
    return secrets.token_bytes(PSK_SIZE)


def stream_uri(address: str, port: int) -> str:
    """QEMU's migration URI for a TCP address (IPv6 in brackets)."""
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def _use_tls(vm: QemuVm, endpoint: str, directory: Path) -> None:
    """(Re)create the VM's TLS credentials from ``directory`` and make migration use them."""
    with contextlib.suppress(QmpCommandError):
        vm.qmp.execute("object-del", {"id": TLS_OBJECT_ID})
    creds = {
        "qom-type": "tls-creds-psk",
        "id": TLS_OBJECT_ID,
        "endpoint": endpoint,
        "dir": str(directory),
    }
    if endpoint == "client":
        # The client names its key; the server finds it by that name in keys.psk.
        creds["username"] = PSK_USERNAME
    vm.qmp.execute("object-add", creds)
    vm.qmp.execute("migrate-set-parameters", {"tls-creds": TLS_OBJECT_ID})


class IncomingMigration:
    """The destination's side: TLS credentials, the listening port, the key file's life.

    Args:
        dest: a VM started with ``incoming=True`` (its disks already opened).
        psk: the migration's pre-shared key.
        port: the port to listen on.
        address: the address to listen on (an IP address of this host).
    """

    def __init__(self, dest: QemuVm, psk: bytes, port: int, address: str = "127.0.0.1") -> None:
        self.dest = dest
        self.uri = stream_uri(address, port)
        self._psk = psk
        self._stack = contextlib.ExitStack()

    def listen(self) -> None:
        """Listen for the stream; only a TLS handshake under the PSK will be accepted."""
        status = self.dest.status()
        if status != "inmigrate":
            raise MigrationError(f"VM {self.dest.spec.name} is {status}, not waiting for a stream")
        directory = self._stack.enter_context(psk_directory(self._psk))
        _use_tls(self.dest, "server", directory)
        self.dest.qmp.execute("migrate-incoming", {"uri": self.uri})

    def forget_psk(self) -> None:
        """Delete the server's key file (call once the source has connected)."""
        self._stack.close()

    def finish(self, timeout: float = MIGRATION_TIMEOUT) -> None:
        """Wait until the whole stream has arrived, then run the guest here."""
        deadline = time.monotonic() + timeout
        while (status := self.dest.status()) == "inmigrate":
            if not self.dest.running or time.monotonic() > deadline:
                raise MigrationError(f"VM {self.dest.spec.name} did not receive its state")
            time.sleep(_POLL)
        self.forget_psk()
        if status != "running":
            self.dest.resume()
        # Running means the disks are active again: their secrets are no longer needed.
        self.dest.forget_disk_secrets()


def _query(vm: QemuVm) -> dict[str, Any]:
    result: dict[str, Any] = vm.qmp.execute("query-migrate")
    return result


def _keep_running(source: QemuVm) -> None:
    """After a failed migration the source may be paused: run it again."""
    with contextlib.suppress(HypervisorError):
        if source.status() in {"paused", "postmigrate", "finish-migrate"}:
            source.resume()


def _wait_migrated(
    source: QemuVm, timeout: float, on_connected: Callable[[], None]
) -> MigrationStats:
    deadline = time.monotonic() + timeout
    connected = False
    while True:
        info = _query(source)
        status = info.get("status", "none")
        if status in {"active", "device", "completed"} and not connected:
            connected = True
            on_connected()
        if status == "completed":
            ram = info.get("ram", {})
            return MigrationStats(
                int(info.get("total-time", 0)),
                int(info.get("downtime", 0)),
                int(ram.get("transferred", 0)),
            )
        if status in {"failed", "cancelled"}:
            reason = info.get("error-desc", status)
            raise MigrationError(f"migration of VM {source.spec.name} failed: {reason}")
        if time.monotonic() > deadline:
            with contextlib.suppress(HypervisorError):
                source.qmp.execute("migrate_cancel")
            raise MigrationError(f"migration of VM {source.spec.name} timed out")
        time.sleep(_POLL)


def send_migration(
    source: QemuVm,
    psk: bytes,
    uri: str,
    disk_keys: Mapping[str, DiskKey],
    *,
    timeout: float = MIGRATION_TIMEOUT,
    on_connected: Callable[[], None] = lambda: None,
) -> MigrationStats:
    """Send the running ``source`` VM to ``uri`` over TLS-PSK.

    ``disk_keys`` are lent to the source's QEMU for the migration's length: if
    it fails after the disks were handed over, QEMU reopens them to run on.

    Raises:
        MigrationError: the handshake or the transfer failed; ``source`` runs on.
    """
    with psk_directory(psk) as directory:
        _use_tls(source, "client", directory)
    with disk_secrets(source.qmp, source.spec.disks, disk_keys):
        try:
            source.qmp.execute("migrate", {"uri": uri})
            return _wait_migrated(source, timeout, on_connected)
        except HypervisorError:
            _keep_running(source)
            raise


def live_migrate(
    source: QemuVm,
    incoming: IncomingMigration,
    psk: bytes,
    disk_keys: Mapping[str, DiskKey],
    *,
    timeout: float = MIGRATION_TIMEOUT,
) -> MigrationStats:
    """Move a running VM from ``source`` to the listening destination, then stop the source.

    Raises:
        MigrationError: the migration failed; the VM still runs on ``source``.
    """
    stats = send_migration(
        source, psk, incoming.uri, disk_keys, timeout=timeout, on_connected=incoming.forget_psk
    )
    try:
        incoming.finish(timeout)
    except HypervisorError as exc:
        # The source sent everything but the destination did not take over (it
        # refused the vTPM state, say): the source, paused after the hand-over,
        # takes its disks back -- which reopens them -- and runs on.
        incoming.forget_psk()
        with disk_secrets(source.qmp, source.spec.disks, disk_keys):
            _keep_running(source)
        raise MigrationError(
            f"VM {source.spec.name} was sent but the destination did not take over: {exc}"
        ) from exc
    source.stop()
    incoming.dest.forward_host_port()
    return stats
