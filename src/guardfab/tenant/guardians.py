"""The tenant's local guardian store.

Layout under the guardfab home (``$GUARDFAB_HOME``, default ``~/.guardfab``)::

    guardians/NAME/guardian.jws        public, self-signed guardian document
    guardians/NAME/signing-key.pem     private (0600), only for guardians made here
    guardians/NAME/encryption-key.pem  private (0600), only for guardians made here

Imported guardians (another fabric's HGS, a co-owner) have only the public document.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from guardfab.errors import FormatError, UsageError
from guardfab.files import PRIVATE, PUBLIC, create_directory_atomically, read_bounded
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

_DOCUMENT = "guardian.jws"
_SIGNING_KEY = "signing-key.pem"
_ENCRYPTION_KEY = "encryption-key.pem"
_MAX_KEY_BYTES = 64 * 1024


def default_home() -> Path:
    """The guardfab home directory: ``$GUARDFAB_HOME`` or ``~/.guardfab``."""
    env = os.environ.get("GUARDFAB_HOME")
    return Path(env) if env else Path.home() / ".guardfab"


@dataclass(frozen=True)
class GuardianKeys:
    """A guardian together with its private keys (only the owner of the guardian has these)."""

    guardian: Guardian
    signing_key: jose.AsymmetricKey
    encryption_key: jose.AsymmetricKey


def new_guardian_keys(
    name: str, algorithm: KeyAlgorithm, kind: GuardianKind = GuardianKind.TENANT
) -> GuardianKeys:
    """Generate a new guardian (two fresh key pairs) in memory."""
    signing = keyfiles.generate_key(algorithm)
    encryption = keyfiles.generate_key(algorithm)
    guardian = Guardian(
        name=validate_name(name),
        kind=kind,
        signing_key=jose.import_public_jwk(jose.public_jwk(signing), what="signing key"),
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="encryption key"),
    )
    return GuardianKeys(guardian, signing, encryption)


class GuardianStore:
    """Guardians kept in a directory; every write is atomic and private keys are 0600."""

    def __init__(self, home: Path) -> None:
        self.root = Path(home) / "guardians"

    def _dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def create(
        self,
        name: str,
        algorithm: KeyAlgorithm = KeyAlgorithm.EC_P384,
        passphrase: str | None = None,
        kind: GuardianKind = GuardianKind.TENANT,
    ) -> Guardian:
        """Generate a guardian and store it, its private keys encrypted if a passphrase is given."""
        keys = new_guardian_keys(name, algorithm, kind)
        document = sign_guardian_document(keys.guardian, keys.signing_key)
        files = {
            _SIGNING_KEY: (keyfiles.private_key_pem(keys.signing_key, passphrase), PRIVATE),
            _ENCRYPTION_KEY: (keyfiles.private_key_pem(keys.encryption_key, passphrase), PRIVATE),
            _DOCUMENT: (document, PUBLIC),
        }
        self._write_new(name, files)
        return keys.guardian

    def add_public(self, document: bytes, name: str | None = None) -> Guardian:
        """Import a public guardian document (verified first), optionally under another name."""
        guardian = load_guardian_document(document)
        local_name = validate_name(name or guardian.name)
        self._write_new(local_name, {_DOCUMENT: (document.strip() + b"\n", PUBLIC)})
        return guardian

    def _write_new(self, name: str, files: dict[str, tuple[bytes, int]]) -> None:
        """Create the guardian's directory with all its files, or nothing at all."""
        target = self._dir(name)
        if target.exists():
            raise UsageError(f"a guardian named {name!r} already exists", hint="pick another name")
        create_directory_atomically(target, files)

    def names(self) -> list[str]:
        """Names of all stored guardians, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / _DOCUMENT).is_file())

    def get(self, name: str) -> Guardian:
        """Load and verify the public guardian ``name``."""
        path = self._dir(name) / _DOCUMENT
        if not path.is_file():
            raise UsageError(
                f"no guardian named {name!r}", hint="see 'guardfab tenant guardian list'"
            )
        return load_guardian_document(
            read_bounded(path, limit=MAX_GUARDIAN_BYTES, what="guardian document")
        )

    def document(self, name: str) -> bytes:
        """The public guardian document of ``name``, as stored (for export)."""
        self.get(name)  # verify before handing it out
        return (self._dir(name) / _DOCUMENT).read_bytes()

    def has_private_keys(self, name: str) -> bool:
        """True if this store holds the private keys of ``name``."""
        return (self._dir(name) / _SIGNING_KEY).is_file()

    def keys(self, name: str, passphrase: str | None = None) -> GuardianKeys:
        """Load ``name`` with its private keys; checks they match the public document."""
        guardian = self.get(name)
        if not self.has_private_keys(name):
            raise UsageError(
                f"guardian {name!r} was imported: this machine has no private key for it"
            )
        signing = self._private(name, _SIGNING_KEY, passphrase)
        encryption = self._private(name, _ENCRYPTION_KEY, passphrase)
        if jose.thumbprint(signing) != guardian.id:
            raise FormatError(f"guardian {name!r}: signing key does not match its document")
        if jose.thumbprint(encryption) != guardian.encryption_kid:
            raise FormatError(f"guardian {name!r}: encryption key does not match its document")
        return GuardianKeys(guardian, signing, encryption)

    def _private(self, name: str, filename: str, passphrase: str | None) -> jose.AsymmetricKey:
        path = self._dir(name) / filename
        data = read_bounded(path, limit=_MAX_KEY_BYTES, what="private key")
        return keyfiles.load_private_key(data, passphrase, what=f"guardian {name!r} {filename}")

    def find_by_id(self, guardian_id: str) -> str | None:
        """The local name of the guardian whose id is ``guardian_id``, if stored."""
        for name in self.names():
            if self.get(name).id == guardian_id:
                return name
        return None
