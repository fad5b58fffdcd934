"""Checkpoints: a VM's whole state saved encrypted, restored through a KPS release.

A checkpoint is QEMU's migration stream (RAM, devices, and the vTPM's state,
which swtpm already encrypts under the vault's migration key) sent to a pipe
(``getfd`` + ``migrate fd:``) that this module reads and encrypts before a byte
reaches the disk. Restore is the reverse: QEMU starts with ``-incoming defer``
and reads the decrypted stream from a pipe (``migrate-incoming fd:``). No
plaintext state is ever written to a file.

The file (``checkpoint.gfc`` beside the VM) is a standard chunked AEAD stream
(the construction of STREAM / Tink's streaming AEAD, simplified)::

    magic "GFCKPT1\\n" | salt (32 random bytes)
    then frames: length (4 bytes, big endian) | AES-256-GCM ciphertext + tag

* key = HKDF-SHA256(vault's vTPM migration key, salt, ``info = "guardfab
  checkpoint v1 " + name``): a fresh key per checkpoint, domain-separated from
  the swtpm use of that key;
* nonce of chunk *i* = 4 zero bytes + *i* (8 bytes, big endian): unique per key;
* AAD = ``name | i | final flag``: chunks cannot be reordered, moved to another
  VM, dropped at the end (the last chunk, possibly empty, is flagged final and
  nothing may follow it) or truncated.

Taking and restoring a checkpoint both go through a KPS release (the vault's
keys are on the host only after one), with the same pending/commit re-key as a
power-on (ADR 0009): a host that cannot attest can do neither.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guardfab.errors import UsageError, VerificationError
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.power import (
    RuntimeFactory,
    StartedVm,
    _record_run,
    _release,
    _seal_pending,
    refuse_unfinished_incoming,
    running_pid,
)
from guardfab.hypervisor.provision import KeySource, VmRecord, load_record
from guardfab.hypervisor.vault import VaultContents, VaultStore, open_vault
from guardfab.hypervisor.vm import QemuVm

CHECKPOINT_FILE = "checkpoint.gfc"
MAGIC = b"GFCKPT1\n"
SALT_SIZE = 32
CHUNK = 1024 * 1024
MAX_FRAME = CHUNK + 16
TIMEOUT = 120.0
_INFO = b"guardfab checkpoint v1 "
_FD_NAME = "guardfab-checkpoint"


class CheckpointError(HypervisorError):
    """Saving or restoring a checkpoint failed."""


def _key(contents: VaultContents, salt: bytes, name: str) -> AESGCM:
    hkdf = HKDF(hashes.SHA256(), 32, salt, _INFO + name.encode("utf-8"))
    return AESGCM(hkdf.derive(contents.vtpm_migration))


def _aad(name: str, index: int, final: bool) -> bytes:
    return name.encode("utf-8") + b"|" + struct.pack(">QB", index, final)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", index)


def _read_full(source: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left:
        data = source.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def encrypt_stream(source: BinaryIO, out: BinaryIO, contents: VaultContents, name: str) -> None:
    """Encrypt everything ``source`` yields into ``out`` (format in the module docstring)."""
    salt = os.urandom(SALT_SIZE)
    aead = _key(contents, salt, name)
    out.write(MAGIC + salt)
    index, chunk = 0, _read_full(source, CHUNK)
    while True:
        following = _read_full(source, CHUNK) if chunk else b""
        final = not following
        sealed = aead.encrypt(_nonce(index), chunk, _aad(name, index, final))
        out.write(struct.pack(">I", len(sealed)) + sealed)
        if final:
            return
        index, chunk = index + 1, following


def decrypt_stream(source: BinaryIO, contents: VaultContents, name: str) -> Iterator[bytes]:
    """The plaintext chunks of a checkpoint, each verified before it is yielded.

    Raises:
        VerificationError: wrong key or VM, a changed, reordered or missing chunk.
    """
    head = _read_full(source, len(MAGIC) + SALT_SIZE)
    if not head.startswith(MAGIC) or len(head) != len(MAGIC) + SALT_SIZE:
        raise VerificationError(f"checkpoint of VM {name!r}: not a checkpoint file")
    aead = _key(contents, head[len(MAGIC) :], name)
    index = 0
    while True:
        length_bytes = _read_full(source, 4)
        length = struct.unpack(">I", length_bytes)[0] if len(length_bytes) == 4 else 0
        sealed = _read_full(source, length) if 16 <= length <= MAX_FRAME else b""
        if not sealed or len(sealed) != length:
            raise VerificationError(f"checkpoint of VM {name!r}: truncated or damaged")
        chunk, final = _open_chunk(aead, sealed, name, index)
        yield chunk
        if final:
            if source.read(1):
                raise VerificationError(f"checkpoint of VM {name!r}: data after the end")
            return
        index += 1


def _open_chunk(aead: AESGCM, sealed: bytes, name: str, index: int) -> tuple[bytes, bool]:
    for final in (False, True):
        with contextlib.suppress(InvalidTag):
            return aead.decrypt(_nonce(index), sealed, _aad(name, index, final)), final
    raise VerificationError(
        f"checkpoint of VM {name!r}: chunk {index} does not verify",
        hint="the file was changed, or belongs to another VM or key",
    )


class _Pump(threading.Thread):
    """Runs one side of the pipe (the encrypter or the decrypter) beside QEMU."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 -- reported by the caller
            self.error = exc


def _wait(vm: QemuVm, done: set[str], what: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = vm.qmp.execute("query-migrate")
        status = str(info.get("status", "none"))
        if status in done:
            return status
        if status in {"failed", "cancelled"}:
            reason = info.get("error-desc", status)
            raise CheckpointError(f"{what} of VM {vm.spec.name} failed: {reason}")
        if time.monotonic() > deadline:
            raise CheckpointError(f"{what} of VM {vm.spec.name} timed out")
        time.sleep(0.05)


def save_state(vm: QemuVm, path: Path, contents: VaultContents) -> None:
    """Stream the running ``vm``'s state, encrypted, to ``path`` (temp file + rename)."""
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)
    try:
        _save_to(vm, temp, contents)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    temp.rename(path)


def _save_to(vm: QemuVm, temp: Path, contents: VaultContents) -> None:
    read_fd, write_fd = os.pipe()
    out_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(out_fd, "wb") as out:
        pump = _Pump(lambda: encrypt_stream(reader, out, contents, vm.spec.name))
        pump.start()
        try:
            vm.qmp.execute("migrate-set-parameters", {"tls-creds": ""})
            vm.qmp.execute("getfd", {"fdname": _FD_NAME}, fds=[write_fd])
        finally:
            os.close(write_fd)  # QEMU holds its own copy now (and closes it when done)
        vm.qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
        _wait(vm, {"completed"}, "checkpoint")
        pump.join(TIMEOUT)
        out.flush()
        os.fsync(out.fileno())
    if pump.is_alive() or pump.error is not None:
        raise CheckpointError(f"checkpoint of VM {vm.spec.name}: {pump.error or 'not written'}")


def load_state(vm: QemuVm, path: Path, contents: VaultContents) -> None:
    """Feed the decrypted checkpoint at ``path`` into ``vm`` (started with ``incoming``)."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with path.open("rb") as source, os.fdopen(write_fd, "wb") as pipe:
            for chunk in decrypt_stream(source, contents, vm.spec.name):
                pipe.write(chunk)

    try:
        vm.qmp.execute("getfd", {"fdname": _FD_NAME}, fds=[read_fd])
    finally:
        os.close(read_fd)
    pump = _Pump(feed)
    pump.start()
    vm.qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
    deadline = time.monotonic() + TIMEOUT
    while vm.status() == "inmigrate":
        if not vm.running or time.monotonic() > deadline or pump.error is not None:
            raise CheckpointError(f"restore of VM {vm.spec.name}: {pump.error or 'no state'}")
        time.sleep(0.05)
    pump.join(TIMEOUT)
    if pump.error is not None:
        raise CheckpointError(f"restore of VM {vm.spec.name}: {pump.error}")


def _rekey(vm_dir: Path, key_source: KeySource) -> tuple[VaultContents, VaultStore, int, int]:
    """Release, open the vault, write the pending pair (as a power-on does)."""
    record = load_record(vm_dir)
    store = VaultStore(vm_dir / "keys")
    pair, released = _release(store, key_source, record.name)
    contents = open_vault(pair.vault, released.old_transport_key, vm_name=record.name)
    pending, contents = _seal_pending(store, record, contents, released)
    return contents, store, pending.number, pair.number


def checkpoint_vm(vm: QemuVm, vm_dir: Path, key_source: KeySource) -> Path:
    """Save the running ``vm`` of ``vm_dir`` to its checkpoint file, then stop it."""
    contents, store, pending, used = _rekey(vm_dir, key_source)
    path = vm_dir / CHECKPOINT_FILE
    save_state(vm, path, contents)
    vm.stop()
    store.commit(pending, replaces=used)
    with contextlib.suppress(FileNotFoundError):
        (vm_dir / "run.json").unlink()
    return path


def _check_restorable(vm_dir: Path, record: VmRecord) -> None:
    """What a power-on checks, before the release: each refusal spends no KP generation."""
    if running_pid(vm_dir) is not None:
        raise UsageError(f"VM {record.name!r} is running: stop it before restoring its checkpoint")
    refuse_unfinished_incoming(vm_dir, record.name)
    check_vm_policy(record.spec(vm_dir))


def restore_vm(vm_dir: Path, key_source: KeySource, runtime_factory: RuntimeFactory) -> QemuVm:
    """Start the VM of ``vm_dir`` from its checkpoint (through a release); the file is consumed."""
    vm = restore_started(vm_dir, key_source, runtime_factory).runtime
    assert isinstance(vm, QemuVm)  # restore_started refuses any other runtime
    return vm


def restore_started(
    vm_dir: Path, key_source: KeySource, runtime_factory: RuntimeFactory
) -> StartedVm:
    """:func:`restore_vm`, answering the vault's contents too (the agent keeps them).

    Raises:
        UsageError: no checkpoint, the VM runs already, or its directory is an
            unfinished incoming migration (nothing released).
        PolicyError: its record asks for what its policy forbids (nothing released).
        PowerOnRefusedError: this host got no keys (nothing started).
    """
    path = vm_dir / CHECKPOINT_FILE
    if not path.exists():
        raise UsageError(f"VM {vm_dir.name!r} has no checkpoint")
    record = load_record(vm_dir)
    _check_restorable(vm_dir, record)
    contents, store, pending, used = _rekey(vm_dir, key_source)
    vm = runtime_factory(record.spec(vm_dir), vm_dir / "state")
    if not isinstance(vm, QemuVm):
        raise UsageError("restore needs the QEMU runtime")
    vm.start(contents.vm_keys(), incoming=True)
    try:
        load_state(vm, path, contents)
        if vm.status() != "running":
            vm.resume()
        vm.forget_disk_secrets()
        vm.forward_host_port()
    except BaseException:
        vm.stop()
        raise
    store.commit(pending, replaces=used)
    _record_run(vm_dir, vm)
    path.unlink()
    return StartedVm(vm, contents)


__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "checkpoint_vm",
    "decrypt_stream",
    "encrypt_stream",
    "restore_started",
    "restore_vm",
]
