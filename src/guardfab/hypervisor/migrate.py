"""Live-migrate a shielded VM between guarded hosts: the source's half, and what both share.

Each half runs in its own host's agent; the fabric administrator's CLI carries
what moves between them (:mod:`guardfab.host.manage.orchestrate`), and only what
is public or sealed moves (ADR 0015):

* source -> destination, the :class:`MigrationOffer`: the VM record, its sealed
  (vault, KP) pairs (the committed one, then a pending one a failed migration
  left), the OVMF variable store and where the disks are on shared storage;
* destination -> source, the :class:`StreamEndpoint`: address, port and salt;
* destination -> source after a failure, a :class:`SealedPair`: the egress KP
  and the vault sealed under the new transport key (the hand-back).

The order (the destination's half is :mod:`guardfab.hypervisor.incoming`):

1. the source's agent offers the VM (:func:`make_offer`); it holds the running
   VM's vault contents in memory since it started it, or gets them again with
   one re-keying release (:func:`~guardfab.hypervisor.power.rekey_running`);
2. the destination's agent releases the KP with its *own* health certificate.
   Refused: nothing is written there, nothing is sent, the VM runs on;
3. the destination opens the vault, prepares its side, starts QEMU
   ``-incoming defer`` and answers address, port and a fresh salt;
4. the source sends the stream over TLS-PSK (:func:`send_stream`). Both ends
   derive the PSK, neither sends it: ``HKDF-SHA256(the vault's vTPM migration
   key, salt, "guardfab migration psk v2 " + name)`` (:func:`migration_psk`). That
   key is inside the vault, the same across re-keys, and distinct in use from
   swtpm's (its own ``info``) and from checkpoints' (another ``info``);
5. the destination's guest runs and it commits its pair; then the source stops
   and leaves (:func:`leave_source`): its directory goes, except disks that
   live in it (other hosts reach them there through a symlink).

If anything fails after the destination's release, the source's committed KP
is spent (the KPS refuses it from now on): the destination hands its pair back
and the source keeps it as *pending* (:func:`take_back`), so the VM, which runs
on at the source, can still be stopped and started (ADR 0009, 0011).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guardfab.errors import FormatError, NotAuthorizedError, UsageError
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.key_protector import load_key_protector
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.disk import DiskKey, disk_secrets
from guardfab.hypervisor.keyprotector import held_identity, load_vm_kp
from guardfab.hypervisor.migration import (
    PSK_SIZE,
    MigrationError,
    MigrationStats,
    send_migration,
    stream_uri,
)
from guardfab.hypervisor.power import RUN_FILE, running_pid
from guardfab.hypervisor.provision import DISK_IDS, RECORD_FILE, VmRecord, load_record
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.vault import (
    KEY_BYTES,
    KeyPair,
    VaultContents,
    VaultStore,
    check_sealed_shape,
)
from guardfab.hypervisor.vm import STOP_TIMEOUT, QemuVm

_PSK_INFO = b"guardfab migration psk v2 "
SALT_SIZE = 32
#: The OVMF variable store is 528 KiB; anything far larger is not one.
MAX_NVRAM_BYTES = 4 * 1024 * 1024
MAX_PAIRS = 2
#: A source's QEMU states after a stream that handed (or may have handed) its guest over.
PAUSED_AFTER_STREAM = frozenset({"paused", "postmigrate", "finish-migrate"})


class MigrationRefusedError(NotAuthorizedError):
    """The destination got no keys: nothing was sent, the VM runs on at the source."""


def migration_psk(migration_key: bytes, salt: bytes, vm_name: str) -> bytes:
    """The TLS pre-shared key of one migration (both ends derive it; neither sends it).

    Args:
        migration_key: the vault's vTPM migration key (constant across re-keys).
        salt: the destination's fresh random salt for this migration.
        vm_name: binds the key to the VM.
    """
    if len(salt) != SALT_SIZE:
        raise FormatError(f"the migration salt must be {SALT_SIZE} bytes")
    if len(migration_key) != KEY_BYTES:
        raise ValueError("the vault's migration key has the wrong size")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=PSK_SIZE,
        salt=salt,
        info=_PSK_INFO + vm_name.encode("utf-8"),
    )
    return hkdf.derive(migration_key)


# ---------------------------------------------------------------- what moves


@dataclass(frozen=True)
class SealedPair:
    """A KP and the vault sealed under the transport key it wraps: safe to carry."""

    kp: bytes = field(repr=False)
    vault: bytes = field(repr=False)

    def to_dict(self) -> dict[str, str]:
        """JSON form (base64url)."""
        return {"kp": b64url_encode(self.kp), "vault": b64url_encode(self.vault)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> SealedPair:
        """Parse the JSON form."""
        return cls(
            b64url_decode(str(value.get("kp", "")), what="key protector"),
            b64url_decode(str(value.get("vault", "")), what="sealed vault"),
        )

    @classmethod
    def of(cls, pair: KeyPair) -> SealedPair:
        """A stored pair, to carry."""
        return cls(pair.kp, pair.vault)


@dataclass(frozen=True)
class MigrationOffer:
    """What the source hands the destination: public or sealed, no key in clear."""

    record: VmRecord
    pairs: tuple[SealedPair, ...]
    nvram: bytes | None = field(repr=False)
    disks_dir: Path

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.record.name

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "record": self.record.to_dict(),
            "pairs": [pair.to_dict() for pair in self.pairs],
            "nvram": None if self.nvram is None else b64url_encode(self.nvram),
            "disks_dir": str(self.disks_dir),
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> MigrationOffer:
        """Parse and check the JSON form (record, pairs' shape, sizes, an absolute path).

        Raises:
            FormatError: a field is missing, malformed or too large.
        """
        record = VmRecord.from_dict(value.get("record"))
        raw_pairs = value.get("pairs")
        if not isinstance(raw_pairs, list) or not 1 <= len(raw_pairs) <= MAX_PAIRS:
            raise FormatError(f"a migration offer carries 1 to {MAX_PAIRS} key pairs")
        pairs = tuple(SealedPair.from_dict(p) for p in raw_pairs if isinstance(p, dict))
        if len(pairs) != len(raw_pairs):
            raise FormatError("a migration offer's key pair is not an object")
        for pair in pairs:
            check_sealed_shape(pair.vault, vm_name=record.name)
        nvram_text = value.get("nvram")
        nvram = None if nvram_text is None else b64url_decode(str(nvram_text), what="NVRAM")
        if nvram is not None and len(nvram) > MAX_NVRAM_BYTES:
            raise FormatError("the offered OVMF variable store is too large")
        disks_dir = Path(str(value.get("disks_dir", "")))
        if not disks_dir.is_absolute():
            raise FormatError("a migration offer's disks_dir must be an absolute path")
        return cls(record, pairs, nvram, disks_dir)


@dataclass(frozen=True)
class StreamEndpoint:
    """Where the destination waits for the stream, and the salt of its PSK."""

    address: str
    port: int
    salt: bytes = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"address": self.address, "port": self.port, "salt": b64url_encode(self.salt)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> StreamEndpoint:
        """Parse the JSON form."""
        port = value.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise FormatError("the stream's port must be 1-65535")
        salt = b64url_decode(str(value.get("salt", "")), what="migration salt")
        if len(salt) != SALT_SIZE:
            raise FormatError(f"the migration salt must be {SALT_SIZE} bytes")
        return cls(str(value.get("address", "")), port, salt)


# ---------------------------------------------------------------- the source's half


def disks_directory(vm_dir: Path) -> Path:
    """Where the VM's disks really are (through a destination's symlink, on shared storage)."""
    return (Path(vm_dir) / "disks").resolve()


def make_offer(vm_dir: Path) -> MigrationOffer:
    """The offer of the VM running in ``vm_dir`` (its record, sealed pairs, NVRAM, disks).

    Raises:
        UsageError: the VM does not run here.
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if running_pid(vm_dir) is None:
        raise UsageError(f"VM {record.name!r} is not running on this host")
    pairs = tuple(SealedPair.of(pair) for pair in VaultStore(vm_dir / "keys").candidates())
    nvram_file = VmPaths(work_dir=vm_dir / "state", run_dir=vm_dir).ovmf_vars
    nvram = nvram_file.read_bytes() if nvram_file.exists() else None
    return MigrationOffer(record, pairs, nvram, disks_directory(vm_dir))


class AttachedVm(QemuVm):
    """A running VM that another operation started, reached over its QMP socket.

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
        while not _exited(self._attached_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(self.paths.run_dir, ignore_errors=True)  # the sockets of `vm start`


def _exited(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie has: reaped here if it is our child).

    The agent that started a VM is QEMU's parent: an exited QEMU stays a zombie
    (its /proc entry too) until reaped, which would make a stop wait its whole timeout.
    """
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def attach(vm_dir: Path) -> AttachedVm:
    """The running VM in ``vm_dir`` as a migration source."""
    return AttachedVm(load_record(vm_dir), vm_dir)


def send_stream(
    source: QemuVm, contents: VaultContents, endpoint: StreamEndpoint
) -> MigrationStats:
    """Send the running ``source`` to the destination's endpoint over TLS-PSK.

    On return the whole state has gone and the source is paused (``postmigrate``),
    its disks handed over: it stays so until :func:`leave_source` (the
    destination runs the guest) or :func:`resume_source` (it did not).

    Raises:
        MigrationError: the handshake (a wrong PSK: another salt, another vault)
            or the transfer failed; the source runs on.
    """
    psk = migration_psk(contents.vtpm_migration, endpoint.salt, source.spec.name)
    uri = stream_uri(endpoint.address, endpoint.port)
    return send_migration(source, psk, uri, contents.disks)


def resume_source(source: QemuVm, disk_keys: Mapping[str, DiskKey]) -> bool:
    """Run the source again after a stream the destination did not take over.

    A source paused after a completed stream gave its disks away: it takes
    them back (QEMU reopens them, so it needs their secrets for a moment) and
    runs on. Returns whether it had to be resumed.
    """
    if source.status() not in PAUSED_AFTER_STREAM:
        return False
    with disk_secrets(source.qmp, source.spec.disks, disk_keys):
        source.resume()
    return True


def leave_source(source: QemuVm, vm_dir: Path) -> None:
    """The destination runs the guest: stop the source and remove its directory.

    Disks that live in the directory stay (other hosts reach them there): only
    the host's own state goes -- record and run file first, so a crash half-way
    leaves no directory that looks like a VM.

    Raises:
        UsageError: the source is not paused after a completed stream.
    """
    status = source.status()
    if status != "postmigrate":
        raise UsageError(
            f"VM {source.spec.name!r} is {status} here, not handed over: not stopping it",
            hint="only a source whose stream completed leaves",
        )
    source.stop()
    remove_host_state(Path(vm_dir))


def remove_host_state(vm_dir: Path) -> None:
    """Remove this host's files of a VM (record and run file first); disks living here stay."""
    for name in (RUN_FILE, RECORD_FILE):
        (vm_dir / name).unlink(missing_ok=True)
    disks = vm_dir / "disks"
    for entry in vm_dir.iterdir():
        if entry == disks and not entry.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not disks.exists():
        vm_dir.rmdir()


@dataclass(frozen=True)
class TakenBack:
    """What :func:`take_back` did.

    Attributes:
        number: the pending pair's number.
        generation: its KP's generation.
        new: whether this call wrote it (``False``: it was the pending pair already,
            a retry -- or a replay of an older hand-back).
    """

    number: int
    generation: int
    new: bool


def take_back(vm_dir: Path, pair: SealedPair) -> TakenBack:
    """Keep the pair a destination hands back as this VM's pending pair.

    It is what the KPS now accepts for the VM (the destination's release spent
    the committed KP), so power-on, a later migration or checkpoint fall back to
    it. Checked first: a vault sealed for this VM, a KP that verifies as signed
    for the owner of the KPs held here (anyone can sign a KP of their own with
    this VM's ``kp_id`` copied), of this VM's ``kp_id`` and newer than every KP
    held here.

    Raises:
        VaultError, FormatError, VerificationError: not this VM's pair (nothing written).
        NotAuthorizedError: another owner's or another ``kp_id``'s KP (nothing written).
        UsageError: the pair is not newer than what this host holds (nothing written).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    check_sealed_shape(pair.vault, vm_name=record.name)
    store = VaultStore(vm_dir / "keys")
    held_kps = [p.kp for p in store.candidates()]
    handed = load_vm_kp(pair.kp, held_identity(held_kps, record.name), record.name)
    pending = store.pending()
    if pending is not None and pending.kp == pair.kp:
        return TakenBack(pending.number, handed.generation, new=False)
    if any(load_key_protector(kp).generation >= handed.generation for kp in held_kps):
        raise UsageError(
            f"the key protector handed back (generation {handed.generation}) is not newer "
            f"than VM {record.name!r}'s here: nothing to take back"
        )
    number = store.write_pending(pair.vault, pair.kp).number
    return TakenBack(number, handed.generation, new=True)


def newest_generation(vm_dir: Path) -> int:
    """The highest KP generation the VM's store holds (what an offer carries at most)."""
    pairs = VaultStore(Path(vm_dir) / "keys").candidates()
    return max(load_key_protector(pair.kp).generation for pair in pairs)


def check_disks(offer: MigrationOffer) -> None:
    """The offered disks are reachable at the offered path (shared storage).

    Raises:
        UsageError: the directory or a disk image is not there.
    """
    for device_id in DISK_IDS:
        image = offer.disks_dir / f"{device_id}.qcow2"
        if not image.is_file():
            raise UsageError(
                f"VM {offer.name!r}: this host cannot reach disk {device_id} at {image}",
                hint="live migration needs the VM's disks on storage both hosts see at one path",
            )


__all__ = [
    "PAUSED_AFTER_STREAM",
    "SALT_SIZE",
    "AttachedVm",
    "MigrationError",
    "MigrationOffer",
    "MigrationRefusedError",
    "SealedPair",
    "StreamEndpoint",
    "TakenBack",
    "attach",
    "check_disks",
    "disks_directory",
    "leave_source",
    "make_offer",
    "migration_psk",
    "newest_generation",
    "remove_host_state",
    "resume_source",
    "send_stream",
    "take_back",
]
