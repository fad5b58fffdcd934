"""Role-bound access tokens: 256-bit random, handed out once, kept only as SHA-256 digests.

A service directory holds ``tokens/<role>.token`` (0600, for its administrator
to hand out) and ``access.json`` (the digest of each token and its role). The
service checks a presented token against the digests in constant time, so the
table it reads holds nothing that would let a reader act as anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardfab.errors import FormatError, NotAuthorizedError
from guardfab.files import PRIVATE, atomic_write, read_bounded

ACCESS_FILE = "access.json"
_MAX_ACCESS_BYTES = 65536


def token_digest(token: str) -> str:
    """The stored form of an access token (SHA-256 hex; tokens are 256-bit random)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh 256-bit access token (URL-safe text)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class AccessTable:
    """Which token digest has which role."""

    entries: dict[str, str]

    def role_of(self, token: str) -> str:
        """The role of ``token``, compared in constant time; raises if unknown."""
        digest = token_digest(token)
        found = None
        for known, role in self.entries.items():
            # No early exit: the time taken does not depend on which entry matched.
            if hmac.compare_digest(known, digest):
                found = role
        if found is None:
            raise NotAuthorizedError("unknown or revoked access token")
        return found

    def to_json(self) -> bytes:
        """The ``access.json`` form."""
        tokens = [{"role": role, "sha256": digest} for digest, role in self.entries.items()]
        return json.dumps({"tokens": tokens}, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, *, what: str = "access table") -> AccessTable:
        """Load an ``access.json`` document."""
        try:
            doc: Any = json.loads(data)
            return cls({str(e["sha256"]): str(e["role"]) for e in doc["tokens"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{what}: not a valid access table") from exc

    @classmethod
    def load(cls, path: Path) -> AccessTable:
        """Read ``access.json`` at ``path``."""
        return cls.from_json(read_bounded(path, limit=_MAX_ACCESS_BYTES, what="access table"))


def issue_tokens(roles: Iterable[str]) -> tuple[dict[str, str], AccessTable]:
    """A new token per role and the table of their digests."""
    tokens = {role: new_token() for role in roles}
    return tokens, AccessTable({token_digest(t): r for r, t in tokens.items()})


def token_files(tokens: dict[str, str]) -> dict[str, tuple[bytes, int]]:
    """``tokens/<role>.token`` file contents (0600) for a directory being created."""
    return {f"{role}.token": (token.encode() + b"\n", PRIVATE) for role, token in tokens.items()}


def write_access_table(path: Path, table: AccessTable) -> None:
    """Replace ``access.json`` atomically (0600)."""
    atomic_write(path, table.to_json(), mode=PRIVATE, overwrite=True)
