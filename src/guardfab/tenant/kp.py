"""Key protectors on the tenant's machine: files in, files out, guardians from the store.

The format and every check live in :mod:`guardfab.formats.key_protector`; this
module only reads and writes files and looks guardians up in the local
:class:`~guardfab.tenant.guardians.GuardianStore`. Outputs are written
atomically as the last step, so a command that fails leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guardfab.errors import NotAuthorizedError, UsageError
from guardfab.files import PUBLIC, atomic_write, read_bounded
from guardfab.formats.key_protector import (
    MAX_KP_BYTES,
    KeyProtector,
    load_key_protector,
)
from guardfab.tenant.guardians import GuardianStore


def read_key_protector(path: Path, *, expected_owner: str | None = None) -> KeyProtector:
    """Read and verify the KP file at ``path`` (see :func:`load_key_protector`)."""
    return load_key_protector(
        read_bounded(path, limit=MAX_KP_BYTES, what="key protector"),
        expected_owner=expected_owner,
    )


def write_key_protector(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write KP bytes atomically; refuse to replace an existing file unless ``force``.

    A KP holds no secret in clear (only wrappings), hence a public file mode.
    """
    atomic_write(path, data, mode=PUBLIC, overwrite=force)


def check_output(path: Path, *, force: bool) -> None:
    """Fail early, before any passphrase prompt, if ``path`` may not be written."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist")


def guardian_documents(store: GuardianStore, names: Sequence[str]) -> list[bytes]:
    """The stored self-signed documents of guardians ``names``, for embedding in a KP."""
    return [store.document(name) for name in names]


def owner_name(store: GuardianStore, kp: KeyProtector) -> str:
    """The local name of the KP's owner, which must have its private keys here.

    Raises:
        NotAuthorizedError: the owner is not in the store, or only its public half is.
    """
    name = store.find_by_id(kp.owner)
    if name is None or not store.has_private_keys(name):
        raise NotAuthorizedError(
            f"this machine does not hold the private keys of the KP's owner {kp.owner}",
            hint="run this where the owner guardian was created",
        )
    return name


def resolve_guardian_id(store: GuardianStore, kp: KeyProtector, name_or_id: str) -> str:
    """Turn a guardian id, a local guardian name, or a name unique in the KP into an id."""
    if name_or_id in kp.guardian_ids:
        return name_or_id
    if name_or_id in store.names():
        return store.get(name_or_id).id
    matches = [g.id for g in kp.guardians if g.name == name_or_id]
    if len(matches) == 1:
        return matches[0]
    raise UsageError(
        f"{name_or_id!r} is neither a guardian id of this key protector nor a unique name",
        hint="see 'guardfab tenant kp show' for the ids",
    )


@dataclass(frozen=True)
class LocalView:
    """Which guardians of a KP this machine knows, and which it could unwrap with."""

    local_names: dict[str, str]
    can_unwrap: list[str]


def local_view(store: GuardianStore, kp: KeyProtector) -> LocalView:
    """Map the KP's guardian ids to local names; list those whose private keys are here.

    Nothing is decrypted: "could unwrap" means the private keys of one of the
    KP's guardians, with the encryption key the KP wraps to, are in this store.
    """
    wanted = set(kp.guardian_ids)
    local_names: dict[str, str] = {}
    can_unwrap: list[str] = []
    for name in store.names():
        guardian = store.get(name)
        if guardian.id not in wanted:
            continue
        local_names.setdefault(guardian.id, name)
        same_key = kp.guardian(guardian.id).encryption_kid == guardian.encryption_kid
        if same_key and store.has_private_keys(name):
            can_unwrap.append(name)
    return LocalView(local_names=local_names, can_unwrap=can_unwrap)
