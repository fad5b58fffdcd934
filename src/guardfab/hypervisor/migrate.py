"""Live-migrate a shielded VM to another guarded host, keys through the KPS.

The order is what makes it safe (issue 6):

1. the **destination** asks the KPS for the VM's keys with its *own* health
   certificate (its agent, or :class:`~guardfab.hypervisor.power.DirectKeySource`),
   sending the source's committed KP (then a pending one, if the KPS refuses
   the committed KP as spent: a failed migration before left it). A destination
   that cannot attest, or is refused, gets nothing: :class:`MigrationRefusedError`
   says why, before anything is written under the destination's VM directory
   and before a byte of memory leaves the source, which keeps running;
2. the destination opens the vault with the released current transport key
   (the same key the source sealed its vault under at its own power-on);
3. the destination's VM directory is made: ``vm.json``, the disks (the same
   images, hard links: the two "hosts" share storage, as live migration needs),
   the source's OVMF variable store; its QEMU starts with ``-incoming defer``
   and its own swtpm with the vault's vTPM keys;
4. the memory stream goes over TLS-PSK (:mod:`guardfab.hypervisor.migration`)
   under a PSK derived from the transport key: HKDF-SHA256, a fresh random salt
   per migration, ``info = "guardfab migration psk v1 " + name``. The PSK is
   never on a command line; it lives only in the runtime's 0700 tmpfs key file
   while QEMU needs it. The vTPM's state goes inside the stream, encrypted once
   more by swtpm under the vault's migration key;
5. on success the destination owns the VM: its vault re-sealed under the new
   transport key with the egress KP, committed; the source is stopped and its
   directory removed (the KPS refuses the source's KP from now on anyway).

If the stream fails after the release, the source runs on; the released pair
(vault under the new key, egress KP) is written to the *source's* store as a
pending pair, so the source can still power on later (the committed KP is
refused, the pending one is used: the crash path of ADR 0009) and migrate
again (step 1 falls back to the pending pair the same way). The
destination's directory is removed.

Both ends are driven from one process here (two hosts on one machine, ports on
127.0.0.1); between machines the destination's half would run in its agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guardfab.errors import GuardfabError, NotAuthorizedError, TransportError, UsageError
from guardfab.formats.key_protector import TransportKey
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.migration import (
    PSK_SIZE,
    IncomingMigration,
    MigrationError,
    MigrationStats,
    live_migrate,
)
from guardfab.hypervisor.power import RUN_FILE, _record_run, running_pid
from guardfab.hypervisor.provision import RECORD_FILE, KeySource, VmRecord, load_record
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.vault import (
    KeyPair,
    VaultContents,
    VaultStore,
    open_vault,
    seal_vault,
)
from guardfab.hypervisor.vm import STOP_TIMEOUT, QemuVm

_PSK_INFO = b"guardfab migration psk v1 "
SALT_SIZE = 32

#: Makes the destination's runtime from its spec and state directory.
DestinationFactory = Callable[[VmRecord, Path], QemuVm]


class MigrationRefusedError(NotAuthorizedError):
    """The destination got no keys: nothing was sent, the VM runs on at the source."""


@dataclass(frozen=True)
class MigrationResult:
    """What a completed migration reports (no secret in it)."""

    name: str
    destination_dir: Path
    stats: MigrationStats
    vm: QemuVm


def migration_psk(transport_key: TransportKey, salt: bytes, vm_name: str) -> bytes:
    """The TLS pre-shared key of one migration, derived from the VM's transport key."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"the migration salt must be {SALT_SIZE} bytes")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=PSK_SIZE,
        salt=salt,
        info=_PSK_INFO + vm_name.encode("utf-8"),
    )
    return hkdf.derive(transport_key.reveal())


def _destination_release(
    store: VaultStore, key_source: KeySource, name: str
) -> tuple[KeyPair, ReleasedKeys]:
    """The keys of the committed pair, or of the pending one a failed migration left.

    After a failed stream the source runs on with the KP it was started with
    committed, but the KPS has moved past it: the released pair was handed back
    as pending. A retry presents the committed KP (refused: rollback), then it.
    """
    refusals: list[GuardfabError] = []
    for pair in store.candidates():
        try:
            return pair, key_source.release(pair.kp)
        except TransportError:
            raise
        except GuardfabError as exc:
            refusals.append(exc)
    if not refusals:
        raise MigrationRefusedError(f"VM {name!r} has no key protector stored")
    first = refusals[0]
    raise MigrationRefusedError(
        f"VM {name!r} not migrated: the destination got no keys from the KPS ({first}); "
        "nothing was sent and the VM keeps running at the source",
        hint=first.hint or "make the destination attest (guardfab host attest) and retry",
    ) from first


def _prepare_destination(record: VmRecord, source_dir: Path, dest_dir: Path) -> None:
    """The destination's VM directory: record, disks (shared storage), NVRAM copy."""
    dest_dir.mkdir(mode=0o700, parents=True)
    (dest_dir / "disks").mkdir(mode=0o700)
    for disk in record.spec(source_dir).disks:
        try:
            os.link(disk.path, dest_dir / "disks" / disk.path.name)
        except OSError as exc:
            raise UsageError(
                f"VM {record.name!r}: the destination cannot reach disk {disk.device_id} "
                f"({exc.strerror})",
                hint="live migration needs the VM directories on shared storage",
            ) from exc
    path = dest_dir / RECORD_FILE
    path.write_text((source_dir / RECORD_FILE).read_text(encoding="utf-8"), encoding="utf-8")
    path.chmod(0o600)
    nvram = VmPaths(work_dir=source_dir / "state", run_dir=source_dir).ovmf_vars
    if nvram.exists():
        (dest_dir / "state").mkdir(mode=0o700)
        shutil.copyfile(nvram, dest_dir / "state" / nvram.name)
        (dest_dir / "state" / nvram.name).chmod(0o600)


class AttachedVm(QemuVm):
    """A running VM that another process started (``vm start``), reached over its QMP socket.

    Only what a migration source needs: QMP commands, and :meth:`stop` that also
    waits until that QEMU has exited (so its forwarded port is free for the
    destination).
    """

    def __init__(self, record: VmRecord, vm_dir: Path) -> None:
        pid = running_pid(vm_dir)
        if pid is None:
            raise UsageError(f"VM {record.name!r} is not running on this host")
        info = json.loads((vm_dir / RUN_FILE).read_text(encoding="utf-8"))
        super().__init__(record.spec(vm_dir), vm_dir / "state", run_dir=Path(info["run_dir"]))
        self._attached_pid = pid
        self._qmp = QmpClient.connect(self.paths.qmp_socket, wait=1.0)

    @property
    def pid(self) -> int | None:
        """The attached QEMU's pid."""
        return self._attached_pid

    @property
    def running(self) -> bool:
        """Whether the attached QEMU is still alive."""
        return Path(f"/proc/{self._attached_pid}").exists() and self._qmp is not None

    def stop(self) -> None:
        """Quit QEMU over QMP and wait for it to exit (swtpm exits with it)."""
        super().stop()
        deadline = time.monotonic() + STOP_TIMEOUT
        while Path(f"/proc/{self._attached_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(self.paths.run_dir, ignore_errors=True)  # the sockets of `vm start`


def attach(vm_dir: Path) -> AttachedVm:
    """The running VM in ``vm_dir`` as a migration source."""
    return AttachedVm(load_record(vm_dir), vm_dir)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for the destination to listen on)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _qemu_destination(record: VmRecord, dest_dir: Path) -> QemuVm:
    return QemuVm(record.spec(dest_dir), dest_dir / "state")


def migrate_vm(
    source: QemuVm,
    source_dir: Path,
    dest_dir: Path,
    dest_keys: KeySource,
    *,
    port: int,
    factory: DestinationFactory = _qemu_destination,
) -> MigrationResult:
    """Move the running VM of ``source_dir`` to ``dest_dir`` (see the module docstring).

    Raises:
        MigrationRefusedError: the destination got no keys (nothing sent or written).
        UsageError: the destination exists already, or cannot reach the disks.
        MigrationError: the stream failed and the VM runs on at the source; or, if the
            message says so, the VM moved and runs at the destination but a last step
            (its port forward) failed.
    """
    record = load_record(source_dir)
    if dest_dir.exists():
        raise UsageError(f"VM {record.name!r}: {dest_dir} exists already")
    store = VaultStore(source_dir / "keys")
    pair, released = _destination_release(store, dest_keys, record.name)
    contents = open_vault(pair.vault, released.old_transport_key, vm_name=record.name)
    psk = migration_psk(released.old_transport_key, secrets.token_bytes(SALT_SIZE), record.name)
    dest: QemuVm | None = None
    try:
        _prepare_destination(record, source_dir, dest_dir)
        dest = factory(record, dest_dir)
        stats = _stream(source, dest, psk, contents, port)
    except BaseException as exc:
        if dest is None or not isinstance(exc, HypervisorError) or not _landed(source, dest):
            if dest is not None:
                dest.stop()
            shutil.rmtree(dest_dir, ignore_errors=True)
            _hand_back(store, contents, released, record.name)
            raise
        _take_over(
            record.name,
            dest,
            source_dir=source_dir,
            dest_dir=dest_dir,
            contents=contents,
            released=released,
        )
        raise MigrationError(
            f"VM {record.name!r} moved to {dest_dir} and runs there, but: {exc}"
        ) from exc
    _take_over(
        record.name,
        dest,
        source_dir=source_dir,
        dest_dir=dest_dir,
        contents=contents,
        released=released,
    )
    return MigrationResult(record.name, dest_dir, stats, dest)


def _landed(source: QemuVm, dest: QemuVm) -> bool:
    """Whether the hand-over happened: the source is gone and the guest runs at ``dest``."""
    try:
        return not source.running and dest.running and dest.status() == "running"
    except HypervisorError:
        return False


def _take_over(
    name: str,
    dest: QemuVm,
    *,
    source_dir: Path,
    dest_dir: Path,
    contents: VaultContents,
    released: ReleasedKeys,
) -> None:
    """The destination owns the VM: its pair committed, the source's directory gone."""
    dest_store = VaultStore(dest_dir / "keys")
    sealed = seal_vault(contents, released.new_transport_key, vm_name=name)
    dest_store.commit(dest_store.write_pending(sealed, released.egress_kp).number)
    _record_run(dest_dir, dest)
    (source_dir / RUN_FILE).unlink(missing_ok=True)
    shutil.rmtree(source_dir, ignore_errors=True)


def _stream(
    source: QemuVm, dest: QemuVm, psk: bytes, contents: VaultContents, port: int
) -> MigrationStats:
    dest.start(contents.vm_keys(), incoming=True)
    incoming = IncomingMigration(dest, psk, port)
    incoming.listen()
    return live_migrate(source, incoming, psk, contents.disks)


def _hand_back(
    store: VaultStore, contents: VaultContents, released: ReleasedKeys, name: str
) -> None:
    """After a failed stream, keep the source startable: the released pair as pending."""
    sealed = seal_vault(contents, released.new_transport_key, vm_name=name)
    try:
        store.write_pending(sealed, released.egress_kp)
    except OSError as exc:  # pragma: no cover - the source's own disk failed
        raise HypervisorError(f"VM {name!r}: could not keep the released key pair") from exc


__all__ = [
    "AttachedVm",
    "DestinationFactory",
    "MigrationRefusedError",
    "MigrationResult",
    "attach",
    "free_local_port",
    "migrate_vm",
    "migration_psk",
]
