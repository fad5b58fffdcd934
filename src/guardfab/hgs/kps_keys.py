"""The KPS's own guardians: key files under the HGS state directory.

Each KPS key is a ``kps``-kind guardian (a signing key pair, whose thumbprint is
the guardian id, and an encryption key pair) that tenants name in their key
protectors. Layout::

    D/keys/kps/<guardian id>/signing-key.pem      private (0600)
    D/keys/kps/<guardian id>/encryption-key.pem   private (0600)
    D/keys/kps/<guardian id>/guardian.jws         the self-signed public document
    D/keys/kps/<guardian id>/key.json             name and creation time (public)
    D/keys/kps/<guardian id>/encryption-key.<n>.pem   key generation n >= 1 (0600)
    D/keys/kps/<guardian id>/guardian.<n>.jws         its document (written last)

A key directory is created complete or not at all (staged, then renamed); a
key generation is complete once its document is written, after its key.

Rotation adds a *key generation*: a new encryption key under the same signing
key (the guardian's identity), published in a new self-signed document with a
higher ``key_generation``. Every generation is kept: an old one still unwraps
the KPs wrapped to it, and each such KP moves to the current generation on its
next release (KP format 2, ADR 0002), so neither owners nor downtime are
involved. Which guardian is *primary* -- published in the metadata, preferred
when a KP names several of ours -- and which of its generations is current are
recorded in the store (``kps/keys/primary``, :mod:`guardfab.hgs.kps`), so every
node of a cluster switches at once; until the administrator picks one, the
oldest guardian is primary at its newest generation.
"""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from guardfab.errors import FormatError, UsageError
from guardfab.files import (
    PRIVATE,
    PUBLIC,
    atomic_write,
    create_directory_atomically,
    read_bounded,
)
from guardfab.formats import jose, keyfiles
from guardfab.formats.guardian import (
    MAX_GUARDIAN_BYTES,
    Guardian,
    GuardianKind,
    KeyAlgorithm,
    load_guardian_document,
    sign_guardian_document,
    validate_name,
)
from guardfab.formats.key_protector import KpsKeys
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

#: Where the KPS keys live, relative to the HGS state directory.
KPS_KEYS_DIR = ("keys", "kps")
#: The KPS guardian's key family: ES256 + ECDH-ES+A256KW are the cheapest per release.
DEFAULT_ALGORITHM = KeyAlgorithm.EC_P256
_SIGNING = "signing-key.pem"
_ENCRYPTION = "encryption-key.pem"
_DOCUMENT = "guardian.jws"
_META = "key.json"
_MAX_KEY_BYTES = 16 * 1024
_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_GENERATION_RE = re.compile(r"guardian\.([1-9][0-9]{0,8})\.jws")
_CURVES = {"P-256": KeyAlgorithm.EC_P256, "P-384": KeyAlgorithm.EC_P384}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def kps_guardian_name(service_name: str, suffix: str = "kps") -> str:
    """A guardian name derived from the HGS service name (what tenants see on import)."""
    base = _NAME_UNSAFE.sub("-", service_name).strip("-.") or "hgs"
    return validate_name(f"{base[:100]}-{suffix}")


@dataclass(frozen=True)
class KpsGeneration:
    """One key generation of a KPS guardian: its document and private encryption key."""

    guardian: Guardian
    document: bytes = field(repr=False)
    encryption_key: jose.AsymmetricKey = field(repr=False)


@dataclass(frozen=True)
class KpsKey:
    """One KPS guardian with its private keys, every key generation, from its directory.

    ``keys`` and ``document`` are the newest generation's.
    """

    keys: GuardianKeys = field(repr=False)
    document: bytes = field(repr=False)
    created_at: int
    generations: tuple[KpsGeneration, ...] = field(default=(), repr=False)

    @property
    def id(self) -> str:
        """The guardian id (thumbprint of the signing key)."""
        return self.keys.guardian.id

    @property
    def name(self) -> str:
        """The guardian's name."""
        return self.keys.guardian.name

    @property
    def newest(self) -> int:
        """The newest key generation held."""
        return self.keys.guardian.key_generation

    def generation(self, number: int) -> KpsGeneration:
        """Key generation ``number``.

        Raises:
            UsageError: this node holds no such generation.
        """
        for held in self.generations:
            if held.guardian.key_generation == number:
                return held
        raise UsageError(
            f"KPS key {self.id} has no key generation {number} on this node",
            hint="copy its files under keys/kps/ from another node, or restore a backup",
        )

    def kps_keys(self, current: int) -> KpsKeys:
        """What a release re-keys with: generation ``current``, and every key held to unwrap."""
        chosen = self.generation(current)
        return KpsKeys(
            guardian=chosen.guardian,
            document=chosen.document,
            signing_key=self.keys.signing_key,
            encryption_keys={g.guardian.encryption_kid: g.encryption_key for g in self.generations},
        )

    def summary(self, *, primary: bool, current: int | None = None) -> dict[str, object]:
        """Public description for the admin API and CLI."""
        return {
            **self.generation(self.newest if current is None else current).guardian.summary(),
            "created_at": self.created_at,
            "primary": primary,
            "key_generations": [g.guardian.key_generation for g in self.generations],
        }


class KpsKeyDirectory:
    """The KPS key files of one HGS state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def of_state(cls, state_dir: Path) -> KpsKeyDirectory:
        """The KPS keys of the HGS state directory ``state_dir``."""
        return cls(Path(state_dir).joinpath(*KPS_KEYS_DIR))

    def create(
        self, name: str, *, now: float, algorithm: KeyAlgorithm = DEFAULT_ALGORITHM
    ) -> KpsKey:
        """Generate a new KPS guardian and write its directory atomically."""
        keys = new_guardian_keys(name, algorithm, GuardianKind.KPS)
        document = sign_guardian_document(keys.guardian, keys.signing_key)
        meta = {"id": keys.guardian.id, "name": keys.guardian.name, "created_at": int(now)}
        files = {
            _SIGNING: (keyfiles.private_key_pem(keys.signing_key), PRIVATE),
            _ENCRYPTION: (keyfiles.private_key_pem(keys.encryption_key), PRIVATE),
            _DOCUMENT: (document + b"\n", PUBLIC),
            _META: (json.dumps(meta, indent=2).encode() + b"\n", PUBLIC),
        }
        self._write_new(keys.guardian.id, files)
        return KpsKey(
            keys, document, int(now), (KpsGeneration(keys.guardian, document, keys.encryption_key),)
        )

    def add_generation(self, key_id: str) -> KpsKey:
        """Rotate: a new encryption key for guardian ``key_id``, one key generation up.

        Same signing key, so the same guardian id tenants pinned; the new
        document is self-signed by it, which nobody else can do. The key file is
        written before the document, and a generation without its document is
        not one, so a crash leaves no half generation.
        """
        key = self.load(key_id)
        number = key.newest + 1
        encryption = keyfiles.generate_key(_algorithm_of(key.keys.encryption_key))
        guardian = Guardian(
            name=key.name,
            kind=GuardianKind.KPS,
            signing_key=key.keys.guardian.signing_key,
            encryption_key=jose.import_public_jwk(
                jose.public_jwk(encryption), what="encryption key"
            ),
            key_generation=number,
        )
        document = sign_guardian_document(guardian, key.keys.signing_key)
        directory = self.root / key_id
        atomic_write(
            directory / f"encryption-key.{number}.pem",
            keyfiles.private_key_pem(encryption),
            mode=PRIVATE,
        )
        atomic_write(directory / f"guardian.{number}.jws", document + b"\n", mode=PUBLIC)
        return self.load(key_id)

    def _write_new(self, key_id: str, files: dict[str, tuple[bytes, int]]) -> None:
        if (self.root / key_id).exists():
            raise UsageError(f"KPS key {key_id} already exists")
        create_directory_atomically(self.root / key_id, files)

    def ids(self) -> list[str]:
        """Ids of the complete key directories, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if _ID_RE.fullmatch(p.name) and p.is_dir()
        )

    def load(self, key_id: str) -> KpsKey:
        """Load one key and check that its files agree with each other.

        Raises:
            UsageError: no such key, or a private key file readable by others.
            FormatError: a file is corrupt or does not match the guardian document.
        """
        if not _ID_RE.fullmatch(key_id) or not (self.root / key_id).is_dir():
            raise UsageError(f"no KPS key {key_id[:64]!r}", hint="see 'guardfab hgs kps key list'")
        directory = self.root / key_id
        document = read_bounded(directory / _DOCUMENT, limit=MAX_GUARDIAN_BYTES, what="guardian")
        guardian = load_guardian_document(document)
        signing = _private_key(directory / _SIGNING)
        encryption = _private_key(directory / _ENCRYPTION)
        if guardian.id != key_id or jose.thumbprint(signing) != key_id:
            raise FormatError(f"KPS key {key_id}: the signing key does not match its directory")
        if jose.thumbprint(encryption) != guardian.encryption_kid:
            raise FormatError(f"KPS key {key_id}: the encryption key does not match its document")
        if guardian.kind is not GuardianKind.KPS or guardian.key_generation:
            raise FormatError(f"KPS key {key_id}: guardian.jws is not a 'kps' generation 0")
        generations = [KpsGeneration(guardian, document.strip(), encryption)]
        generations += [
            _load_generation(directory, n, guardian) for n in _generation_numbers(directory)
        ]
        newest = generations[-1]
        return KpsKey(
            GuardianKeys(newest.guardian, signing, newest.encryption_key),
            newest.document,
            _created(directory),
            tuple(generations),
        )

    def load_all(self) -> list[KpsKey]:
        """Every key, oldest first."""
        return sorted((self.load(i) for i in self.ids()), key=lambda k: (k.created_at, k.id))


def _generation_numbers(directory: Path) -> list[int]:
    """The key generations >= 1 whose documents are written; they must run 1, 2, ... n."""
    numbers = sorted(
        int(m.group(1)) for p in directory.iterdir() if (m := _GENERATION_RE.fullmatch(p.name))
    )
    if numbers != list(range(1, len(numbers) + 1)):
        raise FormatError(f"KPS key {directory.name}: its key generations are not 1 to n")
    return numbers


def _load_generation(directory: Path, number: int, first: Guardian) -> KpsGeneration:
    """Key generation ``number``: its document must be the same guardian's, at that generation."""
    what = f"KPS key {directory.name} generation {number}"
    document = read_bounded(
        directory / f"guardian.{number}.jws", limit=MAX_GUARDIAN_BYTES, what=what
    )
    guardian = load_guardian_document(document)
    if guardian.id != first.id or guardian.kind is not GuardianKind.KPS:
        raise FormatError(f"{what}: the document is not this guardian's")
    if guardian.key_generation != number:
        raise FormatError(f"{what}: the document says key generation {guardian.key_generation}")
    encryption = _private_key(directory / f"encryption-key.{number}.pem")
    if jose.thumbprint(encryption) != guardian.encryption_kid:
        raise FormatError(f"{what}: the encryption key does not match its document")
    return KpsGeneration(guardian, document.strip(), encryption)


def _algorithm_of(key: jose.AsymmetricKey) -> KeyAlgorithm:
    """The key family of an existing key, so a new generation keeps the guardian's family."""
    curve = jose.public_jwk(key).get("crv")
    return _CURVES.get(str(curve), KeyAlgorithm.RSA_3072) if curve else KeyAlgorithm.RSA_3072


def _private_key(path: Path) -> jose.AsymmetricKey:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise UsageError(f"{path} is readable by group or others", hint=f"chmod 600 {path}")
    data = read_bounded(path, limit=_MAX_KEY_BYTES, what="KPS private key")
    return keyfiles.load_private_key(data, what=f"KPS key {path.parent.name}")


def _created(directory: Path) -> int:
    raw = read_bounded(directory / _META, limit=4096, what="KPS key metadata")
    try:
        return int(json.loads(raw)["created_at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"KPS key {directory.name}: key.json is corrupt") from exc


def key_ring(keys: Sequence[KpsKey], primary_id: str | None) -> list[KpsKey]:
    """The keys in the order a release tries them: the primary, then newest to oldest.

    Without a recorded primary the oldest key is primary (the one ``hgs init`` made).

    Raises:
        UsageError: the recorded primary is not among ``keys`` (its files are missing).
    """
    if not keys:
        return []
    ordered = sorted(keys, key=lambda k: (k.created_at, k.id))
    chosen = ordered[0].id if primary_id is None else primary_id
    primary = [k for k in ordered if k.id == chosen]
    if not primary:
        raise UsageError(
            f"the primary KPS key {chosen} has no key files on this node",
            hint="copy its directory under keys/kps/ from another node, or restore a backup",
        )
    return primary + [k for k in reversed(ordered) if k.id != chosen]


def create_first_kps_key(
    state_root: Path, service_name: str, *, now: float | None = None
) -> KpsKey:
    """The KPS guardian ``hgs init`` makes (the HGS guardian tenants import)."""
    return KpsKeyDirectory(Path(state_root).joinpath(*KPS_KEYS_DIR)).create(
        kps_guardian_name(service_name), now=time.time() if now is None else now
    )
