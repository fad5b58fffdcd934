"""A VM's key vault: its vTPM and disk keys, sealed under the VM's transport key, with rollback.

The vault holds what a VM needs to run and nothing else: the vTPM state key,
the vTPM migration key and one random 256-bit key per encrypted disk -- and,
once the VM has started, the name of its security policy: the seal
authenticates it, so a host that opens the vault can tell whether a VM record
handed to it (a live migration's) was loosened on the way (ADR 0015). It is a
compact JWE (``dir``/``A256GCM``) whose content key is derived from the VM's
transport key with HKDF-SHA256 (``info`` names the purpose and the VM), so the
transport key itself never encrypts anything and a vault cannot be moved to
another VM's name. Only a KPS release gives a host the transport key, so only a
host with a valid health certificate can open the vault (ADR 0009).

Every power-on re-keys: the KPS answers the current transport key (it opens the
vault now) and a new one with the egress key protector (KP) that wraps it; the
KPS then refuses the KP it was sent (an older generation), so the host must not
lose the egress KP. The pair (vault under the new key, egress KP) is written as
a whole, *pending*, before QEMU starts, and *committed* once QEMU runs.

On disk (``KEYS/`` beside the VM, 0700, files 0600)::

    gen-00000001/vault.jwe  gen-00000001/kp.jws   a pair, written as a temp dir + rename
    committed                                     "1\\n": the pair in use (atomic rename)

A pair newer than ``committed`` is pending; the one committed before it is kept
(the previous pair: its KP is spent, the KPS refuses its generation); a commit
removes every other pair. Going to the newest intact pair when the committed one
is lost or damaged is :mod:`guardfab.hypervisor.keyprotector`'s (ADR 0010).
Crash cases, by where the host stopped:

1. before the pending pair is renamed into place: a ``.tmp`` directory is left
   and ignored; but the KPS has already issued the egress KP, so the committed
   KP is now refused as a rollback -- the one window this design cannot close
   (the owner can recover: it is a guardian of the KP). It lasts one fsync.
2. after the pending pair is in place, before the commit: the committed KP is
   tried first and refused (the KPS already issued a newer one), then the
   pending KP, whose release opens the pending vault. Nothing is lost.
3. after the commit: the normal case; the older pair is pruned next time.

The content format and sealing are pure; :class:`VaultStore` does the file I/O.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from guardfab.errors import FormatError, InvalidInputError, VerificationError
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.formats.key_protector import TransportKey
from guardfab.hypervisor.disk import DiskKey
from guardfab.hypervisor.vm import VmKeys

VAULT_TYPE = "guardfab.vm-vault"
VAULT_VERSION = 1
VAULT_CTY = "guardfab.vm-vault+json"
KEY_BYTES = 32
MAX_VAULT_BYTES = 64 * 1024
MAX_DISKS = 16
_HKDF_INFO = b"guardfab vm-vault v1 A256GCM "
_REGISTRY = jwe.JWERegistry(algorithms=["dir", "A256GCM"])
_GEN_RE = re.compile(r"gen-([0-9]{8})")
_DEVICE_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
_POLICY_RE = re.compile(r"[a-z][a-z-]{0,31}")
_WHAT = "VM key vault"
_RESTORE_HINT = (
    "if a newer pair is intact, 'guardfab vm key-protector NAME --restore-last-known-good'"
    " commits it (ADR 0011); else the VM's owner must issue a new KP"
)


class VaultError(InvalidInputError):
    """A vault or its store is unusable: wrong key, tampered, or no pair to open."""


@dataclass(frozen=True, repr=False)
class VaultContents:
    """The keys in a vault. Its ``repr`` is redacted."""

    vtpm_state: bytes = field(repr=False)
    vtpm_migration: bytes = field(repr=False)
    disks: Mapping[str, DiskKey] = field(repr=False)
    #: The VM's security policy (``shielded``...), bound at its first power-on;
    #: ``None`` in a vault sealed before then (at provisioning, or by an older version).
    policy: str | None = None

    def __post_init__(self) -> None:
        for what, key in (("vTPM state", self.vtpm_state), ("vTPM migration", self.vtpm_migration)):
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise FormatError(f"{_WHAT}: the {what} key must be {KEY_BYTES} bytes")
        if len(self.disks) > MAX_DISKS:
            raise FormatError(f"{_WHAT}: more than {MAX_DISKS} disks")
        for device_id in self.disks:
            if not _DEVICE_RE.fullmatch(device_id):
                raise FormatError(f"{_WHAT}: bad disk id {device_id!r}")
        if self.policy is not None and not _POLICY_RE.fullmatch(self.policy):
            raise FormatError(f"{_WHAT}: bad policy name")

    def __repr__(self) -> str:
        return f"VaultContents(disks={sorted(self.disks)}, <keys redacted>)"

    @classmethod
    def generate(cls, disk_ids: Sequence[str]) -> VaultContents:
        """Fresh random keys for a new VM with these disks."""
        return cls(
            vtpm_state=secrets.token_bytes(KEY_BYTES),
            vtpm_migration=secrets.token_bytes(KEY_BYTES),
            disks={device_id: DiskKey.generate() for device_id in disk_ids},
        )

    def vm_keys(self) -> VmKeys:
        """The keys one launch of the runtime needs."""
        return VmKeys(
            disks=dict(self.disks), vtpm_state=self.vtpm_state, vtpm_migration=self.vtpm_migration
        )

    def to_bytes(self) -> bytes:
        """Canonical JSON (the plaintext that gets sealed)."""
        body: dict[str, Any] = {
            "type": VAULT_TYPE,
            "version": VAULT_VERSION,
            "vtpm_state": b64url_encode(self.vtpm_state),
            "vtpm_migration": b64url_encode(self.vtpm_migration),
            "disks": {d: b64url_encode(k.material) for d, k in sorted(self.disks.items())},
        }
        if self.policy is not None:
            body["policy"] = self.policy
        return canonical_json(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> VaultContents:
        """Parse the plaintext (after decryption), rejecting unknown fields and versions."""
        obj = require_dict(
            load_json_document(data, what=_WHAT, max_bytes=MAX_VAULT_BYTES), what=_WHAT
        )
        reject_unknown_fields(
            obj, {"type", "version", "vtpm_state", "vtpm_migration", "disks", "policy"}, what=_WHAT
        )
        if obj.get("type") != VAULT_TYPE or require_int(obj, "version", what=_WHAT) != 1:
            raise FormatError(f"{_WHAT}: not a version {VAULT_VERSION} vault")
        disks = require_dict(obj.get("disks"), what=f"{_WHAT} disks")
        return cls(
            vtpm_state=_key_field(obj, "vtpm_state"),
            vtpm_migration=_key_field(obj, "vtpm_migration"),
            disks={str(d): DiskKey(_key_field(disks, d)) for d in disks},
            policy=require_str(obj, "policy", what=_WHAT, max_len=32) if "policy" in obj else None,
        )


def _key_field(obj: dict[str, Any], name: str) -> bytes:
    return b64url_decode(require_str(obj, name, what=_WHAT, max_len=64), what=f"{_WHAT} {name}")


def _content_key(transport_key: TransportKey, vm_name: str) -> OctKey:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=_HKDF_INFO + vm_name.encode("utf-8"),
    )
    return OctKey.import_key(hkdf.derive(transport_key.reveal()))


def seal_vault(contents: VaultContents, transport_key: TransportKey, *, vm_name: str) -> bytes:
    """Encrypt ``contents`` under a key derived from ``transport_key`` (compact JWE)."""
    header = {"alg": "dir", "enc": "A256GCM", "cty": VAULT_CTY, "kid": f"vm:{vm_name}"}
    key = _content_key(transport_key, vm_name)
    token = jwe.encrypt_compact(header, contents.to_bytes(), key, registry=_REGISTRY)
    return token.encode("ascii")


def open_vault(sealed: bytes, transport_key: TransportKey, *, vm_name: str) -> VaultContents:
    """Decrypt a vault sealed by :func:`seal_vault` for ``vm_name``.

    Raises:
        VerificationError: wrong transport key, another VM's vault, or tampered.
        FormatError: not a vault.
    """
    if len(sealed) > MAX_VAULT_BYTES:
        raise FormatError(f"{_WHAT}: larger than {MAX_VAULT_BYTES} bytes")
    try:
        result = jwe.decrypt_compact(
            sealed, _content_key(transport_key, vm_name), registry=_REGISTRY
        )
    except JoseError as exc:
        raise VerificationError(
            f"{_WHAT} of VM {vm_name!r} does not open with this transport key ({exc.error})",
            hint="the key released is not this vault's, or the vault was changed",
        ) from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{_WHAT} of VM {vm_name!r}: malformed") from exc
    if result.protected.get("cty") != VAULT_CTY or result.protected.get("kid") != f"vm:{vm_name}":
        raise VerificationError(f"{_WHAT}: sealed for another VM or purpose")
    return VaultContents.from_bytes(bytes(result.plaintext or b""))


def check_sealed_shape(sealed: bytes, *, vm_name: str) -> None:
    """Check what can be checked of a sealed vault without its key.

    A compact JWE whose protected header is the one :func:`seal_vault` writes
    for ``vm_name``. Whether it opens only the released transport key can tell.

    Raises:
        VaultError: truncated, not a JWE, or sealed for another VM or purpose.
    """
    parts = sealed.split(b".")
    if len(sealed) > MAX_VAULT_BYTES or len(parts) != 5:
        raise VaultError(f"{_WHAT} of VM {vm_name!r}: not a compact JWE")
    expected = {"alg": "dir", "enc": "A256GCM", "cty": VAULT_CTY, "kid": f"vm:{vm_name}"}
    try:
        header = load_json_document(
            b64url_decode(parts[0].decode("ascii"), what=f"{_WHAT} header"),
            what=f"{_WHAT} header",
            max_bytes=4096,
        )
    except (InvalidInputError, UnicodeDecodeError) as exc:
        raise VaultError(f"{_WHAT} of VM {vm_name!r}: unreadable header") from exc
    if header != expected:
        raise VaultError(f"{_WHAT}: sealed for another VM or purpose, not VM {vm_name!r}")


@dataclass(frozen=True)
class KeyPair:
    """One stored (vault, KP) pair and its generation number in the store."""

    number: int
    vault: bytes = field(repr=False)
    kp: bytes = field(repr=False)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VaultStore:
    """The (vault, KP) pairs of one VM in ``root``: committed, pending, previous."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, number: int) -> Path:
        return self.root / f"gen-{number:08d}"

    def numbers(self) -> list[int]:
        """The complete pairs on disk, oldest first (temp dirs of a crash are not pairs)."""
        if not self.root.is_dir():
            return []
        found = (_GEN_RE.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def committed_number(self) -> int | None:
        """The committed pair's number, if any pair was ever committed."""
        try:
            text = (self.root / "committed").read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            raise VaultError(f"{_WHAT}: {self.root / 'committed'} is damaged", hint=_RESTORE_HINT)
        return int(text)

    def load(self, number: int) -> KeyPair:
        """Read pair ``number``."""
        directory = self._dir(number)
        try:
            return KeyPair(
                number,
                (directory / "vault.jwe").read_bytes(),
                (directory / "kp.jws").read_bytes(),
            )
        except FileNotFoundError as exc:
            raise VaultError(
                f"{_WHAT}: pair {number} in {self.root} is incomplete", hint=_RESTORE_HINT
            ) from exc

    def committed(self) -> KeyPair:
        """The pair in use."""
        number = self.committed_number()
        if number is None:
            raise VaultError(f"{_WHAT}: nothing committed in {self.root}")
        return self.load(number)

    def pending(self) -> KeyPair | None:
        """The newest pair written after the committed one and never committed, if any."""
        committed = self.committed_number()
        newer = [n for n in self.numbers() if committed is None or n > committed]
        return self.load(newer[-1]) if newer else None

    def candidates(self) -> list[KeyPair]:
        """Pairs to try at power-on, in order: the committed one, then a pending one."""
        pending = self.pending()
        found = [self.committed()] if self.committed_number() is not None else []
        return found + ([pending] if pending is not None else [])

    def write_pending(self, vault: bytes, kp: bytes) -> KeyPair:
        """Write a new pair atomically (temp directory, fsync, rename); not yet committed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        number = max([*self.numbers(), self.committed_number() or 0]) + 1
        temp = self.root / f"gen-{number:08d}.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(mode=0o700)
        _write_private(temp / "vault.jwe", vault)
        _write_private(temp / "kp.jws", kp)
        _fsync_dir(temp)
        temp.rename(self._dir(number))
        _fsync_dir(self.root)
        return KeyPair(number, vault, kp)

    def commit(self, number: int, *, replaces: int | None = None) -> None:
        """Make pair ``number`` the committed one; keep the one it replaces (the previous pair).

        ``replaces`` is the pair whose KP was released for this start (the
        committed one unless a crash left a pending one that was used instead).
        Every other pair goes: older ones, and a stale pending one.
        """
        previous = replaces
        if previous is None:
            with contextlib.suppress(VaultError):  # a damaged pointer replaces nothing
                previous = self.committed_number()
        temp = self.root / "committed.tmp"
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        _write_private(temp, f"{number}\n".encode("ascii"))
        temp.rename(self.root / "committed")
        _fsync_dir(self.root)
        self._prune(keep={number, previous})

    def _prune(self, keep: set[int | None]) -> None:
        for number in self.numbers():
            if number not in keep:
                shutil.rmtree(self._dir(number))
        for temp in self.root.glob("*.tmp"):
            shutil.rmtree(temp, ignore_errors=True)

    def set_aside(self, number: int) -> Path:
        """Move pair ``number`` out of the store's view (kept on disk, never tried again).

        For a damaged pair: it can no longer be taken for the pending pair, and
        it stays (``damaged-gen-N-XXXXXXXX``) for whoever investigates. One
        rename: atomic.
        """
        # A later pair may reuse the number (numbering goes on from the committed
        # one): a random suffix keeps every damaged pair apart.
        target = self.root / f"damaged-{self._dir(number).name}-{secrets.token_hex(4)}"
        self._dir(number).rename(target)
        _fsync_dir(self.root)
        return target

    def previous(self) -> KeyPair | None:
        """The pair committed before the current one: its KP is spent (the KPS refuses it).

        Kept as the record of the last start; not a pair to go back to (ADR 0010).
        """
        committed = self.committed_number()
        older = [n for n in self.numbers() if committed is not None and n < committed]
        return self.load(older[-1]) if older else None  # commit pruned all but that one

    def files(self) -> Iterator[Path]:
        """Every file of the store (for reports and tests)."""
        yield from (p for p in self.root.rglob("*") if p.is_file())
